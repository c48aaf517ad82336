#!/usr/bin/env python
"""Follow-up measurements on the GPU (each question of the first gpu_bench/gpu_profile run, in one call).

    python benchmarks/gpu_diag.py --json gpu_diag.json            # MLX CUDA + torch CUDA, ~2 min

* ``crash``: which dense convolutions crash with ``MLX_ENABLE_TF32=0``, and
  whether exact reformulations avoid it (each in its own process: an
  illegal memory access poisons the process's CUDA context).
* ``seg_tf32``: seg-B1 at 1024x2048 against the original code, with TF32 off
  on both sides (is the model exact at this size?) and on (how far does
  TF32 move it?).
* ``prepare``: B1 at batch 256 through ``inference.prepare`` against a bare
  ``mx.compile`` of the same model, before and after torch has run in the
  same process.
* ``bands``: seg models at 1024x2048 with the CPU's row bands and whole.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

CONVS = [  # (input NHWC, weight OHWI): the XL neck's conv, its neighbours in size, and others of the models
    ((1, 64, 64, 256), (1024, 3, 3, 256)),
    ((1, 64, 64, 256), (512, 3, 3, 256)),
    ((1, 64, 64, 128), (1024, 3, 3, 128)),
    ((1, 32, 32, 256), (1024, 3, 3, 256)),
    ((1, 64, 64, 256), (256, 3, 3, 256)),
    ((2, 64, 64, 256), (1024, 3, 3, 256)),
    ((1, 128, 128, 256), (1024, 3, 3, 256)),
    ((1, 256, 512, 128), (512, 3, 3, 128)),
]


def child_conv(form: str, xs: str, ws: str) -> None:
    import mlx.core as mx

    x = mx.random.normal(tuple(int(v) for v in xs.split(",")))
    w = mx.random.normal(tuple(int(v) for v in ws.split(","))) * 0.05
    O, kh, kw, C = w.shape
    if form == "conv":
        y = mx.conv2d(x, w, padding=kh // 2)
    elif form == "split2":
        y = mx.concatenate([mx.conv2d(x, w[: O // 2], padding=kh // 2), mx.conv2d(x, w[O // 2:], padding=kh // 2)], -1)
    else:  # im2col: one strided patch view, one GEMM
        B, H, W, _ = x.shape
        xp = mx.pad(x, [(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)])
        Hp, Wp = H + kh - 1, W + kw - 1
        patches = mx.as_strided(xp, (B, H, W, kh, kw, C), (Hp * Wp * C, Wp * C, C, Wp * C, C, 1))
        y = (patches.reshape(-1, kh * kw * C) @ w.reshape(O, -1).T).reshape(B, H, W, O)
    mx.eval(y)
    mx.synchronize()
    if form != "conv":
        ref = mx.conv2d(x, w, padding=kh // 2, stream=mx.cpu)
        err = float(mx.abs(y - ref).max() / mx.abs(ref).max())
        print(f"rel_vs_cpu {err:.2e}")
    mx.eval(mx.zeros((1 << 20,)))
    mx.synchronize()
    print("ok")


def run_crash() -> list[dict]:
    rows = []
    env = dict(os.environ, MLX_ENABLE_TF32="0")
    for i, (xs, ws) in enumerate(CONVS):
        for form in ("conv", "split2", "im2col") if i in (0, 5) else ("conv",):
            a, b = ",".join(map(str, xs)), ",".join(map(str, ws))
            try:
                p = subprocess.run([sys.executable, __file__, "--child-conv", form, a, b], env=env,
                                   capture_output=True, text=True, timeout=40)
                rc, out = p.returncode, p.stdout
            except subprocess.TimeoutExpired:
                rc, out = "timeout", ""
            row = {"x": a, "w": b, "form": form, "rc": rc, "ok": rc == 0 and "ok" in out,
                   "rel_vs_cpu": next((float(t.split()[1]) for t in out.splitlines() if t.startswith("rel_vs")), None)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def child_seg(path: str) -> None:
    import mlx_evit  # noqa: F401
    import mlx.core as mx
    import numpy as np
    import seg_bench

    from mlx_evit.models.keymap import load_state_dict
    from mlx_evit.models.registry import build_model
    from mlx_evit.tasks.inference import prepare

    name = "efficientvit_seg_b1_cityscapes"
    model = build_model(name)
    load_state_dict(model, seg_bench._state_dict(name))
    out = prepare(model, compile=True, streams=1)(mx.array(seg_bench._input(1024, 2048)))
    np.save(path, np.asarray(out))


def run_seg_tf32(tmp: str) -> dict:
    import numpy as np
    import torch
    import seg_bench
    import torch_seg

    res = {}
    for tf32 in ("0", "1"):
        path = os.path.join(tmp, f"seg_mlx_tf32_{tf32}.npy")
        p = subprocess.run([sys.executable, __file__, "--child-seg", path], env=dict(os.environ, MLX_ENABLE_TF32=tf32),
                           capture_output=True, text=True, timeout=120)
        if p.returncode:
            res[f"mlx_tf32_{tf32}"] = f"failed: {p.stderr[-300:]}"
    name = "efficientvit_seg_b1_cityscapes"
    tm = torch_seg.build(name).eval()
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in seg_bench._state_dict(name).items()})
    tm = tm.cuda()
    x = torch.from_numpy(np.ascontiguousarray(seg_bench._input(1024, 2048).transpose(0, 3, 1, 2))).cuda()
    outs = {}
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        with torch.inference_mode():
            outs[tf32] = tm(x).float().cpu().numpy().transpose(0, 2, 3, 1)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False

    def rel(a, b):
        return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())

    ref = outs[False]
    res["torch_tf32_vs_torch_fp32"] = rel(outs[True], ref)
    for tf32 in ("0", "1"):
        path = os.path.join(tmp, f"seg_mlx_tf32_{tf32}.npy")
        if os.path.exists(path):
            ours = np.load(path)
            res[f"mlx_tf32_{tf32}_vs_torch_fp32"] = rel(ours, ref)
            res[f"mlx_tf32_{tf32}_vs_torch_fp32_argmax_mismatch"] = float((ours.argmax(-1) != ref.argmax(-1)).mean())
    res["logit_range"] = [float(ref.min()), float(ref.max())]
    print(json.dumps(res), flush=True)
    return res


def _ms(fn) -> float:
    """Median ms per call over 5 bursts of at least 0.15 s (``gpu_profile.median_ms``)."""
    from gpu_profile import median_ms

    return median_ms(fn, reps=5, min_time=0.15)


def run_prepare(tmp: str) -> dict:
    import mlx_evit
    import mlx.core as mx
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import gpu_bench
    from mlx_evit.models.registry import build_model
    from mlx_evit.ops.layers import fuse_modules
    from mlx_evit.tasks.inference import prepare

    tm = gpu_bench._timm_model("efficientvit_b1", 224)
    path = os.path.join(tmp, "b1.safetensors")
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, path)
    x_np = np.random.default_rng(1).standard_normal((256, 224, 224, 3)).astype(np.float32)
    xm = mx.array(x_np)
    xr = mx.random.normal((256, 224, 224, 3))
    bare = build_model("efficientvit_b1").eval()
    fuse_modules(bare)
    mx.eval(bare.parameters())
    bare_c = mx.compile(lambda t: bare(t))
    bare_s = mx.compile(lambda t: bare(t), inputs=bare.state)
    loaded = mlx_evit.create_model("efficientvit_b1", pretrained=path)
    pred = prepare(loaded, compile=True, streams=1)
    res = {}
    for label, fn in (("bare compile, random input", lambda: bare_c(xr)),
                      ("bare compile, numpy input", lambda: bare_c(xm)),
                      ("bare compile inputs=state", lambda: bare_s(xm)),
                      ("prepare(create_model(timm file))", lambda: pred(xm)),
                      ("prepared model, bare compile", (lambda c: (lambda: c(xm)))(mx.compile(lambda t: pred.model(t))))):
        res[label] = _ms(fn)
    tmc = tm.cuda()
    xt = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))).cuda()
    with torch.inference_mode():
        for _ in range(3):
            tmc(xt)
    torch.cuda.synchronize()
    res["after torch: prepare"] = _ms(lambda: pred(xm))
    res["after torch: bare compile"] = _ms(lambda: bare_c(xm))
    res["mlx cache/active/peak MB"] = [mx.get_cache_memory() / 1e6, mx.get_active_memory() / 1e6, mx.get_peak_memory() / 1e6]
    print(json.dumps(res), flush=True)
    return res


def run_bands() -> dict:
    import mlx.core as mx
    import seg_bench

    from mlx_evit.models import seg_model
    from mlx_evit.models.keymap import load_state_dict
    from mlx_evit.models.registry import build_model
    from mlx_evit.ops.layers import fuse_modules

    res = {}
    x = mx.array(seg_bench._input(1024, 2048))
    for name in ("efficientvit_seg_b1_cityscapes", "efficientvit_seg_l2_cityscapes"):
        model = build_model(name).eval()
        load_state_dict(model, seg_bench._state_dict(name))
        fuse_modules(model)
        default = seg_model.BAND_ELEMENTS_GPU
        for label, limit in (("bands (CPU limit)", seg_model.BAND_ELEMENTS), ("whole (GPU limit)", default)):
            seg_model.BAND_ELEMENTS_GPU = limit
            fn = mx.compile(lambda t: model(t))
            res[f"{name} {label} ms"] = _ms(lambda: fn(x))
            mx.synchronize()
            mx.reset_peak_memory()
            mx.eval(fn(x))
            res[f"{name} {label} peak MB"] = mx.get_peak_memory() / 1e6
        seg_model.BAND_ELEMENTS_GPU = default
    print(json.dumps(res), flush=True)
    return res


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-conv":
        child_conv(*argv[1:4])
        return 0
    if argv and argv[0] == "--child-seg":
        child_seg(argv[1])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="crash,prepare,bands,seg_tf32")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import tempfile

    results = {"MLX_ENABLE_TF32": os.environ.get("MLX_ENABLE_TF32")}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            t0 = time.perf_counter()
            try:
                results[part] = {"crash": run_crash, "prepare": lambda: run_prepare(tmp), "bands": run_bands,
                                 "seg_tf32": lambda: run_seg_tf32(tmp)}[part]()
            except Exception as exc:
                results[part] = f"failed: {type(exc).__name__}: {exc}"[:500]
                print(part, results[part], flush=True)
            results[f"{part}_seconds"] = time.perf_counter() - t0
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
