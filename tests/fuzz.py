"""Fuzz campaign: hostile and broken inputs through mlx_evit's public API, each case bounded and judged.

Cases are generated from small valid seeds (a torch zip state dict, a timm-layout
EfficientViT-B0 checkpoint, safetensors files, an MLX model folder, images) by
families: byte mutations (bit flips, truncation, chunk duplication, zeroed
ranges), zip-level attacks (bombs, size lies, unsupported methods/versions,
corrupt deflate/lzma/bz2 streams, odd names), hand-written pickles (code
execution payloads through GLOBAL, STACK_GLOBAL with memo tricks, INST, OBJ,
NEWOBJ(_EX), REDUCE, BUILD, EXT1, PERSID, protocols 0-5; aliasing and stride-0
views), broken safetensors, hostile model folders and odd images (extreme
aspect ratios, declared sizes, FIFOs).

The inputs are made by :mod:`fuzz_inputs` (seeds, mutations, pickles, bombs)
and :mod:`fuzz_cases` (the families and the issue's defects); this module
runs them. Each case runs in a long-lived worker process; the parent judges it:

* **code executed**: a payload's side effect (a marker file) or an audit event
  (``os.system``, ``subprocess.Popen``, ``os.exec``, ``os.posix_spawn``) seen;
* **crash**: the worker died; **timeout**: over ``--timeout`` seconds;
* **memory**: the worker's peak RSS during the case (``VmHWM`` reset per case
  through ``/proc/self/clear_refs``) grew by more than the case's bound:
  ``4 x`` the bytes of the input files (an upper bound on their largest real
  tensor: stored bytes, or inflated within the readers' limits for the small
  compressed seeds used here) ``+ 384 MiB`` (imports warm; a model build);
* **foreign error**: an exception not raised by mlx_evit's own types
  (``mlx_evit.*`` classes), a message over 1000 characters or on several
  lines, or one not naming the input (path or file name).

Run the whole campaign::

    python -m tests.fuzz --cases 2000

It prints a summary (cases, accepted, clean errors, code executed, crashes,
timeouts, peak memory over bound, foreign errors) and exits non-zero on any
failure. ``tests/test_fuzz.py`` runs a few hundred cases in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also under python -m tests.fuzz

from fuzz_cases import Generator, defect_cases  # noqa: E402,F401 (defect_cases: for tests/test_fuzz.py)
from fuzz_inputs import ROOT, Case, make_seeds  # noqa: E402
MEMORY_SLACK = 384 * 2**20
MEMORY_FACTOR = 4
HARD_MEMORY = 3 * 2**30  # the parent kills a worker beyond this (a case over its bound anyway)


@dataclass
class Result:
    case: Case
    outcome: str  # accepted | clean | foreign | crash | timeout | memory | executed
    detail: str = ""
    seconds: float = 0.0
    peak: int = 0
    bound: int = 0


def run_cases(cases: list[Case], timeout: float = 60.0) -> list[Result]:
    """Run ``cases`` in a worker process (restarted after a crash, timeout or memory kill)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    worker = Worker(env)
    results = []
    try:
        for case in cases:
            reply, failure = worker.run(case, timeout)
            if reply is None:
                results.append(Result(case, failure.split(" ")[0], failure))
                worker = Worker(env)
                continue
            bound = MEMORY_FACTOR * case.size + MEMORY_SLACK
            result = Result(case, reply["outcome"], reply["detail"], reply["seconds"], reply["peak"], bound)
            if result.outcome in ("accepted", "clean") and reply["peak"] > bound:
                result.outcome, result.detail = "memory", f"peak {reply['peak'] >> 20} MiB over {bound >> 20} MiB"
            results.append(result)
    finally:
        worker.close()
    return results


# ------------------------------------------------------------------ worker


_AUDIT_EVENTS = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork")


def _peak_reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(case: Case, scratch: Path) -> None:
    """Run one case through the public API (raises whatever the API raises)."""
    import mlx_evit
    from mlx_evit.loading.checkpoint import read_checkpoint
    from mlx_evit.tasks.transforms import eval_transform

    if case.kind == "read":
        read_checkpoint(case.path)
    elif case.kind in ("load", "load_dir"):
        mlx_evit.load(case.path)
    elif case.kind == "convert":
        out = scratch / "out"
        shutil.rmtree(out, ignore_errors=True)
        mlx_evit.convert(case.path, out)
    elif case.kind == "image":
        for cfg in ({}, {"input_size": (3, 224, 224), "crop_pct": 0.95}, {"input_size": 256, "crop_mode": "squash"}):
            eval_transform(cfg)(case.path)
    else:
        raise AssertionError(case.kind)


def _is_library_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("mlx_evit")


def _names_input(message: str, case: Case) -> bool:
    p = Path(case.path)
    return any(s in message for s in (case.path, p.name, str(p.parent / p.name)))


