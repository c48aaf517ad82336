"""Evaluation throughput with 1 and 2 ranks (``mlx.launch --backend ring`` on 127.0.0.1).

    python benchmarks/eval_ranks.py [--model efficientvit_b0] [--images 96] [--repeats 3]

Builds a random-weight model (ImageNet head) and a labelled folder of random
224x224 images in WordNet-id class folders, then runs the same
``python -m mlx_evit.evaluate`` command alone and under ``mlx.launch -n 2``
(also with OpenBLAS limited to one thread per rank), alternating the
configurations, and reports medians of the throughput the command itself
measures (images / seconds of the evaluation loop, model loading excluded)
and of the whole command's wall time (process start, imports, model load and
compilation included). Every 2-rank run's predictions are checked equal to
the 1-rank run's.

On one machine both ranks share its cores, so this shows the overhead of the
sharding and of the per-round synchronisation, and whether one process
already uses the cores; it does not show the speed-up of several Macs (each
rank would have its own cores and GPU there).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", first))
                b.bind(("127.0.0.1", first + 1))
            return first
        except OSError:
            continue
    raise RuntimeError("no free ports")


def build(folder: Path, model: str, images: int) -> tuple[Path, Path]:
    import mlx_evit
    from mlx_evit.tasks.labels import imagenet_labels

    import mlx.core as mx

    mx.random.seed(0)
    net = mlx_evit.create_model(f"{model}.r224_in1k")
    weights = mlx_evit.save_model(net, folder / "weights")
    data = folder / "data"
    rng = np.random.default_rng(0)
    wnids = [label.wnid for label in imagenet_labels()[:4]]
    for i in range(images):
        d = data / wnids[i % 4]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(d / f"{i:04d}.jpg", quality=90)
    return weights, data


def run(config: str, data: Path, weights: Path, out: Path, batch: int) -> tuple[float, float]:
    args = [sys.executable, "-m", "mlx_evit.evaluate", str(data), "--weights", str(weights), "--batch-size",
            str(batch), "--quiet", "--output", str(out), "--force"]
    env = dict(os.environ)
    if config != "1 rank":
        args = [str(LAUNCH), "--backend", "ring", "-n", "2", "--starting-port", str(free_port_pair()), *args]
        if "1 thread" in config:
            args[args.index("--starting-port"):args.index("--starting-port")] = ["--env", "OPENBLAS_NUM_THREADS=1"]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or "[WARN]" in proc.stderr:
        raise SystemExit(f"{config}: failed\n{proc.stdout}\n{proc.stderr}")
    summary = json.loads((out / "summary.json").read_text())
    return summary["images_per_second"], wall


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return sorted(csv.reader(f))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientvit_b0")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    configs = ["1 rank", "2 ranks", "2 ranks, 1 BLAS thread each"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights, data = build(tmp, args.model, args.images)
        results: dict[str, list[tuple[float, float]]] = {c: [] for c in configs}
        for r in range(args.repeats):
            for config in configs:  # alternating, so that load changes hit every configuration
                out = tmp / f"out-{configs.index(config)}"
                results[config].append(run(config, data, weights, out, args.batch_size))
                if config != "1 rank":
                    mine, base = rows(out / "predictions.csv"), rows(tmp / "out-0" / "predictions.csv")
                    if mine != base:
                        differ = sum(a != b for a, b in zip(mine, base))
                        raise SystemExit(f"{config}: {differ} of {len(base) - 1} prediction rows differ from 1 rank")
    base = statistics.median(t for t, _ in results["1 rank"])
    print(f"{args.model}, {args.images} images 256 px -> 224, batch {args.batch_size}, median of {args.repeats}; "
          f"{os.cpu_count()} CPUs, {platform.machine()}, shared with other jobs")
    print("| configuration | images/s (evaluation loop) | vs 1 rank | command wall time (s) |")
    print("|---|---|---|---|")
    table = {}
    for config in configs:
        rate = statistics.median(t for t, _ in results[config])
        wall = statistics.median(w for _, w in results[config])
        table[config] = {"images_per_second": rate, "wall_s": wall, "runs": results[config]}
        print(f"| {config} | {rate:.1f} | {rate / base:.2f} | {wall:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "images": args.images, "batch_size": args.batch_size,
                                         "repeats": args.repeats, "cpus": os.cpu_count(), "results": table},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
