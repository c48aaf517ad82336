#!/usr/bin/env python
"""Throughput, memory and cold-start benchmark: mlx_evit vs timm (PyTorch eager) vs ONNX Runtime (CPU).

    python benchmarks/bench.py                          # the full plan (about 25 minutes on 2 cores)
    python benchmarks/bench.py --models efficientvit_b0,efficientvit_m0 --batch-sizes 1,16
    python benchmarks/bench.py --models efficientvit_b1 --resolutions 512,1024 --batch-sizes 1
    python benchmarks/bench.py --threads 2 --json results.json --markdown RESULTS.md

For every (model, resolution, batch) the three runtimes get the same
weights (timm's random init; for the seed model an MLX init copied into a
PyTorch port, ``torch_seed.py``) and the same images, and their logits are
compared before anything is timed. Then, in one process, they run in
alternation: warm-up calls, then ``--repeats`` rounds in which each runtime
times a burst of calls (about ``--burst`` seconds, after one untimed call
that wakes its worker threads); the round order rotates and a short pause
separates runtimes, so that load from other processes and spinning worker
threads hit all of them alike. Reported: the median over
rounds (images/s), the spread, and the load average.

* mlx_evit: its default inference path, ``mlx_evit.tasks.inference.prepare(model)``
  (BatchNorm folded, ``mx.compile``, OpenBLAS GEMMs, a batch split across two
  CPU streams when timing the first calls says it pays).
* timm: ``timm.create_model`` in eval mode under ``torch.inference_mode()``,
  NCHW, ``torch.set_num_threads(N)``.
* ONNX Runtime: the same PyTorch model exported with ``torch.onnx.export``
  (TorchScript exporter, opset 17, static shapes), CPU execution provider,
  ``intra_op_num_threads=N``, ``inter_op_num_threads=1``, all graph
  optimizations.

Threads: ``--threads N`` (default 2) sets ``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` before any library loads, torch's
intra-op threads and ORT's intra-op threads. mlx_evit's BLAS uses N threads;
when it splits a batch over its two CPU streams (one thread each; only with
N >= 2) their GEMMs share those N threads, so no runtime computes on more
than N threads at once.

Memory: each runtime runs alone in a fresh subprocess (``--memory-runs``
inferences after loading the model); the figure is the growth of the
process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` once the model is loaded) over its resident set at
that point: activations, workspaces, caches and anything the first calls
load; for mlx_evit the first calls include its trial of splitting a batch,
and its buffer cache (raised to 1 GiB by ``prepare``) keeps freed buffers
resident. mlx_evit's own allocator peak above its weights
(``mx.get_peak_memory``) is recorded too. These are CPU figures from this machine, not Apple GPU figures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

MODELS_224 = (
    "efficientvit_b0", "efficientvit_b1", "efficientvit_b2", "efficientvit_l1",
    "efficientvit_m0", "efficientvit_m4", "efficientvit_m5", "efficientvit_seed",
)
SCALING_MODELS = ("efficientvit_b1", "efficientvit_seed")
SCALING_RESOLUTIONS = (512, 1024)
PRECISION_MODELS = ("efficientvit_b1", "efficientvit_l1", "efficientvit_m4", "efficientvit_seed")
PRECISIONS = ("float32", "float16", "bfloat16", "q8", "q4")
RUNTIMES = ("mlx", "torch", "ort")
RUNTIME_TITLES = {"mlx": "mlx_evit", "torch": "timm (PyTorch eager)", "ort": "ONNX Runtime"}
SEED_NAME = "efficientvit_seed"
SEED_ARGS = {"num_classes": 1000}
WEIGHTS_SEED = 0
MIB = 2**20


@dataclass(frozen=True)
class Case:
    model: str
    res: int
    batch: int

    @property
    def key(self) -> str:
        return f"{self.model}@{self.res}x{self.batch}"


# ---------------------------------------------------------------------------
# Environment (thread counts must be set before numpy/torch/mlx load)
# ---------------------------------------------------------------------------


def set_thread_env(threads: int) -> None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def family(name: str) -> str:
    if name == SEED_NAME:
        return "seed"
    return "msra" if name.startswith("efficientvit_m") else "mit"


def proc_status() -> dict[str, int]:
    """``VmRSS``/``VmHWM`` of this process in KiB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---------------------------------------------------------------------------
# Models, weights and runtimes
# ---------------------------------------------------------------------------


