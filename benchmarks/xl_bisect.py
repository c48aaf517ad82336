#!/usr/bin/env python
"""Find the op behind the EfficientViT-SAM XL crash on CUDA with ``MLX_ENABLE_TF32=0``, in one call.

    MLX_ENABLE_TF32=0 python benchmarks/xl_bisect.py --json xl_bisect.json     # on the GPU machine, ~2 min

What it does (each run in a fresh child process, because an illegal memory
access poisons the CUDA context of the process it happens in):

1. **eager, op by op**: builds the XL image encoder (random weights, BatchNorm
   folded as the predictor does) and runs a 1024x1024 image through it
   uncompiled, evaluating and synchronising after every leaf op (Linear,
   convolutions, depthwise, grouped 1x1, LayerNorm, linear attention, neck
   resize). Each op's name, input/weight shapes and dtype go to a log
   *before* it runs, so when the child dies the last unfinished line names
   the op and its shapes.
2. **compiled, stage by stage**: if step 1 passes, the same with each
   backbone stage and the neck compiled on their own (the crash may sit in
   a fused kernel that only ``mx.compile`` creates), then the whole
   compiled encoder as :class:`mlx_evit.sam.SamPredictor` runs it.
3. **alone**: the failing op (when it is a convolution or a matmul) is rerun
   by itself through ``benchmarks/xl_crash_repro.py`` in a fresh process,
   under the current TF32 setting and with ``MLX_ENABLE_TF32=1``, to see
   whether it reproduces in isolation.

It does this for XL1 and XL0, in both kernel modes (native, cpu), and prints
and writes (``--json``) a summary: per run, passed or the failing op with its
shapes, and the reproducer's command line and outcome. Exit status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(variant: str, phase: str, log_path: str, size: str = "1024") -> None:
    """Runs in the child: one phase, logging ``START``/``OK`` around every instrumented op."""
    import mlx_evit  # noqa: F401  (BLAS set-up first)
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_evit.models import mit, sam_decoder, sam_model
    from mlx_evit.models.registry import build_model
    from mlx_evit.ops import layers

    log = open(log_path, "a", buffering=1)

    def note(text: str) -> None:
        log.write(text + "\n")
        log.flush()
        os.fsync(log.fileno())

    def describe(module, args) -> str:
        shapes = [tuple(a.shape) for a in args if isinstance(a, mx.array)]
        w = getattr(module, "weight", None) if module is not None else None
        extra = f" weight {tuple(w.shape)}" if isinstance(w, mx.array) else ""
        for attr in ("stride", "padding", "groups", "kernel_size"):
            if module is not None and hasattr(module, attr):
                extra += f" {attr}={getattr(module, attr)}"
        dtype = next((str(a.dtype) for a in args if isinstance(a, mx.array)), "")
        return f"{shapes}{extra} {dtype}"

    def instrument(cls, name: str, method: str = "__call__") -> None:
        original = getattr(cls, method)

        def call(self, *args, **kwargs):
            note(f"START {name} {describe(self, args)}")
            y = original(self, *args, **kwargs)
            mx.eval(y)
            mx.synchronize()
            note(f"OK {name}")
            return y

        setattr(cls, method, call)

    def instrument_fn(module, attr: str) -> None:
        original = getattr(module, attr)

        def fn(*args, **kwargs):
            note(f"START {attr} {describe(None, args)}")
            y = original(*args, **kwargs)
            mx.eval(y)
            mx.synchronize()
            note(f"OK {attr}")
            return y

        setattr(module, attr, fn)

    model = build_model(f"efficientvit_sam_{variant}").eval()
    model.fuse()
    mx.eval(model.parameters())
    encoder = model.image_encoder
    x = mx.random.normal((1, int(size), int(size), 3))
    note(f"BEGIN {variant} {phase} kernels={os.environ.get('MLX_EVIT_KERNELS', 'auto')} "
         f"tf32={os.environ.get('MLX_ENABLE_TF32')} device={mx.default_device()}")
    if phase == "eager":
        for cls, name in ((nn.Linear, "linear"), (layers.Conv2d, "conv2d"), (nn.Conv2d, "nn.conv2d"),
                          (layers.DepthwiseConv2d, "depthwise"), (layers.GroupedPointwise, "grouped1x1"),
                          (sam_decoder.LayerNorm, "layernorm")):
            instrument(cls, name)
        instrument(layers.GroupedPointwise, "grouped1x1 per_group", "per_group")
        instrument_fn(mit, "linear_attention")
        instrument_fn(sam_model, "resize_by_matrix")
        y = encoder(x)
    elif phase == "stages":
        h = x
        feats = []
        for i, stage in enumerate(encoder.backbone.stages):
            note(f"START compiled stage {i} input {tuple(h.shape)}")
            h = mx.compile(stage)(h)
            mx.eval(h)
            mx.synchronize()
            note(f"OK compiled stage {i}")
            feats.append(h)
        note("START compiled neck")
        y = mx.compile(lambda *f: encoder.norm(encoder.neck(list(f))))(*[feats[i] for i in encoder.neck_stages])
        mx.eval(y)
        mx.synchronize()
        note("OK compiled neck")
    else:  # the predictor's compiled encoder
        note("START compiled encoder")
        y = mx.compile(lambda t: encoder(t), inputs=model.state)(x)
        mx.eval(y)
        mx.synchronize()
        note("OK compiled encoder")
    mx.eval(mx.zeros((1 << 20,)))  # an earlier fault surfaces at the next allocation
    mx.synchronize()
    note("DONE")


def _last_unfinished(lines: list[str]) -> str | None:
    open_ops = []
    for line in lines:
        if line.startswith("START "):
            open_ops.append(line[6:])
        elif line.startswith("OK ") and open_ops:
            open_ops.pop()
    return open_ops[-1] if open_ops else None


def _repro_args(op: str) -> list[str] | None:
    """xl_crash_repro.py arguments for a logged conv2d/depthwise op, when the log holds enough to rebuild it."""
    import re

    m = re.match(r"(conv2d|nn\.conv2d|depthwise) \[\((\d+), (\d+), (\d+), (\d+)\)\] weight \((\d+), (\d+), (\d+), (\d+)\)"
                 r"(.*)", op)
    if not m:
        return None
    x = ",".join(m.group(i) for i in range(2, 6))
    w = ",".join(m.group(i) for i in range(6, 10))
    rest = m.group(10)
    stride = re.search(r"stride=\(?(\d+)", rest)
    pad = re.search(r"padding=\(?(\d+)", rest)
    k = int(m.group(7))
    groups = int(m.group(5)) if m.group(1) == "depthwise" else 1
    return ["conv", x, w, stride.group(1) if stride else "1", pad.group(1) if pad else str(k // 2), str(groups)]


def run(variant: str, phase: str, kernels: str, timeout: int, size: int = 1024) -> dict:
    env = dict(os.environ, MLX_EVIT_KERNELS=kernels, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with tempfile.NamedTemporaryFile("r", suffix=".log", delete=False) as f:
        log_path = f.name
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", variant, phase, log_path, str(size)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        rc, err = proc.returncode, proc.stderr[-2000:]
    except subprocess.TimeoutExpired:
        rc, err = "timeout", ""
    lines = Path(log_path).read_text().splitlines()
    os.unlink(log_path)
    result = {"variant": variant, "phase": phase, "kernels": kernels, "rc": rc, "passed": bool(lines and
              lines[-1] == "DONE" and rc == 0)}
    if not result["passed"]:
        result["failing_op"] = _last_unfinished(lines)
        result["stderr_tail"] = err
        args = _repro_args(result["failing_op"] or "")
        if args:
            repro = {}
            for tf32 in (os.environ.get("MLX_ENABLE_TF32", "1"), "1"):
                p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "xl_crash_repro.py"), *args],
                                   env=dict(os.environ, MLX_ENABLE_TF32=tf32), capture_output=True, text=True,
                                   timeout=timeout)
                repro[f"MLX_ENABLE_TF32={tf32}"] = "passes" if p.returncode == 0 else f"fails rc {p.returncode}"
            result["repro"] = {"command": "python benchmarks/xl_crash_repro.py " + " ".join(args), **repro}
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(*argv[1:5])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="xl1,xl0")
    p.add_argument("--kernels", default="native,cpu")
    p.add_argument("--timeout", type=int, default=120, help="seconds per child run")
    p.add_argument("--size", type=int, default=1024, help="image side (1024: the XL input; smaller for a smoke run)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    results = []
    for variant in args.variants.split(","):
        for kernels in args.kernels.split(","):
            for phase in ("eager", "stages", "encoder"):
                r = run(variant, phase, kernels, args.timeout, args.size)
                results.append(r)
                if not r["passed"]:
                    break  # later phases add nothing once an op fails eagerly
    if args.json:
        Path(args.json).write_text(json.dumps({"MLX_ENABLE_TF32": os.environ.get("MLX_ENABLE_TF32"),
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
