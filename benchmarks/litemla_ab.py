"""LiteMLA before/after issue 21 in one process: the old formulation (concatenated scales, grouped 1x1
output transposed back to NHWC, ones column) against the package's, same weights, compiled, alternating.

    python benchmarks/litemla_ab.py       # prints per shape: max relative difference, (min, median) ms of each
"""
import sys, time, statistics
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx_evit  # noqa: F401  (BLAS set-up first)
import mlx.core as mx
import numpy as np
from mlx_evit.models.mit import LiteMLA

def old_call(self, x):
    B, H, W, _ = x.shape
    qkv = self.qkv(x)
    dw, pw = self.aggreg[0]
    xx = dw(qkv); Bq,Hq,Wq,Cq = xx.shape; g=pw.groups; O=pw.weight.shape[0]
    xg = xx.reshape(Bq*Hq*Wq, g, Cq//g).transpose(1,0,2)
    y = (xg @ pw.weight.reshape(g, O//g, Cq//g).transpose(0,2,1)).transpose(1,0,2).reshape(Bq,Hq,Wq,O)
    ms = mx.concatenate([qkv, y], axis=-1)
    d = self.dim
    t = ms.reshape(B, H*W, -1, 3*d).transpose(0,2,1,3)
    q = mx.maximum(t[..., :d],0); k = mx.maximum(t[..., d:2*d],0); v = t[..., 2*d:]
    q,k,v = (a.astype(mx.float32) for a in (q,k,v))
    ones = mx.ones(v.shape[:-1]+(1,), dtype=mx.float32)
    kv = k.swapaxes(-1,-2) @ mx.concatenate([v, ones], axis=-1)
    out = q @ kv
    out = (out[..., :-1] / (out[..., -1:] + self.eps)).astype(x.dtype)
    out = out.transpose(0,2,1,3).reshape(B,H,W,-1)
    return self.proj(out)

rng = np.random.default_rng(0)
for shape, d in [((8,14,14,128),16), ((8,7,7,256),16), ((1,32,32,512),32), ((16,14,14,256),32)]:
    m = LiteMLA(shape[-1], d, 1e-5, 1e-5); m.eval(); mx.eval(m.parameters())
    x = mx.array(rng.standard_normal(shape).astype(np.float32))
    fo = mx.compile(lambda t: old_call(m, t)); fn = mx.compile(m)
    a, b = np.array(fo(x)), np.array(fn(x))
    res = {"old": [], "new": []}
    for _ in range(3): mx.eval(fo(x)); mx.eval(fn(x))
    for r in range(15):
        for k, f in (("old", fo), ("new", fn)) if r % 2 == 0 else (("new", fn), ("old", fo)):
            t = time.perf_counter(); mx.eval(f(x)); res[k].append((time.perf_counter()-t)*1e3)
    print(shape, "rel", float(np.abs(a-b).max()/np.abs(a).max()), {k: (round(min(v),2), round(statistics.median(v),2)) for k, v in res.items()}, flush=True)