def worker_main() -> None:
    """Read cases (JSON lines) on stdin, answer results (JSON lines) on stdout."""
    import warnings

    warnings.simplefilter("ignore")
    audit: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event.startswith(_AUDIT_EVENTS):
            audit.append(event)

    sys.addaudithook(hook)
    import mlx_evit  # noqa: F401 (warm imports before the first measurement)
    from mlx_evit.loading import checkpoint  # noqa: F401
    from mlx_evit.tasks import transforms  # noqa: F401

    scratch = Path(tempfile.mkdtemp(prefix="fuzzw"))
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    for line in sys.stdin:
        case = Case(**json.loads(line))
        audit.clear()
        base = _peak_reset()
        start = time.perf_counter()
        outcome, detail = "accepted", ""
        try:
            run_case(case, scratch)
        except Exception as e:  # judged below; BaseExceptions (SystemExit...) end the worker: a crash
            message = str(e)
            if type(e).__name__ == "CheckpointMismatchError":  # a key listing by design; commands print this
                from mlx_evit.errors import describe_error

                message = describe_error(e)
            if not _is_library_error(e):
                outcome, detail = "foreign", f"{type(e).__module__}.{type(e).__name__}: {message[:300]!r}"
            elif "\n" in message or len(message) > 1000:
                outcome, detail = "foreign", f"{type(e).__name__}: message of {len(message)} chars / lines"
            elif not _names_input(message, case):
                outcome, detail = "foreign", f"{type(e).__name__} not naming the input: {message[:300]!r}"
            else:
                outcome, detail = "clean", f"{type(e).__name__}: {message[:200]}"
        seconds = time.perf_counter() - start
        peak = max(0, _status("VmHWM") - base)
        if audit:
            outcome, detail = "executed", f"audit events {sorted(set(audit))}"
        out.write(json.dumps({"outcome": outcome, "detail": detail, "seconds": seconds, "peak": peak}) + "\n")
        out.flush()
        import gc

        gc.collect()


# ------------------------------------------------------------------ parent


class Worker:
    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz", "--worker"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1)

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def run(self, case: Case, timeout: float) -> tuple[Optional[dict], str]:
        assert self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(json.dumps(asdict(case)) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None, "crash"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                return None, "timeout"
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.05))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    return None, f"crash (exit {self.proc.wait()})"
                return json.loads(line), ""
            if self.rss() > HARD_MEMORY:
                self.kill()
                return None, "memory"
            if self.proc.poll() is not None:
                return None, f"crash (exit {self.proc.returncode})"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def campaign(n: int, seed: int = 0, timeout: float = 60.0, work: Optional[Path] = None,
             log: Optional[Callable[[str], None]] = None, verbose: bool = False,
             seeds: Optional[dict[str, Path]] = None) -> list[Result]:
    """Generate ``n`` cases (deterministic for ``seed``) and run them one by one in a worker.

    ``seeds``: from :func:`make_seeds` (made under ``work`` when not given).
    """
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="mlx_evit_fuzz")) if own else work
    try:
        marker_dir = work / "markers"
        marker_dir.mkdir(parents=True, exist_ok=True)
        seeds = seeds or make_seeds(work / "seeds")
        cases_dir = work / "cases"
        cases_dir.mkdir(exist_ok=True)
        gen = Generator(seeds, cases_dir, marker_dir, random.Random(seed))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        worker = Worker(env)
        results = []
        for i in range(n):
            case = gen.cases(1)[0]
            reply, failure = worker.run(case, timeout)
            if reply is None:
                result = Result(case, failure.split(" ")[0], failure)
                worker = Worker(env)
            else:
                bound = MEMORY_FACTOR * case.size + MEMORY_SLACK
                result = Result(case, reply["outcome"], reply["detail"], reply["seconds"], reply["peak"], bound)
                if result.outcome in ("accepted", "clean") and reply["peak"] > bound:
                    result.outcome, result.detail = "memory", f"peak {reply['peak'] >> 20} MiB over {bound >> 20} MiB"
            if any(marker_dir.iterdir()):
                result.outcome, result.detail = "executed", f"marker files {sorted(p.name for p in marker_dir.iterdir())}"
                for p in marker_dir.iterdir():
                    p.unlink()
            results.append(result)
            if log and (verbose or result.outcome not in ("accepted", "clean")):
                log(f"[{i}] {result.outcome}: {case.family}/{case.kind} {case.note}: {result.detail} "
                    f"({result.seconds:.2f} s, {result.peak >> 20} MiB)")
            _remove(Path(case.path))
        worker.close()
        return results
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def summary(results: list[Result]) -> dict:
    counts = {k: 0 for k in ("accepted", "clean", "executed", "crash", "timeout", "memory", "foreign")}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    families: dict[str, int] = {}
    for r in results:
        families[r.case.family] = families.get(r.case.family, 0) + 1
    peaks = [r.peak for r in results if r.bound]
    return dict(cases=len(results), **counts, families=families,
                max_peak_mib=round(max(peaks, default=0) / 2**20, 1),
                max_peak_over_bound=round(max((r.peak / r.bound for r in results if r.bound), default=0), 3),
                max_seconds=round(max((r.seconds for r in results), default=0), 2),
                total_seconds=round(sum(r.seconds for r in results), 1))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--verbose", action="store_true", help="print every case, not only failures")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    start = time.monotonic()
    results = campaign(args.cases, args.seed, args.timeout, log=lambda s: print(s, flush=True),
                       verbose=args.verbose)
    report = summary(results)
    report["wall_seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(report, indent=2))
    bad = sum(report[k] for k in ("executed", "crash", "timeout", "memory", "foreign"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