def weights_path(cache: str, name: str, res: int) -> str:
    suffix = f"_{res}" if family(name) == "msra" and res != 224 else ""
    return os.path.join(cache, f"{name}{suffix}_seed{WEIGHTS_SEED}.safetensors")


def ensure_weights(cache: str, name: str, res: int) -> str:
    """Write the benchmark weights once: timm's init (timm layout) or, for the seed model, MLX's init."""
    path = weights_path(cache, name, res)
    if os.path.exists(path):
        return path
    tmp = path + ".tmp.safetensors"
    if family(name) == "seed":
        import mlx.core as mx
        from mlx_evit.models.registry import build_model

        mx.random.seed(WEIGHTS_SEED)
        model = build_model(name, **SEED_ARGS)
        model.save_weights(tmp)
    else:
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(WEIGHTS_SEED)
        model = timm_model(name, res)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return path


def timm_model(name: str, res: int):
    import timm

    extra = {"img_size": res} if family(name) == "msra" else {}
    return timm.create_model(name, pretrained=False, **extra).eval()


def load_torch(name: str, res: int, weights: str):
    """The PyTorch baseline model with the benchmark weights (eval mode)."""
    if family(name) == "seed":
        sys.path.insert(0, HERE)
        import torch_seed
        from safetensors.numpy import load_file

        from mlx_evit.models.registry import get_entry

        args = dict(get_entry(name).defaults, **SEED_ARGS)
        return torch_seed.load_mlx_weights(torch_seed.from_mlx_config(args), load_file(weights))
    from safetensors.torch import load_file

    model = timm_model(name, res)
    model.load_state_dict(load_file(weights))
    return model.eval()


def load_mlx(name: str, res: int, weights: str):
    """The MLX model with the benchmark weights (eval mode, unfused)."""
    from mlx_evit import create_model
    from mlx_evit.models.registry import build_model

    if family(name) == "seed":
        model = build_model(name, **SEED_ARGS)
        model.load_weights(weights)
        return model.eval()
    extra = {"img_size": res} if family(name) == "msra" else {}
    return create_model(name, pretrained=weights, **extra)


def onnx_path(cache: str, case: Case) -> str:
    return os.path.join(cache, f"{case.model}_{case.res}_b{case.batch}_seed{WEIGHTS_SEED}.onnx")


