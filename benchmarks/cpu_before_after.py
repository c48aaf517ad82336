#!/usr/bin/env python
"""The CPU path before and after a change, on this machine, in one run: ops and whole models, alternating.

    git archive <base-commit> mlx_evit | tar -x -C /tmp/base        # the "before" package
    python benchmarks/cpu_before_after.py --base /tmp/base --json cpu_before_after.json

Every measurement runs in a fresh process (``PYTHONPATH`` = the base folder
or this checkout), with MLX's CPU device and the package's default kernels
(``auto`` = the CPU formulations); processes alternate before/after for
``--rounds`` rounds, so both see the same machine load. Reported: median ms
per call of each side over all rounds and the ratio before/after (> 1:
the change is faster).

Cases: ``op`` LiteMLA (B1 stage 3 and 4 shapes at batch 8, SAM-L stage 4
at 1x32x32x512), compiled; ``model``: efficientvit_b1 and _m4 at 224,
batch 1 and 4, and efficientvit_l1 at batch 1, through
``mlx_evit.tasks.inference.prepare`` (fused, compiled, one stream), and
seg-B1 at 512x1024 the same way; ``sam``: SAM-L0's image encoder at 512
(fused, compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = (
    ("op", "litemla", (8, 14, 14, 128), 16),
    ("op", "litemla", (8, 7, 7, 256), 16),
    ("op", "litemla", (1, 32, 32, 512), 32),
    ("model", "efficientvit_b1", (1, 224, 224, 3), None),
    ("model", "efficientvit_b1", (4, 224, 224, 3), None),
    ("model", "efficientvit_m4", (1, 224, 224, 3), None),
    ("model", "efficientvit_m4", (4, 224, 224, 3), None),
    ("model", "efficientvit_l1", (1, 224, 224, 3), None),
    ("model", "efficientvit_seg_b1_cityscapes", (1, 512, 1024, 3), None),
    ("sam", "efficientvit_sam_l0", (1, 512, 512, 3), None),
)


def worker(kind: str, name: str, shape: tuple, dim, repeats: int) -> float:
    import mlx_evit  # noqa: F401  (BLAS set-up before mlx.core)
    import mlx.core as mx
    import numpy as np

    mx.set_default_device(mx.cpu)
    mx.random.seed(0)
    x = mx.array(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    if kind == "op":
        from mlx_evit.models.mit import LiteMLA

        layer = LiteMLA(shape[-1], dim, 1e-5, 1e-5)
        layer.eval()
        mx.eval(layer.parameters())
        fn = mx.compile(layer)
    elif kind == "sam":  # the image encoder, BatchNorm folded, compiled (what SamPredictor.set_image runs)
        from mlx_evit.models.registry import build_model

        model = build_model(name).eval()
        model.fuse()
        mx.eval(model.parameters())
        fn = mx.compile(model.image_encoder)
    else:
        from mlx_evit.models.registry import build_model
        from mlx_evit.tasks.inference import prepare

        fn = prepare(build_model(name), compile=True, streams=1)
    for _ in range(3):
        mx.eval(fn(x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn(x))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=False, help="folder holding the 'before' mlx_evit package")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--only", default="", help="run the cases whose kind or name contains one of these (comma-separated)")
    p.add_argument("--json")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, name, shape, dim = args.worker
        print(worker(kind, name, tuple(int(s) for s in shape.split(",")), None if dim == "-" else int(dim),
                     args.repeats))
        return 0
    if not args.base:
        p.error("--base is required")
    sides = {"before": str(Path(args.base).resolve()), "after": str(ROOT)}
    rows = []
    wanted = [w for w in args.only.split(",") if w]
    for kind, name, shape, dim in CASES:
        if wanted and not any(w in kind or w in name for w in wanted):
            continue
        ms: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(args.rounds):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                env = dict(os.environ, PYTHONPATH=sides[side])
                env.pop("MLX_EVIT_KERNELS", None)
                out = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--worker", kind, name,
                                      ",".join(map(str, shape)), "-" if dim is None else str(dim)],
                                     env=env, capture_output=True, text=True, cwd="/")
                if out.returncode:
                    raise SystemExit(f"{side} {name}: {out.stderr[-1500:]}")
                ms[side].append(float(out.stdout.split()[-1]))
        row = {"kind": kind, "name": name, "shape": shape, "before_ms": statistics.median(ms["before"]),
               "after_ms": statistics.median(ms["after"]), "runs": ms}
        row["before_over_after"] = row["before_ms"] / row["after_ms"]
        rows.append(row)
        print(f"{kind:5s} {name:16s} {'x'.join(map(str, shape)):14s} before {row['before_ms']:9.2f} ms  after "
              f"{row['after_ms']:9.2f} ms  before/after {row['before_over_after']:.2f}", flush=True)
    if args.json:
        tmp = f"{args.json}.tmp{os.getpid()}"
        Path(tmp).write_text(json.dumps({"rows": rows, "rounds": args.rounds, "repeats": args.repeats}, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
