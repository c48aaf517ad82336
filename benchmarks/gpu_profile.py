#!/usr/bin/env python
"""Where a model's time goes on MLX's device, op by op and block by block, beside PyTorch's kernel profile.

    python benchmarks/gpu_profile.py --json gpu_profile.json                  # on the GPU machine, ~1 min
    python benchmarks/gpu_profile.py --device cpu --quick                     # smoke run, any machine

For each case (default: B1 and L1 at batch 256, seg-L2 at 1024x2048, SAM-XL1's
image encoder at 1024; ``--quick``: tiny sizes) it

1. times the whole model as users run it (BatchNorm folded, ``mx.compile``);
2. runs it once eagerly while recording every call of the leaf ops (1x1 as
   ``nn.Linear``, ``layers.Conv2d``/``nn.Conv2d``, depthwise, grouped 1x1,
   linear attention) and of the blocks (``MBConv``, ``FusedMBConv``,
   ``LiteMLA``, ...), with their inputs;
3. times each recorded call on its own (leaf ops eager, blocks compiled),
   medians, and sums them per kind and shape. Leaf totals show which
   formulation dominates; the gap between the block sums and the whole model
   is launch overhead and glue;
4. on a CUDA machine, profiles the same architecture in PyTorch eager (timm /
   the original code, NCHW and channels-last) and lists its top kernels, so
   each MLX op kind can be set beside cuDNN's and cuBLAS's time for it.

Random weights: timing does not depend on them. Prints tables; ``--json``
writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import mlx_evit  # noqa: F401  (BLAS set-up before mlx.core)
import mlx.core as mx
import mlx.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

CASES = {  # name: (registry model, input NHWC, timm / upstream builder for the torch profile)
    "b1_256": ("efficientvit_b1", (256, 224, 224, 3), "timm:efficientvit_b1"),
    "l1_256": ("efficientvit_l1", (256, 224, 224, 3), "timm:efficientvit_l1"),
    "seg_l2": ("efficientvit_seg_l2_cityscapes", (1, 1024, 2048, 3), "seg:efficientvit_seg_l2_cityscapes"),
    "sam_xl1": ("efficientvit_sam_xl1", (1, 1024, 1024, 3), "sam:xl1"),
}
QUICK = {"b1_256": (2, 64, 64, 3), "l1_256": (2, 64, 64, 3), "seg_l2": (1, 64, 128, 3), "sam_xl1": (1, 128, 128, 3)}


def median_ms(fn, reps: int = 5, min_time: float = 0.02) -> float:
    """Median over ``reps`` bursts of the time per call (each burst at least ``min_time`` s)."""
    for _ in range(2):
        mx.eval(fn())
    mx.synchronize()
    out = []
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            mx.eval(fn())
            n += 1
            mx.synchronize()
            if time.perf_counter() - t0 >= min_time:
                break
        out.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(out)


def _describe(args) -> str:
    return " ".join("x".join(map(str, a.shape)) for a in args if isinstance(a, mx.array))


def record_calls(model: nn.Module, x: mx.array):
    """One eager forward; returns ``(leaves, blocks)``: lists of ``(kind, shape text, fn)`` to time."""
    from mlx_evit.models import mit, sam_model
    from mlx_evit.models.seg_model import SegHead
    from mlx_evit.ops import layers

    leaves, blocks = [], []
    patched = []
    depth = {"block": 0}

    def patch(owner, attr, kind, sink, block=False):
        original = getattr(owner, attr)
        is_method = isinstance(owner, type)

        def wrapper(*args, **kwargs):
            if block and depth["block"]:
                return original(*args, **kwargs)
            arrays = args[1:] if is_method else args
            text = _describe(arrays)
            if is_method:
                w = getattr(args[0], "weight", None)
                text += f" w{'x'.join(map(str, w.shape))}" if isinstance(w, mx.array) else ""
                mod = args[0]
                if block:
                    sink.append((kind, text, mx.compile(lambda *a, m=mod, f=original: f(m, *a)), list(arrays)))
                else:
                    sink.append((kind, text, (lambda *a, m=mod, f=original: f(m, *a)), list(arrays)))
            else:
                sink.append((kind, text, original, list(args)))
            if block:
                depth["block"] += 1
            try:
                return original(*args, **kwargs)
            finally:
                if block:
                    depth["block"] -= 1

        setattr(owner, attr, wrapper)
        patched.append((owner, attr, original))

    leaf_kinds = [(nn.Linear, "1x1 (Linear)"), (layers.Conv2d, "conv kxk"), (layers.DepthwiseConv2d, "depthwise")]
    try:
        for cls, kind in leaf_kinds:
            patch(cls, "__call__", kind, leaves)
        # LiteMLA calls GroupedPointwise.per_group directly (its __call__ goes through it too).
        patch(layers.GroupedPointwise, "per_group", "grouped1x1", leaves)
        patch(mit, "linear_attention", "linear attention", leaves)
        for cls, kind in ((mit.DSConv, "DSConv"), (mit.ResBlock, "ResBlock"), (mit.MBConv, "MBConv"),
                          (mit.FusedMBConv, "FusedMBConv"), (mit.LiteMLA, "LiteMLA"),
                          (mit.ClassifierHead, "ClassifierHead"), (sam_model.SamNeck, "SamNeck")):
            patch(cls, "__call__", kind, blocks, block=True)
        patch(SegHead, "__call__", "SegHead", blocks, block=True)
        mx.eval(model(x))
    finally:
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)
    return leaves, blocks


def summarise(calls) -> list[dict]:
    totals: dict[tuple[str, str], list[float]] = defaultdict(list)
    for kind, text, fn, args in calls:
        ms = median_ms(lambda: fn(*args), reps=3, min_time=0.01)
        totals[(kind, text)].append(ms)
    rows = [{"kind": k, "shapes": s, "calls": len(v), "ms": sum(v)} for (k, s), v in totals.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def by_kind(rows) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for r in rows:
        out[r["kind"]] += r["ms"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def build_mlx(case: str, shape):
    from mlx_evit.models.registry import build_model
    from mlx_evit.ops.layers import fuse_modules

    name = CASES[case][0]
    kwargs = {"image_size": shape[1]} if case.startswith("sam") else {}
    model = build_model(name, **kwargs).eval()
    fuse_modules(model)
    mx.eval(model.parameters())
    if case.startswith("sam"):
        return model.image_encoder
    return model


def torch_profile(case: str, shape, top: int = 14) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    spec = CASES[case][2]
    kind, name = spec.split(":")
    if kind == "timm":
        import timm

        tm = timm.create_model(name, pretrained=False)
    elif kind == "seg":
        import torch_seg

        tm = torch_seg.build(name)
    else:
        import sam_bench
        from efficientsam.models.efficientvit import sam as upstream

        tm = getattr(upstream, sam_bench.UPSTREAM[name])().image_encoder
    tm = tm.eval().cuda()
    x = torch.randn(shape[0], shape[3], shape[1], shape[2], device="cuda")
    out = {}
    for layout in ("nchw", "channels_last"):
        m, xi = tm, x
        if layout == "channels_last":
            m = tm.to(memory_format=torch.channels_last)
            xi = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(3):
                m(xi)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                m(xi)
            torch.cuda.synchronize()
            whole = (time.perf_counter() - t0) / 5 * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                m(xi)
                torch.cuda.synchronize()
        events = []
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t:
                events.append({"kernel": e.key[:90], "calls": e.count, "ms": t / 1e3})
        events.sort(key=lambda r: -r["ms"])
        out[layout] = {"whole_ms": whole, "kernels": events[:top]}
    return out


def run_case(case: str, quick: bool, gpu: bool) -> dict:
    shape = QUICK[case] if quick else CASES[case][1]
    model = build_mlx(case, shape)
    x = mx.random.normal(shape)
    compiled = mx.compile(lambda t: model(t))
    whole = median_ms(lambda: compiled(x))
    eager = median_ms(lambda: model(x), reps=3)
    leaves, blocks = record_calls(model, x)
    leaf_rows, block_rows = summarise(leaves), summarise(blocks)
    result = {"case": case, "shape": list(shape), "mlx_compiled_ms": whole, "mlx_eager_ms": eager,
              "leaf_by_kind": by_kind(leaf_rows), "block_by_kind": by_kind(block_rows),
              "leaves": leaf_rows[:25], "blocks": block_rows[:25]}
    print(f"\n== {case} {shape}: MLX compiled {whole:.2f} ms, eager {eager:.2f} ms", flush=True)
    print("  leaf ops (eager, each alone):  " + ", ".join(f"{k} {v:.2f}" for k, v in result["leaf_by_kind"].items()))
    print("  blocks (compiled, each alone): " + ", ".join(f"{k} {v:.2f}" for k, v in result["block_by_kind"].items()))
    for r in leaf_rows[:12]:
        print(f"    {r['ms']:8.2f} ms  {r['calls']:3d}x {r['kind']:22s} {r['shapes']}")
    if gpu:
        try:
            result["torch"] = torch_profile(case, shape)
            for layout, prof in result["torch"].items():
                print(f"  torch {layout}: {prof['whole_ms']:.2f} ms")
                for k in prof["kernels"][:8]:
                    print(f"    {k['ms']:8.2f} ms  {k['calls']:4d}x {k['kernel']}")
        except Exception as exc:  # the MLX profile stands on its own
            result["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
            print("  torch profile failed:", result["torch_error"])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--json")
    args = p.parse_args(argv)
    gpu = args.device == "gpu"
    if gpu and not mx.is_available(mx.gpu):
        print("gpu_profile: MLX has no GPU device here; use --device cpu", file=sys.stderr)
        return 2
    mx.set_default_device(mx.gpu if gpu else mx.cpu)
    results = {"device": str(mx.default_device()), "MLX_ENABLE_TF32": os.environ.get("MLX_ENABLE_TF32"),
               "MLX_EVIT_KERNELS": os.environ.get("MLX_EVIT_KERNELS"), "cases": []}
    for case in args.cases.split(","):
        try:
            results["cases"].append(run_case(case, args.quick, gpu))
        except Exception as exc:
            results["cases"].append({"case": case, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{case}: failed: {type(exc).__name__}: {exc}", flush=True)
        if args.json:
            tmp = f"{args.json}.tmp"
            Path(tmp).write_text(json.dumps(results, indent=1))
            os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
