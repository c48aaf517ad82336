#!/usr/bin/env python
"""GEMM speed of each BLAS route behind MLX's CPU backend (Linux), beside numpy and torch.

    python benchmarks/blas_gemm.py                    # 1024^3 float32, 2 threads, 5 rounds
    python benchmarks/blas_gemm.py --size 512 --threads 1 --rounds 3 --json gemm.json

Every route runs in its own fresh process (the BLAS binding is per process),
the routes in rotating order, ``--rounds`` times; each process times
``--calls`` GEMMs after two warm-ups and reports its median. Reported per
route: the median over rounds (GFLOP/s), the spread, the library, the
OpenBLAS core and how MLX was bound (``preload``: loaded before
``mlx.core``; ``got``: libmlx's GOT entries rewritten; ``-``: MLX's own).
Results are only comparable within one run: other processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, os, sys, time
size, calls, kind, order = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def timed(fn):
    for _ in range(2):
        fn()
    ts = []
    for _ in range(calls):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return 2 * size ** 3 / sorted(ts)[len(ts) // 2] / 1e9
info = {}
if kind == "mlx":
    if order == "mlx-first":
        import mlx.core
    import mlx_evit
    from mlx_evit.ops import blas as _blas
    import mlx.core as mx
    a = mx.random.normal((size, size)); b = mx.random.normal((size, size)); mx.eval(a, b)
    gflops = timed(lambda: mx.eval(a @ b))
    st = _blas.info()
    info = {"library": os.path.basename(st.library) if st.library else "mlx-cpu reference BLAS",
            "core": st.core, "detected_core": st.detected_core, "route": st.route or "-"}
elif kind == "numpy":
    import numpy as np
    a = np.random.standard_normal((size, size)).astype(np.float32); b = a.copy()
    gflops = timed(lambda: a @ b)
    cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    info = {"library": f"numpy's {cfg.get('name')} {cfg.get('version')}", "route": "-"}
else:
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    a = torch.randn(size, size); b = torch.randn(size, size)
    with torch.inference_mode():
        gflops = timed(lambda: a @ b)
    info = {"library": f"torch {torch.__version__}", "route": "-"}
print(json.dumps(dict(info, gflops=gflops)))
"""

# name: (worker kind, import order, environment)
ROUTES = {
    "mlx reference BLAS (MLX_EVIT_BLAS=0)": ("mlx", "evit-first", {"MLX_EVIT_BLAS": "0"}),
    "system OpenBLAS, its own core (before)": ("mlx", "evit-first",
                                               {"MLX_EVIT_BLAS": "system", "MLX_EVIT_BLAS_CORETYPE": "keep"}),
    "system OpenBLAS, core from CPU features": ("mlx", "evit-first", {"MLX_EVIT_BLAS": "system"}),
    "system OpenBLAS, mlx.core imported first": ("mlx", "mlx-first", {"MLX_EVIT_BLAS": "system"}),
    "scipy-openblas32 (pip, blas extra)": ("mlx", "evit-first", {"MLX_EVIT_BLAS": "pip"}),
    "scipy-openblas32, mlx.core imported first": ("mlx", "mlx-first", {"MLX_EVIT_BLAS": "pip"}),
    "numpy (its bundled OpenBLAS, ILP64)": ("numpy", "-", {}),
    "torch": ("torch", "-", {}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--routes", help="comma-separated substrings of route names (default: all)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    routes = {k: v for k, v in ROUTES.items()
              if not args.routes or any(s.strip() in k for s in args.routes.split(","))}
    base = {k: v for k, v in os.environ.items()
            if k not in ("MLX_EVIT_BLAS", "MLX_EVIT_BLAS_CORETYPE", "OPENBLAS_CORETYPE")}
    base.update({name: str(args.threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    results: dict[str, list[float]] = {k: [] for k in routes}
    info: dict[str, dict] = {}
    names = list(routes)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
            kind, order, env = routes[name]
            calls = 1 if "reference" in name else args.calls
            out = subprocess.run([sys.executable, "-c", WORKER, str(args.size), str(calls), kind, order],
                                 env=dict(base, **env), capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                info.setdefault(name, {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"})
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(row.pop("gflops"))
            info[name] = row  # a successful run's description replaces an earlier failure's
    load = os.getloadavg()[0]
    print(f"{args.size}^3 float32 GEMM, {args.threads} threads, {args.rounds} rounds, load average {load:.1f}\n")
    print(f"| route | GFLOP/s (median) | range | library | core | binding |\n|---|---|---|---|---|---|")
    report = []
    for name in routes:
        values, row = results[name], info.get(name, {})
        if not values:
            print(f"| {name} | - | - | {row.get('error', 'not run')} | | |")
            continue
        med = statistics.median(values)
        core = row.get("core") or "-"
        if row.get("detected_core") and row.get("detected_core") != row.get("core"):
            core = f"{core} (detected {row['detected_core']})"
        print(f"| {name} | {med:.1f} | {min(values):.1f}-{max(values):.1f} | {row.get('library')} | {core} | "
              f"{row.get('route')} |")
        report.append(dict(row, route_name=name, gflops_median=med, gflops=values))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "threads": args.threads, "load_average": load, "routes": report}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
