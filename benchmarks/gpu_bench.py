#!/usr/bin/env python
"""Every family on MLX's GPU beside PyTorch eager on CUDA: same weights, same inputs, one run.

    python benchmarks/gpu_bench.py --json gpu_bench.json              # one H200: under 5 minutes
    python benchmarks/gpu_bench.py --device cpu --quick --json out.json   # any machine: small sizes, < 3 min
    python benchmarks/gpu_bench.py --cases ops,sam                    # a subset

Cases (``--quick``: smaller batches and images, same code):

* ``cls``: efficientvit_b1, _l1, _m4 at 224 (quick: 128), batch 1 and 256
  (quick: 1 and 2), float32 and bfloat16 (both sides cast); timm's
  architecture with random weights and non-trivial BatchNorm statistics.
* ``seg``: seg-B1 and seg-L2 (Cityscapes heads) at 1024x2048 (quick:
  128x256), batch 1; PyTorch side ``benchmarks/torch_seg.py``, synthetic
  weights of the test fixtures (as ``seg_bench.py``).
* ``sam``: EfficientViT-SAM L0 (512) and XL1 (1024) (quick: both at 256):
  ``set_image`` = the image encoder on the normalised, padded image already
  on the device; ``point`` = prompt encoder + mask decoder for one point
  (3 masks); PyTorch side: the original code (``efficientsam``), synthetic
  weights (as ``sam_bench.py``).
* ``ops``: single ops at the models' shapes, each in the form the package
  runs and in its alternatives (the op table of the notes), beside
  PyTorch NCHW and channels-last.

MLX runs what a user runs: :func:`mlx_evit.tasks.inference.prepare`
(BatchNorm folded, ``mx.compile``) for classification and seg,
:class:`mlx_evit.sam.SamPredictor`'s compiled encoder and decoder for SAM,
with its default TF32 setting (``MLX_ENABLE_TF32``, reported).
PyTorch runs eager under ``inference_mode``, NCHW and channels-last, with
its defaults (TF32 for cuDNN convolutions, not for matmuls; reported).
Each case first checks agreement (``rel_diff`` = max |mlx - torch| /
max |torch| of the outputs, with a bound per precision; a case over its
bound is reported with ``"agree": false`` and not timed), then times both
sides in alternating bursts (``--repeats`` each) and reports medians and the
ratio mlx/torch of throughputs (> 1: MLX faster). In ``--device cpu`` mode
both runtimes share one process and the machine's cores: a smoke run of
the code, not a CPU benchmark (``bench.py``, ``seg_bench.py`` and
``sam_bench.py`` measure the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import mlx_evit  # noqa: F401  (before mlx.core: BLAS preload on Linux)
import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

CASES = ("ops", "cls", "seg", "sam")
# Agreement bounds (rel_diff) before timing: float32 exact (CPU, MLX_ENABLE_TF32=0), TF32 (see
# tests/precision.py: 2x the largest deviation measured on an H200), half precision.
BOUND = {"float32": 1e-4, "tf32": 1e-2, "bfloat16": 1e-1}


# ---------------------------------------------------------------------------
# Timing and the two sides' settings
# ---------------------------------------------------------------------------


class Sides:
    """Device and precision settings of both runtimes, and the timing loop."""

    def __init__(self, device: str, repeats: int, burst: float, min_calls: int = 2):
        import torch

        from mlx_evit.ops.backend import float32_is_tf32, use_native

        self.torch = torch
        self.gpu = device == "gpu"
        self.tdev = torch.device("cuda" if self.gpu else "cpu")
        self.repeats, self.burst, self.min_calls = repeats, burst, min_calls
        mx.set_default_device(mx.gpu if self.gpu else mx.cpu)
        self.mlx_tf32 = float32_is_tf32()
        self.info = {
            "device": device,
            "mlx": mx.__version__,
            "mlx_device": str(mx.default_device()),
            "mlx_kernels": "native" if use_native() else "cpu",
            "mlx_tf32": self.mlx_tf32,
            "MLX_ENABLE_TF32": os.environ.get("MLX_ENABLE_TF32"),
            "torch": torch.__version__,
            "torch_device": torch.cuda.get_device_name() if self.gpu else "cpu",
            "torch_matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "torch_cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
        }

    def bound(self, dtype: str) -> float:
        if dtype != "float32":
            return BOUND["bfloat16"]
        torch_tf32 = self.gpu and (self.info["torch_cudnn_tf32"] or self.info["torch_matmul_tf32"])
        return BOUND["tf32"] if self.mlx_tf32 or torch_tf32 else BOUND["float32"]

    def sync(self) -> None:
        if self.gpu:
            self.torch.cuda.synchronize()

    def _rate(self, fn: Callable[[], object]) -> float:
        n, start = 0, time.perf_counter()
        while n < self.min_calls or time.perf_counter() - start < self.burst:
            fn()
            n += 1
        return n / (time.perf_counter() - start)

    def exact(self, fn: Callable[[], object]):
        """``fn()`` with PyTorch's TF32 switched off (cuDNN and matmuls): the float32 reference."""
        b = self.torch.backends
        saved = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32
        b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = False
        try:
            return fn()
        finally:
            b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved

    def time(self, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Median milliseconds per call of each function, bursts alternating in rotating order.

        ``mlx_alone``: MLX's median over bursts run before any other side runs in
        this row (a control for interference between the two runtimes on one device).
        """
        for fn in fns.values():
            for _ in range(self.min_calls):
                fn()
        alone = [self._rate(fns["mlx"]) for _ in range(max(1, self.repeats // 2))]
        rates: dict[str, list[float]] = {k: [] for k in fns}
        keys = list(fns)
        for i in range(self.repeats):
            for key in keys[i % len(keys):] + keys[: i % len(keys)]:
                rates[key].append(self._rate(fns[key]))
        ms = {k: 1e3 / statistics.median(v) for k, v in rates.items()}
        ms["mlx_alone"] = 1e3 / statistics.median(alone)
        return ms

    def mlx_fn(self, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            out = fn()
            mx.eval(out)
            if self.gpu:
                mx.synchronize()
            return out

        return run

    def torch_fn(self, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            with self.torch.inference_mode():
                out = fn()
            self.sync()
            return out

        return run


def _rel(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def _np(x) -> np.ndarray:
    if isinstance(x, mx.array):
        return np.asarray(x.astype(mx.float32))
    return x.detach().float().cpu().numpy()


def _row(sides: Sides, kind: str, name: str, dtype: str, shape: str, rel: float, fns: dict,
         torch_rel: float | None = None) -> dict:
    """Agreement check, then timings: the ``mlx`` entry against every ``torch*`` entry.

    ``torch_rel``: for float32 rows, how far PyTorch with its defaults (TF32 convolutions) is from its own
    exact float32; ``rel`` is then MLX's distance from that exact output, and MLX agrees when it is within
    the precision's bound or twice PyTorch's own TF32 deviation, whichever is larger.
    """
    bound = sides.bound(dtype)
    if torch_rel is not None:
        bound = max(bound, 2 * torch_rel)
    row = {"case": kind, "name": name, "dtype": dtype, "shape": shape, "rel_diff": rel, "bound": bound,
           "agree": bool(rel <= bound)}
    if torch_rel is not None:
        row["torch_default_rel_vs_fp32"] = torch_rel
    if row["agree"]:
        ms = sides.time(fns)
        row["ms"] = ms
        row["ratio"] = {k: ms[k] / ms["mlx"] for k in ms if k.startswith("torch")}  # torch time / mlx time
    status = (" ".join(f"{k} {v:8.2f}" for k, v in row["ms"].items()) + " ms | mlx/torch " +
              " ".join(f"{k} {v:.2f}x" for k, v in row["ratio"].items())) if row["agree"] else "NOT TIMED"
    trel = f" (torch TF32 {torch_rel:.1e})" if torch_rel is not None else ""
    print(f"{kind:4s} {name:24s} {dtype:8s} {shape:18s} rel {rel:.1e}{trel} | {status}", flush=True)
    return row


def _torch_pair(sides: Sides, model, x_nchw):
    """``{"torch": fn, "torch_cl": fn}``: the module in NCHW and in channels-last (a copy), same input."""
    import copy

    torch = sides.torch
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
    return {"torch": sides.torch_fn(lambda: model(x_nchw)), "torch_cl": sides.torch_fn(lambda: cl_model(x_cl))}


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------


def _timm_model(name: str, res: int):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **({"img_size": res} if "_m" in name else {}))
    with torch.no_grad():  # non-trivial BatchNorm statistics so the comparison means something
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def run_cls(sides: Sides, quick: bool) -> list[dict]:
    from safetensors.torch import save_file

    from mlx_evit.tasks.inference import prepare

    torch = sides.torch
    res = 128 if quick else 224
    rows = []
    for name in ("efficientvit_b1", "efficientvit_l1", "efficientvit_m4"):
        mx.clear_cache()
        tm = _timm_model(name, res)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "w.safetensors")
            save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, path)
            extra = {"img_size": res} if "_m" in name else {}
            models = {dt: mlx_evit.create_model(name, pretrained=path, **extra) for dt in ("float32", "bfloat16")}
        for dtype in ("float32", "bfloat16"):
            tdt = torch.float32 if dtype == "float32" else torch.bfloat16
            tmd = tm.to(sides.tdev, tdt)
            tmd.train()  # timm's MSRA attention caches its biases in eval mode, in the dtype of the last call
            tmd.eval()
            predictor = prepare(models[dtype], compile=True, dtype=dtype, streams=1)
            for batch in (1, 2) if quick else (1, 256):
                x = np.random.default_rng(batch).standard_normal((batch, res, res, 3)).astype(np.float32)
                xm = mx.array(x)
                xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(sides.tdev, tdt)
                fns = {"mlx": sides.mlx_fn(lambda: predictor(xm))}
                fns.update(_torch_pair(sides, tmd, xt))
                ours = _np(predictor(xm))
                if dtype == "float32":
                    ref = _np(sides.exact(fns["torch"]))
                    rel, trel = _rel(ours, ref), _rel(_np(fns["torch"]()), ref)
                else:
                    rel, trel = _rel(ours, _np(fns["torch"]())), None
                rows.append(_row(sides, "cls", name, dtype, f"{batch}x{res}x{res}", rel, fns, trel))
    return rows


# ---------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------


def run_seg(sides: Sides, quick: bool) -> list[dict]:
    import seg_bench
    import torch_seg

    from mlx_evit.models.keymap import load_state_dict
    from mlx_evit.models.registry import build_model
    from mlx_evit.tasks.inference import prepare

    torch = sides.torch
    h, w = (128, 256) if quick else (1024, 2048)
    rows = []
    for name in ("efficientvit_seg_b1_cityscapes", "efficientvit_seg_l2_cityscapes"):
        sd = seg_bench._state_dict(name)
        tm = torch_seg.build(name).eval()
        tm.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
        tm = tm.to(sides.tdev)
        model = build_model(name)
        load_state_dict(model, sd)
        predictor = prepare(model, compile=True, streams=1)
        x = seg_bench._input(h, w)
        xm = mx.array(x)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(sides.tdev)
        fns = {"mlx": sides.mlx_fn(lambda: predictor(xm))}
        fns.update(_torch_pair(sides, tm, xt))
        ref = _np(sides.exact(fns["torch"])).transpose(0, 2, 3, 1)
        rel = _rel(_np(predictor(xm)), ref)
        trel = _rel(_np(fns["torch"]()).transpose(0, 2, 3, 1), ref)
        rows.append(_row(sides, "seg", name.replace("efficientvit_", ""), "float32", f"1x{h}x{w}", rel, fns, trel))
    return rows


# ---------------------------------------------------------------------------
# SAM
# ---------------------------------------------------------------------------


def run_sam(sides: Sides, quick: bool) -> list[dict]:
    import sam_bench
    from efficientsam.models.efficientvit import sam as upstream
    from efficientsam.models.nn.norm import set_norm_eps

    from mlx_evit.models.keymap import load_state_dict
    from mlx_evit.models.registry import build_model
    from mlx_evit.sam import SamPredictor

    torch = sides.torch
    rows = []
    for variant in ("l0", "xl1"):
        state = sam_bench._state(variant)
        tm = getattr(upstream, sam_bench.UPSTREAM[variant])()
        set_norm_eps(tm, 1e-6)
        tm.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        tm = tm.eval().to(sides.tdev)
        size = 256 if quick else tm.image_size[1]
        model = build_model(sam_bench.UPSTREAM[variant], image_size=size)
        load_state_dict(model, state)
        predictor = SamPredictor(model)
        x = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
        xm = mx.array(x)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(sides.tdev)
        enc = {"mlx": sides.mlx_fn(lambda: predictor._encode(xm))}
        enc.update(_torch_pair(sides, tm.image_encoder, xt))
        feats = predictor._encode(xm)
        tfeats = enc["torch"]()
        ref = _np(sides.exact(enc["torch"])).transpose(0, 2, 3, 1)
        rel, trel = _rel(_np(feats), ref), _rel(_np(tfeats).transpose(0, 2, 3, 1), ref)
        rows.append(_row(sides, "sam", f"sam_{variant} set_image", "float32", f"1x{size}x{size}", rel, enc, trel))

        # One foreground point (1024 frame), three masks; each side decodes its own embedding.
        predictor.features, predictor.is_image_set = feats, True
        pts = np.array([[[400.0, 300.0]]], np.float32)
        lab = np.array([[1]], np.int32)
        points = (mx.array(pts), mx.array(lab))
        tpts = (torch.from_numpy(pts).to(sides.tdev), torch.from_numpy(lab).to(sides.tdev))
        dense_pe = tm.prompt_encoder.get_dense_pe()

        def torch_decode():
            sparse, dense = tm.prompt_encoder(points=tpts, boxes=None, masks=None)
            return tm.mask_decoder(image_embeddings=tfeats, image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                                   dense_prompt_embeddings=dense, multimask_output=True)[0]

        dec = {"mlx": sides.mlx_fn(lambda: predictor.decode(points, None, None, True)), "torch":
               sides.torch_fn(torch_decode)}
        rel = _rel(_np(predictor.decode(points, None, None, True)[0]), _np(dec["torch"]()))
        rows.append(_row(sides, "sam", f"sam_{variant} point", "float32", "1 point, 3 masks", rel, dec))
    return rows


# ---------------------------------------------------------------------------
# Single ops: the package's form and its alternatives
# ---------------------------------------------------------------------------


def run_ops(sides: Sides, quick: bool) -> list[dict]:
    """Each op in the form mlx_evit runs on this device (``mlx``) and the alternatives (``mlx_*``)."""
    import torch.nn.functional as F

    from mlx_evit.ops import cpu_kernels, layers
    from mlx_evit.ops.backend import use_native
    from mlx_evit.models.sam_decoder import ConvTranspose2x2, attention_core

    torch = sides.torch
    n = 1 if quick else 256
    r = 2 if quick else 1  # quick: maps halved a side
    rng = np.random.default_rng(0)
    rows = []

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def conv_case(label, x, w_ohwi, groups, mlx_forms: dict):
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(sides.tdev)
        wt = torch.from_numpy(np.ascontiguousarray(w_ohwi.transpose(0, 3, 1, 2))).to(sides.tdev)
        k = w_ohwi.shape[1]
        xcl = xt.contiguous(memory_format=torch.channels_last)
        wcl = wt.contiguous(memory_format=torch.channels_last)
        fns = {key: sides.mlx_fn(f) for key, f in mlx_forms.items()}
        fns["torch"] = sides.torch_fn(lambda: F.conv2d(xt, wt, padding=k // 2, groups=groups))
        fns["torch_cl"] = sides.torch_fn(lambda: F.conv2d(xcl, wcl, padding=k // 2, groups=groups))
        ref = _np(fns["torch"]()).transpose(0, 2, 3, 1)
        rel = max(_rel(_np(f()), ref) for key, f in mlx_forms.items())
        rows.append(_row(sides, "op", label, "float32", "x".join(map(str, x.shape)), rel, fns))

    # Grouped 1x1 (LiteMLA's aggregation): batched matmul (ours) vs MLX's grouped conv.
    for shape, g in (((n, 14 // r, 14 // r, 768), 24), ((n, 7, 7, 1536), 48)):
        x, c = arr(*shape), shape[-1]
        gp = layers.GroupedPointwise(c, c, g)
        w = np.asarray(gp.weight)
        xm = mx.array(x)
        conv_case(f"grouped1x1 g{g}", x, w, g, {"mlx": lambda: gp(xm),
                                                "mlx_conv2d": lambda: mx.conv2d(xm, gp.weight, groups=g)})
    # Depthwise: MLX's kernel (ours on the GPU) vs the CPU path's shifted sums.
    for shape, k in (((n, 56 // r, 56 // r, 256), 3), ((n, 28 // r, 28 // r, 1024), 3), ((n, 14 // r, 14 // r, 768), 5)):
        x, c = arr(*shape), shape[-1]
        dw = layers.DepthwiseConv2d(c, k)
        w = np.asarray(dw.weight)
        xm = mx.array(x)
        builtin = lambda: mx.conv2d(xm, dw.weight, padding=k // 2, groups=c)  # noqa: E731
        shifted = lambda: cpu_kernels.depthwise_conv2d(xm, dw.weight, 1, dw.STRIDED_VIEW_MAX,  # noqa: E731
                                                       dw.TAPS_PER_KERNEL)
        forms = {"mlx": builtin, "mlx_shifted": shifted} if use_native() else {"mlx": shifted, "mlx_conv2d": builtin}
        conv_case(f"depthwise {k}x{k}", x, w, c, forms)
    # 1x1: matmul (ours: nn.Linear / layers.Conv2d) vs mx.conv2d.
    for shape, o in (((n, 28 // r, 28 // r, 128), 512), ((n, 14 // r, 14 // r, 256), 1024)):
        x, c = arr(*shape), shape[-1]
        w = (arr(o, 1, 1, c) / math.sqrt(c)).astype(np.float32)
        xm, wm = mx.array(x), mx.array(w)
        conv_case(f"1x1 {c}->{o}", x, w, 1, {"mlx": lambda: xm @ wm.reshape(o, c).T,
                                             "mlx_conv2d": lambda: mx.conv2d(xm, wm)})
    # LiteMLA's ReLU linear attention core: row-sum normaliser (ours) vs the padded-ones column.
    b, heads, tokens, d = (n, 16, 196, 16) if not quick else (4, 8, 196, 16)
    q, k, v = (mx.array(np.maximum(arr(b, heads, tokens, d), 0)) for _ in range(3))

    def ones_form():
        kv = k.swapaxes(-1, -2) @ mx.concatenate([v, mx.ones(v.shape[:-1] + (1,))], axis=-1)
        out = q @ kv
        return out[..., :-1] / (out[..., -1:] + 1e-15)

    tq, tk, tv = (torch.from_numpy(np.asarray(t)).to(sides.tdev) for t in (q, k, v))

    def torch_ones():
        vp = F.pad(tv, (0, 1), mode="constant", value=1.0)
        out = tq @ (tk.transpose(-1, -2) @ vp)
        return out[..., :-1] / (out[..., -1:] + 1e-15)

    fns = {"mlx": sides.mlx_fn(lambda: layers.linear_attention(q, k, v, 1e-15)),
           "mlx_ones": sides.mlx_fn(ones_form), "torch": sides.torch_fn(torch_ones)}
    rel = max(_rel(_np(f()), _np(fns["torch"]())) for f in (fns["mlx"], fns["mlx_ones"]))
    rows.append(_row(sides, "op", "relu linear attention", "float32", f"{b}x{heads}x{tokens}x{d}", rel, fns))
    # SAM decoder: 2x2 stride-2 transposed conv (built-in) vs one GEMM + pixel shuffle; attention core.
    up = ConvTranspose2x2(256, 64)
    s = 64 // r
    x = mx.array(arr(1, s, s, 256))
    w = up.weight

    def gemm_shuffle():
        y = (x.reshape(-1, 256) @ w.transpose(3, 1, 2, 0).reshape(256, 4 * 64)).reshape(1, s, s, 2, 2, 64)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(1, 2 * s, 2 * s, 64)

    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(sides.tdev)
    tw = torch.from_numpy(np.asarray(w).transpose(3, 0, 1, 2).copy()).to(sides.tdev)  # (I, O, kh, kw)
    fns = {"mlx": sides.mlx_fn(lambda: up(x)), "mlx_convT": sides.mlx_fn(lambda: mx.conv_transpose2d(x, w, stride=2)),
           "torch": sides.torch_fn(lambda: F.conv_transpose2d(tx, tw, stride=2))}
    ref = _np(fns["torch"]()).transpose(0, 2, 3, 1)
    rel = max(_rel(_np(f()), ref) for f in (fns["mlx"], fns["mlx_convT"], sides.mlx_fn(gemm_shuffle)))
    rows.append(_row(sides, "op", "convT 2x2 s2", "float32", f"1x{s}x{s}x256->64", rel, fns))
    qa, ka, va = mx.array(arr(4, 8, 4096, 16)), mx.array(arr(1, 8, 7, 16)), mx.array(arr(1, 8, 7, 16))
    scale = 0.25

    def softmax_form():
        return mx.softmax((qa * scale) @ ka.swapaxes(-1, -2), axis=-1) @ va

    tqa, tka, tva = (torch.from_numpy(np.asarray(t)).to(sides.tdev) for t in (qa, ka, va))
    fns = {"mlx": sides.mlx_fn(lambda: attention_core(qa, ka, va)), "mlx_softmax_builtin": sides.mlx_fn(softmax_form),
           "torch": sides.torch_fn(lambda: F.scaled_dot_product_attention(tqa, tka.expand(4, -1, -1, -1),
                                                                          tva.expand(4, -1, -1, -1)))}
    rel = max(_rel(_np(f()), _np(fns["torch"]())) for f in (fns["mlx"], fns["mlx_softmax_builtin"]))
    rows.append(_row(sides, "op", "sam image->token attn", "float32", "4x8x4096x16 / 7 keys", rel, fns))
    return rows


# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--quick", action="store_true", help="small batches and images (CI, any machine)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--repeats", type=int, default=None, help="timed bursts per side (default 5, quick 3)")
    p.add_argument("--burst", type=float, default=None, help="seconds per burst (default 0.3; quick: one call per burst)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = sorted(set(cases) - set(CASES))
    if bad:
        p.error(f"unknown case(s) {', '.join(bad)}; choose from {', '.join(CASES)}")
    import torch

    if args.device == "gpu" and (not mx.is_available(mx.gpu) or not torch.cuda.is_available()):
        print("gpu_bench: --device gpu needs MLX's GPU device (mlx[cuda13] or mlx[cuda]) and a CUDA torch; "
              "use --device cpu for a smoke run", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if args.quick else 5)
    burst = args.burst if args.burst is not None else (0.0 if args.quick else 0.3)
    sides = Sides(args.device, repeats, burst, min_calls=1 if args.quick else 2)
    print(json.dumps(sides.info), flush=True)
    start = time.perf_counter()
    rows: list[dict] = []

    def write(total: float) -> None:
        if args.json:
            tmp = f"{args.json}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"settings": sides.info, "quick": args.quick, "seconds": total, "rows": rows}, f, indent=1)
            os.replace(tmp, args.json)

    for case in cases:  # the JSON is rewritten after each case, so a run cut short keeps what it measured
        mx.clear_cache()  # each case starts from an empty MLX buffer cache
        try:
            rows += {"ops": run_ops, "cls": run_cls, "seg": run_seg, "sam": run_sam}[case](sides, args.quick)
        except Exception as exc:  # one broken case does not lose the others' rows
            print(f"{case}: failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"case": case, "name": case, "agree": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
        write(time.perf_counter() - start)
    total = time.perf_counter() - start
    disagree = [r["name"] for r in rows if not r["agree"]]
    print(f"{len(rows)} rows in {total:.0f} s; disagreeing: {', '.join(disagree) or 'none'}")
    write(total)
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