def ensure_onnx(cache: str, case: Case, torch_model) -> str:
    """Export the PyTorch model once per shape (static shapes: ORT's best case)."""
    import torch

    path = onnx_path(cache, case)
    if os.path.exists(path):
        return path
    x = torch.zeros(case.batch, 3, case.res, case.res)
    tmp = path + ".tmp.onnx"
    with torch.inference_mode():
        torch.onnx.export(torch_model, (x,), tmp, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"])
    os.replace(tmp, path)
    return path


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def images(case: Case):
    import numpy as np

    rng = np.random.default_rng(1234)
    return rng.standard_normal((case.batch, case.res, case.res, 3)).astype(np.float32)


def runtime_fn(runtime: str, case: Case, cache: str, threads: int, x_nhwc, torch_model=None, settle: bool = True):
    """``(call, outputs)``: a zero-argument function running one batch, and the logits of one call (numpy).

    ``settle``: for mlx_evit, first make the calls its predictor uses to choose a batch split.
    """
    import numpy as np

    weights = weights_path(cache, case.model, case.res)
    if runtime == "mlx":
        import mlx.core as mx
        from mlx_evit.tasks.inference import prepare

        # The default path; with one thread there is no second core to split a batch onto.
        predictor = prepare(load_mlx(case.model, case.res, weights), compile=True, streams=None if threads >= 2 else 1)
        x = mx.array(x_nhwc)
        while settle and predictor.tuning(x):  # let it choose its batch split first (a few real calls)
            mx.eval(predictor(x))

        def call():
            mx.eval(predictor(x))

        return call, lambda: np.array(predictor(x))
    x_nchw = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    if runtime == "torch":
        import torch

        torch.set_num_threads(threads)
        model = torch_model if torch_model is not None else load_torch(case.model, case.res, weights)
        xt = torch.from_numpy(x_nchw)

        def call():
            with torch.inference_mode():
                model(xt)

        def outputs():
            with torch.inference_mode():
                return model(xt).numpy()

        return call, outputs
    if runtime == "ort":
        session = ort_session(onnx_path(cache, case), threads)

        def call():
            session.run(None, {"x": x_nchw})

        return call, lambda: session.run(None, {"x": x_nchw})[0]
    raise ValueError(runtime)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def time_alternating(calls: dict[str, Callable[[], None]], warmup: int, repeats: int,
                     burst: float, pause: float) -> dict[str, dict]:
    """Alternate the runtimes: per round each times a burst of calls; returns per-call seconds."""
    first = {}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        t = time.perf_counter()
        call()
        first[name] = time.perf_counter() - t
    iters = {name: max(1, math.ceil(burst / max(t, 1e-6))) for name, t in first.items()}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            time.sleep(pause)
            call, n = calls[name], iters[name]
            call()  # untimed: wakes this runtime's worker threads after the others ran
            t = time.perf_counter()
            for _ in range(n):
                call()
            samples[name].append((time.perf_counter() - t) / n)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        out[name] = dict(median_s=statistics.median(s), min_s=min(s), max_s=max(s), q1_s=q[0], q3_s=q[2],
                         calls_per_round=iters[name], rounds=len(s))
    return out


# ---------------------------------------------------------------------------
# Memory (one runtime per subprocess)
# ---------------------------------------------------------------------------


def memory_worker(spec: dict) -> dict:
    """Run in a fresh process: load one runtime, then measure the peak RSS growth of ``runs`` inferences."""
    case = Case(spec["model"], spec["res"], spec["batch"])
    runtime, cache, threads = spec["runtime"], spec["cache"], spec["threads"]
    if runtime == "mlx":
        import mlx_evit  # noqa: F401  (BLAS preload before mlx.core)
    x = images(case)
    call, _ = runtime_fn(runtime, case, cache, threads, x, settle=False)  # no inference before the baseline
    out = {}
    if runtime == "mlx":
        import mlx.core as mx

        mx.reset_peak_memory()
        active = mx.get_active_memory()
    base = proc_status()["VmRSS"]
    reset_peak_rss()
    for _ in range(spec["runs"]):
        call()
    peak = proc_status()["VmHWM"]
    out.update(rss_base_mib=base / 1024, rss_peak_mib=peak / 1024, peak_delta_mib=(peak - base) / 1024)
    if runtime == "mlx":
        out.update(mlx_peak_delta_mib=(mx.get_peak_memory() - active) / MIB, mlx_weights_mib=active / MIB)
    return out


def measure_memory(case: Case, runtime: str, cache: str, threads: int, runs: int) -> dict:
    spec = dict(model=case.model, res=case.res, batch=case.batch, runtime=runtime, cache=cache,
                threads=threads, runs=runs)
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--memory-worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------
# One benchmark case
# ---------------------------------------------------------------------------


def run_case(case: Case, args, log) -> dict:
    import numpy as np

    runtimes = [r for r in RUNTIMES if r in args.runtimes]
    load0 = os.getloadavg()
    ensure_weights(args.cache_dir, case.model, case.res)
    x = images(case)
    torch_model = None
    if "torch" in runtimes or "ort" in runtimes:
        torch_model = load_torch(case.model, case.res, weights_path(args.cache_dir, case.model, case.res))
    if "ort" in runtimes:
        t = time.perf_counter()
        ensure_onnx(args.cache_dir, case, torch_model)
        log(f"  ONNX export ready ({time.perf_counter() - t:.1f} s)")
    calls, outputs = {}, {}
    for runtime in runtimes:
        calls[runtime], get = runtime_fn(runtime, case, args.cache_dir, args.threads, x, torch_model)
        outputs[runtime] = np.asarray(get(), dtype=np.float32)
    ref = outputs.get("torch")
    agreement = {}
    if ref is not None:
        scale = float(np.abs(ref).max())
        for runtime in runtimes:
            if runtime != "torch":
                agreement[runtime] = dict(max_abs_diff=float(np.abs(outputs[runtime] - ref).max()), max_abs_logit=scale)
    timing = time_alternating(calls, args.warmup, args.repeats, args.burst, args.pause)
    del calls
    result = dict(model=case.model, res=case.res, batch=case.batch, agreement=agreement, load_avg_start=load0,
                  load_avg_end=os.getloadavg(), runtimes={})
    for runtime in runtimes:
        t = timing[runtime]
        result["runtimes"][runtime] = dict(
            images_per_s=case.batch / t["median_s"], ms_per_batch=1000 * t["median_s"],
            ms_min=1000 * t["min_s"], ms_q1=1000 * t["q1_s"], ms_q3=1000 * t["q3_s"], ms_max=1000 * t["max_s"],
            calls_per_round=t["calls_per_round"], rounds=t["rounds"],
        )
    mlx = result["runtimes"].get("mlx")
    for other in ("torch", "ort"):
        if mlx and other in result["runtimes"]:
            result[f"ratio_mlx_{other}"] = mlx["images_per_s"] / result["runtimes"][other]["images_per_s"]
    if args.memory:
        for runtime in runtimes:
            result["runtimes"][runtime]["memory"] = measure_memory(case, runtime, args.cache_dir, args.threads,
                                                                   args.memory_runs)
    return result


# ---------------------------------------------------------------------------
# Precision: size and logit deviation of half precision and quantization
# ---------------------------------------------------------------------------


def run_precision(name: str, args, log) -> list[dict]:
    import mlx.core as mx
    import numpy as np

    from mlx_evit.tasks.inference import parameter_bytes, prepare

    res, batch = 224, 8
    ensure_weights(args.cache_dir, name, res)
    weights = weights_path(args.cache_dir, name, res)
    x = mx.array(images(Case(name, res, batch)))
    x1 = x[:1]
    rows, ref = [], None
    for precision in PRECISIONS:
        dtype = precision if precision.startswith(("float", "bfloat")) else None
        bits = int(precision[1:]) if precision.startswith("q") else None
        predictor = prepare(load_mlx(name, res, weights), dtype=dtype, quantize=bits, streams=1, compile=True)
        logits = np.array(predictor(x), dtype=np.float64)
        if ref is None:
            ref = logits
        diff = np.abs(logits - ref)
        calls = {precision: lambda: mx.eval(predictor(x1))}
        t = time_alternating(calls, 1, 3, min(args.burst, 0.5), 0.0)[precision]
        row = dict(model=name, precision=precision, size_mib=parameter_bytes(predictor.model) / MIB,
                   max_abs_diff=float(diff.max()), max_abs_logit=float(np.abs(ref).max()),
                   rel_diff=float(diff.max() / np.abs(ref).max()),
                   top1_agreement=float((logits.argmax(-1) == ref.argmax(-1)).mean()),
                   cpu_images_per_s_b1=1.0 / t["median_s"])
        log(f"  {precision:8s} {row['size_mib']:7.2f} MiB  max|dlogit| {row['max_abs_diff']:.2e} "
            f"({100 * row['rel_diff']:.3f}% of max|logit|)  top-1 agree {100 * row['top1_agreement']:.0f}%  "
            f"{row['cpu_images_per_s_b1']:.1f} img/s (CPU, batch 1)")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Cold start: whole processes, one image, local weights
# ---------------------------------------------------------------------------


def classify_cli_status() -> Optional[str]:
    """``None`` if ``python -m mlx_evit.classify`` exists and takes ``--weights``/``--model``, else why not."""
    proc = subprocess.run([sys.executable, "-m", "mlx_evit.classify", "--help"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    if proc.returncode != 0:
        return "python -m mlx_evit.classify --help failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    if "--weights" not in proc.stdout or "--model" not in proc.stdout:
        return "mlx_evit.classify has no --weights/--model options"
    return None


def write_test_image(path: str) -> None:
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:480, 0:640]
    rgb = np.stack([(xx * 255 // 639), (yy * 255 // 479), ((xx + yy) % 256)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def run_cold_start(args, log) -> dict:
    name = args.cold_start_model
    why = classify_cli_status()
    if why is not None:
        log(f"cold start skipped: {why}")
        return {"skipped": why}
    weights = ensure_weights(args.cache_dir, name, 224)
    image = os.path.join(args.cache_dir, "cold_start.png")
    if not os.path.exists(image):
        write_test_image(image)
    env = dict(os.environ)
    commands = {
        "mlx": [sys.executable, "-m", "mlx_evit.classify", image, "--weights", weights, "--model", name],
        "torch": [sys.executable, os.path.join(HERE, "timm_classify.py"), image, "--weights", weights,
                  "--model", name, "--threads", str(args.threads)],
    }
    outputs = {}
    for key, cmd in commands.items():  # warm-up: OS file cache, MLX's kernel cache
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        if proc.returncode != 0:
            msg = f"{' '.join(cmd[1:3])} failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
            log(f"cold start skipped: {msg}")
            return {"skipped": msg}
        outputs[key] = proc.stdout
    # Both must name the same class: the MLX CLI's JSON output against the timm script's first line.
    check = subprocess.run(commands["mlx"] + ["--format", "json", "--top-k", "1"], capture_output=True, text=True,
                           env=env, cwd=REPO, timeout=600)
    try:
        mlx_top1 = json.loads(check.stdout)[0]["top_k"][0]["index"]
    except (ValueError, LookupError, TypeError):
        mlx_top1 = None
    timm_top1 = int(outputs["torch"].split()[0])
    samples = {key: [] for key in commands}
    for r in range(args.cold_start_runs):
        for key in (list(commands) if r % 2 == 0 else list(commands)[::-1]):
            t = time.perf_counter()
            subprocess.run(commands[key], capture_output=True, env=env, cwd=REPO, timeout=600, check=True)
            samples[key].append(time.perf_counter() - t)
    result = dict(model=name, image="640x480 PNG", weights=os.path.basename(weights), runs=args.cold_start_runs,
                  top1=dict(mlx=mlx_top1, torch=timm_top1, same=mlx_top1 == timm_top1),
                  commands={k: " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(v))
                            for k, v in commands.items()})
    for key, s in samples.items():
        result[key] = dict(median_s=statistics.median(s), min_s=min(s), max_s=max(s))
    result["ratio_timm_over_mlx"] = result["torch"]["median_s"] / result["mlx"]["median_s"]
    return result


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("mlx", "mlx-cpu", "mlx-metal", "mlx-evit", "torch", "timm", "onnxruntime", "onnx", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def git_revision() -> Optional[str]:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                             timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO, timeout=30).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(args) -> dict:
    from mlx_evit.ops import blas as _blas
    from mlx_evit.tasks.inference import cpu_compile_available

    import mlx.core as mx

    return dict(
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=dict(platform=platform.platform(), cpu=cpu_name(), logical_cores=os.cpu_count(),
                     memory_gib=memory_total_gib(), mlx_device=str(mx.default_device())),
        versions=versions(),
        git=git_revision(),
        threads=args.threads,
        mlx_blas=_blas.blas_info().library if _blas.blas_info().fast else "bundled reference BLAS",
        mlx_blas_core=_blas.info().core, mlx_blas_binding=_blas.info().route,
        mlx_compile=cpu_compile_available(),
        protocol=dict(warmup=args.warmup, repeats=args.repeats, burst_s=args.burst, pause_s=args.pause,
                      memory_runs=args.memory_runs if args.memory else None),
    )


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    meta = report["meta"]
    m = meta["machine"]
    v = meta["versions"]
    lines = [
        "## Throughput (CPU)",
        "",
        f"{meta['date']}; {m['cpu']}, {m['logical_cores']} logical cores, {_fmt(m['memory_gib'])} GiB; "
        f"{m['platform']}.",
        f"{meta['threads']} threads per runtime. Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; MLX BLAS: {meta['mlx_blas']}; "
        f"git {meta['git']}. Load average (1/5/15 min) at start {report['load_avg_start']}, "
        f"at end {report['load_avg_end']}.",
        "",
        "**These are CPU figures (MLX's CPU backend on Linux x86_64), not Apple GPU figures.**",
        "",
        "| model | input | batch | mlx_evit img/s | timm img/s | ORT img/s | mlx/timm | mlx/ORT "
        "| peak MiB mlx / timm / ORT | max Δlogit vs timm (mlx / ORT) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        rt = r["runtimes"]

        def ips(k):
            return rt[k]["images_per_s"] if k in rt else None

        def mem(k):
            mm = rt.get(k, {}).get("memory")
            return None if not mm or "peak_delta_mib" not in mm else mm["peak_delta_mib"]

        agree = r.get("agreement", {})
        diffs = " / ".join(f"{agree[k]['max_abs_diff']:.1e}" if k in agree else "–" for k in ("mlx", "ort"))
        lines.append(
            f"| {r['model']} | {r['res']} | {r['batch']} | {_fmt(ips('mlx'))} | {_fmt(ips('torch'))} "
            f"| {_fmt(ips('ort'))} | {_fmt(r.get('ratio_mlx_torch'), 2)} | {_fmt(r.get('ratio_mlx_ort'), 2)} "
            f"| {_fmt(mem('mlx'), 0)} / {_fmt(mem('torch'), 0)} / {_fmt(mem('ort'), 0)} | {diffs} |"
        )
    if report.get("scaling"):
        lines += ["", "### Scaling with resolution (batch 1)", "",
                  "| model | runtime | ms at 512 | ms at 1024 | time ratio | peak MiB at 512 | at 1024 | memory ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in report["scaling"]:
            lines.append(f"| {s['model']} | {RUNTIME_TITLES[s['runtime']]} | {_fmt(s['ms_low'])} | {_fmt(s['ms_high'])} "
                         f"| {_fmt(s['time_ratio'], 2)} | {_fmt(s.get('mem_low'), 0)} | {_fmt(s.get('mem_high'), 0)} "
                         f"| {_fmt(s.get('memory_ratio'), 2)} |")
    if report.get("precision"):
        lines += ["", "### Precision: size and logit deviation against float32 (mlx_evit)", "",
                  "| model | precision | weights MiB | max abs Δlogit | relative | top-1 agreement | CPU img/s (batch 1) |",
                  "|---|---|---|---|---|---|---|"]
        for p in report["precision"]:
            lines.append(f"| {p['model']} | {p['precision']} | {p['size_mib']:.2f} | {p['max_abs_diff']:.2e} "
                         f"| {100 * p['rel_diff']:.3f}% | {100 * p['top1_agreement']:.0f}% "
                         f"| {p['cpu_images_per_s_b1']:.1f} |")
    cold = report.get("cold_start")
    if cold:
        lines += ["", "### Cold start (whole process, one image, local weights)", ""]
        if "skipped" in cold:
            lines.append(f"Skipped: {cold['skipped']}")
        else:
            lines += [
                "| command | median s | min s | max s |", "|---|---|---|---|",
                f"| `{cold['commands']['mlx']}` | {cold['mlx']['median_s']:.2f} | {cold['mlx']['min_s']:.2f} "
                f"| {cold['mlx']['max_s']:.2f} |",
                f"| `{cold['commands']['torch']}` | {cold['torch']['median_s']:.2f} | {cold['torch']['min_s']:.2f} "
                f"| {cold['torch']['max_s']:.2f} |",
                "",
                f"Fresh processes, warm OS file cache, {cold['runs']} alternating runs each after one warm-up run; "
                f"{cold['model']} with the benchmark's random weights on a {cold['image']}. Top-1 class: "
                f"mlx_evit {cold['top1']['mlx']}, timm {cold['top1']['torch']} "
                f"({'same' if cold['top1']['same'] else 'DIFFERENT'}).",
            ]
    return "\n".join(lines) + "\n"


def scaling_rows(results: list[dict]) -> list[dict]:
    by_key = {(r["model"], r["res"], r["batch"]): r for r in results}
    rows = []
    for (model, res, batch), low in sorted(by_key.items()):
        high = by_key.get((model, 2 * res, batch))
        if batch != 1 or high is None or res < 512:
            continue
        for runtime in RUNTIMES:
            a, b = low["runtimes"].get(runtime), high["runtimes"].get(runtime)
            if not a or not b:
                continue
            row = dict(model=model, runtime=runtime, res_low=res, res_high=2 * res, ms_low=a["ms_per_batch"],
                       ms_high=b["ms_per_batch"], time_ratio=b["ms_per_batch"] / a["ms_per_batch"])
            ma, mb = a.get("memory", {}).get("peak_delta_mib"), b.get("memory", {}).get("peak_delta_mib")
            if ma and mb:
                row.update(mem_low=ma, mem_high=mb, memory_ratio=mb / ma)
            if runtime == "mlx":
                xa = a.get("memory", {}).get("mlx_peak_delta_mib")
                xb = b.get("memory", {}).get("mlx_peak_delta_mib")
                if xa and xb:
                    row.update(mlx_alloc_low=xa, mlx_alloc_high=xb, mlx_alloc_ratio=xb / xa)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_name_list, help="comma-separated model names (default: the full plan)")
    p.add_argument("--batch-sizes", type=_int_list, help="default 1,16 (the plan's scaling cases use batch 1)")
    p.add_argument("--resolutions", type=_int_list, help="default 224 (plus 512,1024 for B1 and the seed model)")
    p.add_argument("--threads", type=int, default=2, help="threads per runtime (default 2)")
    p.add_argument("--runtimes", type=_name_list, default=list(RUNTIMES), help="subset of mlx,torch,ort")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per runtime first (default 3)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per runtime (default 7)")
    p.add_argument("--burst", type=float, default=0.6, help="seconds of calls per runtime per round (default 0.6)")
    p.add_argument("--pause", type=float, default=0.1, help="seconds between runtimes (default 0.1)")
    p.add_argument("--memory-runs", type=int, default=6,
                   help="inferences per memory subprocess (default 6: includes mlx_evit's batch-split trials)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory subprocesses")
    p.add_argument("--precision", type=_name_list, default=None,
                   help=f"models for the precision table (default with the full plan: {','.join(PRECISION_MODELS)}; "
                        "'none' to skip)")
    p.add_argument("--cold-start", dest="cold_start", action="store_true", default=None,
                   help="run the cold-start comparison (default: with the full plan)")
    p.add_argument("--no-cold-start", dest="cold_start", action="store_false")
    p.add_argument("--cold-start-model", default="efficientvit_b0")
    p.add_argument("--cold-start-runs", type=int, default=5)
    p.add_argument("--cache-dir", help="where weights and ONNX exports are kept (default: a temporary folder)")
    p.add_argument("--json", help="write the full report (JSON) here")
    p.add_argument("--markdown", help="write the Markdown tables here")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    unknown = [r for r in args.runtimes if r not in RUNTIMES]
    if unknown:
        p.error(f"unknown runtime(s) {unknown}; choose from {','.join(RUNTIMES)}")
    return args


def plan(args) -> list[Case]:
    if args.models is None and args.resolutions is None and args.batch_sizes is None:
        cases = [Case(m, 224, b) for m in MODELS_224 for b in (1, 16)]
        cases += [Case(m, r, 1) for m in SCALING_MODELS for r in SCALING_RESOLUTIONS]
        return cases
    models = args.models or list(MODELS_224)
    return [Case(m, r, b) for m in models for r in (args.resolutions or [224]) for b in (args.batch_sizes or [1, 16])]


def main(argv=None) -> int:
    args = parse_args(argv)
    set_thread_env(args.threads)  # before numpy, torch or mlx load their thread pools
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0

    import mlx_evit  # noqa: F401  (preloads OpenBLAS for MLX before mlx.core)
    from mlx_evit.models.registry import get_entry

    full = args.models is None and args.resolutions is None and args.batch_sizes is None
    cases = plan(args)
    for case in cases:
        try:
            get_entry(case.model)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.precision is None:
        args.precision = list(PRECISION_MODELS) if full else []
    elif args.precision == ["none"]:
        args.precision = []
    if args.cold_start is None:
        args.cold_start = full

    def log(msg: str) -> None:
        print(msg, flush=True)

    temp = None
    if args.cache_dir is None:
        temp = tempfile.mkdtemp(prefix="mlx_evit_bench_")
        args.cache_dir = temp
    os.makedirs(args.cache_dir, exist_ok=True)
    try:
        if "torch" in args.runtimes or "ort" in args.runtimes:
            import torch

            torch.set_num_threads(args.threads)
        report = dict(meta=metadata(args), load_avg_start=[round(v, 2) for v in os.getloadavg()], results=[])
        log(f"mlx_evit benchmark, {args.threads} threads, {len(cases)} cases; load average {report['load_avg_start']}")
        for i, case in enumerate(cases, 1):
            log(f"[{i}/{len(cases)}] {case.model} {case.res}x{case.res} batch {case.batch}")
            r = run_case(case, args, log)
            report["results"].append(r)
            parts = [f"{RUNTIME_TITLES[k]} {v['images_per_s']:.1f} img/s" for k, v in r["runtimes"].items()]
            ratios = [f"mlx/{k} {r[f'ratio_mlx_{k}']:.2f}" for k in ("torch", "ort") if f"ratio_mlx_{k}" in r]
            log("  " + ", ".join(parts + ratios) + f"; load {r['load_avg_end'][0]:.2f}")
        report["scaling"] = scaling_rows(report["results"])
        if args.precision:
            report["precision"] = []
            for name in args.precision:
                log(f"precision: {name}")
                report["precision"] += run_precision(name, args, log)
        if args.cold_start:
            log(f"cold start: {args.cold_start_model}")
            report["cold_start"] = run_cold_start(args, log)
        report["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
        text = markdown(report)
        print()
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
