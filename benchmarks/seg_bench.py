"""EfficientViT-Seg speed and memory: mlx_evit beside the same architecture in PyTorch eager, one run.

    python benchmarks/seg_bench.py                      # seg-B0 and seg-B1, 512x1024 and 1024x2048, batch 1
    python benchmarks/seg_bench.py --models b0 --sizes 512x1024 --repeats 3 --json out.json

Both sides get the same synthetic weights (the fixtures' generator) and the
same input, and are first checked to give the same logits. Every
measurement runs in a fresh process with the same threads
(``OMP/OPENBLAS/MKL_NUM_THREADS`` and ``torch.set_num_threads``); the timing
processes alternate between the sides (``--rounds``), so that both see the
same machine load, and never share a process (idle BLAS/OpenMP threads of
one library spin and slow the other down). Per configuration:

* ``forward``: median seconds of the stride-8 logits (mlx_evit: the
  Segmenter's inference path, :func:`mlx_evit.tasks.inference.prepare`, BatchNorms
  folded and compiled, high-resolution blocks in bands of rows; PyTorch: the model in eval mode under ``torch.inference_mode``);
* ``labels``: forward + bicubic resize of the logits to the input size +
  argmax (mlx_evit: :func:`mlx_evit.ops.resampling.resize_argmax`, banded; PyTorch:
  ``F.interpolate`` + ``argmax``), what a user of the original code runs;
* ``peak_mb``: peak resident memory growth of one forward call over the
  process before it (Linux ``VmHWM`` after resetting it), and for MLX also
  ``mx.get_peak_memory()`` (its arrays; the RSS also holds MLX's buffer
  cache, up to ``mlx_evit.tasks.segmenter.CACHE_LIMIT``).

The PyTorch model is ``benchmarks/torch_seg.py`` (ours; the original code is
not installable), checked against the original code's fixtures by
``tests/test_seg_torch_reference.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"b0": "efficientvit_seg_b0_cityscapes", "b1": "efficientvit_seg_b1_cityscapes"}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _trim() -> None:
    """``malloc_trim(0)``: return the C heap's free pages to the system (glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: ``5 > /proc/self/clear_refs``); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    """Peak RSS since the last :func:`_reset_peak` (VmHWM), else over the process' life (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _state_dict(name: str):
    sys.path.insert(0, str(ROOT / "tests"))
    import synthetic

    return synthetic.state_dict(synthetic.all_shapes()[name.replace("_", "-")])


def _input(h: int, w: int):
    import numpy as np

    return np.random.default_rng(0).standard_normal((1, h, w, 3)).astype(np.float32)


def _build(side: str, name: str, h: int, w: int, threads: int):
    """(forward, labels) callables of one side for a ``(1, h, w, 3)`` input; both return evaluated results."""
    import numpy as np

    sd = _state_dict(name)
    x = _input(h, w)
    if side == "torch":
        import torch

        sys.path.insert(0, str(ROOT / "benchmarks"))
        import torch_seg

        torch.set_num_threads(threads)
        model = torch_seg.build(name).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

        def forward():
            with torch.inference_mode():
                return model(xt)

        def labels():
            with torch.inference_mode():
                y = torch.nn.functional.interpolate(model(xt), size=(h, w), mode="bicubic", align_corners=False)
                return y.argmax(1)

        return forward, labels
    import mlx.core as mx

    import mlx_evit  # noqa: F401  (BLAS set-up before mlx.core work)
    from mlx_evit.tasks.inference import prepare
    from mlx_evit.models.registry import build_model
    from mlx_evit.ops.resampling import resize_argmax
    from mlx_evit.tasks.segmenter import CACHE_LIMIT
    from mlx_evit.models.keymap import load_state_dict

    model = build_model(name)
    load_state_dict(model, sd)
    predictor = prepare(model, compile=True, cache_limit=CACHE_LIMIT)  # as a Segmenter, compiled from the start
    xm = mx.array(x)

    def forward():
        y = predictor(xm)
        mx.eval(y)
        return y

    def labels():
        return resize_argmax(predictor(xm), (h, w))

    return forward, labels


def memory_worker(side: str, name: str, h: int, w: int, threads: int) -> dict:
    """Peak memory of one configuration in a fresh process: RSS growth over the built model, MLX's peak."""
    import gc

    forward, labels = _build(side, name, h, w, threads)
    forward()  # MLX: compile and tune first; both: then measure one clean call
    if side == "mlx":
        import mlx.core as mx

        mx.clear_cache()
        mx.reset_peak_memory()
    gc.collect()
    _trim()  # freed heap pages back to the system: both sides allocate their activations anew
    base = _rss_mb()
    _reset_peak()
    forward()
    out = {"side": side, "model": name, "size": [h, w], "peak_growth_mb": _peak_mb() - base, "base_rss_mb": base}
    if side == "mlx":
        out["mlx_peak_mb"] = mx.get_peak_memory() / 2**20
    return out


def time_worker(side: str, name: str, h: int, w: int, repeats: int, threads: int) -> dict:
    """Seconds per call of one side in this process (after two warm-up calls of each kind)."""
    fns = dict(zip(("forward", "labels"), _build(side, name, h, w, threads)))
    out = {}
    for label, fn in fns.items():
        fn()  # warm-up: MLX compiles and tunes; both fault in their buffers
        fn()
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        out[label] = runs
    return out


def check_equal(name: str) -> float:
    """max |mlx - torch| / max |torch| of the logits at 128x256 (same weights, same input)."""
    import mlx.core as mx
    import numpy as np
    import torch

    import mlx_evit  # noqa: F401
    from mlx_evit.models.registry import build_model
    from mlx_evit.models.keymap import load_state_dict

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch_seg

    sd = _state_dict(name)
    x = _input(128, 256)
    ref = torch_seg.build(name).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    with torch.inference_mode():
        want = ref(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy().transpose(0, 2, 3, 1)
    model = build_model(name)
    load_state_dict(model, sd)
    model.eval().fuse()
    got = np.asarray(model(mx.array(x)))
    return float(np.abs(got - want).max() / np.abs(want).max())


def _spawn(worker_args: list, args: argparse.Namespace) -> dict:
    """Run one worker in a fresh process; its JSON answer."""
    proc = subprocess.run([sys.executable, __file__, "--worker", *map(str, worker_args), "--repeats",
                           str(args.repeats), "--threads", str(args.threads)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"worker {worker_args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", default=["512x1024", "1024x2048"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", metavar="FILE", help="write all measurements as JSON")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timing processes per side, alternating torch and mlx (default 2)")
    parser.add_argument("--worker", nargs=5, metavar=("KIND", "SIDE", "NAME", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, side, name, h, w = args.worker
        if kind == "memory":
            print(json.dumps(memory_worker(side, name, int(h), int(w), args.threads)))
        else:
            print(json.dumps(time_worker(side, name, int(h), int(w), args.repeats, args.threads)))
        return 0
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var) != str(args.threads):  # the BLAS libraries read them when loaded: rerun
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
                       MKL_NUM_THREADS=str(args.threads))
            return subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                                  env=env).returncode
    start = time.time()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    checks, timing, memory = {}, {}, {}
    for key in args.models:
        name = MODELS[key]
        checks[name] = check_equal(name)
        print(f"{name}: mlx_evit vs PyTorch logits at 128x256, max rel diff {checks[name]:.1e}", flush=True)
        for h, w in sizes:
            for side in ("torch", "mlx"):
                memory[(name, h, w, side)] = _spawn(["memory", side, name, h, w], args)
            runs = {side: {"forward": [], "labels": []} for side in ("torch", "mlx")}
            for _ in range(args.rounds):  # separate processes, one side after the other
                for side in ("torch", "mlx"):
                    for label, values in _spawn(["time", side, name, h, w], args).items():
                        runs[side][label] += values
            timing[(name, h, w)] = {
                side: {label: {"median_s": float(statistics.median(v)), "min_s": float(min(v)), "runs": v}
                       for label, v in r.items()} for side, r in runs.items()}
            t = timing[(name, h, w)]
            print(f"  {h}x{w}: torch {t['torch']['forward']['median_s']:.3f} s, "
                  f"mlx {t['mlx']['forward']['median_s']:.3f} s", flush=True)

    print(f"\n{platform.machine()}, {os.cpu_count()} cores, threads {args.threads}, batch 1, median of "
          f"{args.rounds} x {args.repeats} calls (fresh processes, sides alternating); wall {time.time() - start:.0f} s")
    print(f"{'model':<31} {'size':>9} | {'forward torch':>13} {'mlx':>6} {'ratio':>6} | {'labels torch':>12} "
          f"{'mlx':>6} {'ratio':>6} | {'peak MB torch':>13} {'mlx':>5} {'(MLX arrays)':>12}")
    for key in args.models:
        name = MODELS[key]
        for h, w in sizes:
            t = timing[(name, h, w)]
            mt, mm = memory[(name, h, w, "torch")], memory[(name, h, w, "mlx")]
            tf, mf = t["torch"]["forward"]["median_s"], t["mlx"]["forward"]["median_s"]
            tl, ml = t["torch"]["labels"]["median_s"], t["mlx"]["labels"]["median_s"]
            print(f"{name:<31} {f'{h}x{w}':>9} | {tf:13.3f} {mf:6.3f} {tf / mf:5.2f}x | {tl:12.3f} {ml:6.3f} "
                  f"{tl / ml:5.2f}x | {mt['peak_growth_mb']:13.0f} {mm['peak_growth_mb']:5.0f} "
                  f"{mm['mlx_peak_mb']:12.0f}")
            tf0, mf0 = t["torch"]["forward"]["min_s"], t["mlx"]["forward"]["min_s"]
            print(f"{'':<31} {'(fastest)':>9} | {tf0:13.3f} {mf0:6.3f} {tf0 / mf0:5.2f}x |")
        if len(sizes) >= 2:
            (h0, w0), (h1, w1) = sizes[0], sizes[-1]
            lo, hi = timing[(name, h0, w0)], timing[(name, h1, w1)]
            for side in ("torch", "mlx"):
                m0, m1 = memory[(name, h0, w0, side)], memory[(name, h1, w1, side)]
                mem = f"peak memory x{m1['peak_growth_mb'] / max(m0['peak_growth_mb'], 1e-9):.2f}"
                if side == "mlx":
                    mem += f" (MLX arrays x{m1['mlx_peak_mb'] / m0['mlx_peak_mb']:.2f})"
                print(f"  {side:<5} {h0}x{w0} -> {h1}x{w1}: forward time "
                      f"x{hi[side]['forward']['median_s'] / lo[side]['forward']['median_s']:.2f}, labels "
                      f"x{hi[side]['labels']['median_s'] / lo[side]['labels']['median_s']:.2f}, {mem}")
    if args.json:
        record = {
            "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "threads": args.threads},
            "repeats": args.repeats, "checks": checks,
            "timing": [{"model": n, "size": [h, w], **v} for (n, h, w), v in timing.items()],
            "memory": list(memory.values()),
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
