"""Training speed and memory: EfficientViT-Seg and EfficientViT-SAM (decoder) training steps.

    python benchmarks/train_bench.py                           # seg-B0 and SAM-L0, batch 8, 512x512
    python benchmarks/train_bench.py --size 256 --steps 3 --models seg_b0 --output results.json

Each case builds a random-weight model and runs the library's training
step on random data (the data pipeline is left out: it runs in threads
beside the step): seg: forward, bilinear upsampling, cross-entropy with
the ignore index, backward, gradient clipping, AdamW, BatchNorm in
training mode; SAM: the mask decoder on cached embeddings (the default
``--train decoder``), ``batch`` prompts with boxes, focal + dice + IoU
losses, backward, AdamW. One warm-up step, then ``--steps`` timed steps.
Reports images (seg) or prompts (SAM) per second and MLX's peak memory
(``mx.get_peak_memory``, the arrays MLX allocated; the process's RSS
is reported too).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import numpy as np

import mlx_evit  # noqa: F401  (BLAS set-up before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_evit.tasks.sam_training import _losses, set_trainable
from mlx_evit.tasks.training import sync_batch_norms

SEG = {"seg_b0": "efficientvit_seg_b0_cityscapes", "seg_b1": "efficientvit_seg_b1_cityscapes"}
SAM = {"sam_l0": "efficientvit_sam_l0"}


def _rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1 << 20 if sys.platform == "darwin" else 1 << 10)


def _time(step, steps: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bench_seg(name: str, batch: int, size: int, steps: int) -> dict:
    mx.random.seed(0)
    model = mlx_evit.create_model(name, num_classes=19)
    sync_batch_norms(model, None)
    model.train()
    optimizer = optim.AdamW(learning_rate=1e-4, weight_decay=0.01)
    upsample = nn.Upsample(scale_factor=8, mode="linear", align_corners=False)
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(size=(batch, size, size, 3)).astype(np.float32))
    labels = rng.integers(0, 19, (batch, size, size))
    labels[:, :8] = 255
    y = mx.array(labels.astype(np.int32))

    def loss_fn(x, y):
        logits = upsample(model(x))
        mask = y != 255
        ce = nn.losses.cross_entropy(logits, mx.where(mask, y, 0), reduction="none")
        return mx.where(mask, ce, 0.0).sum() / mask.sum()

    grad_fn = nn.value_and_grad(model, loss_fn)

    def step():
        loss, grads = grad_fn(x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)

    mx.reset_peak_memory()
    seconds = _time(step, steps)
    return {"case": f"{name} train step", "batch": batch, "size": size, "seconds_per_step": seconds,
            "images_per_second": batch / seconds, "peak_mib": mx.get_peak_memory() / 2**20}


def bench_sam(name: str, batch: int, size: int, steps: int) -> dict:
    """``batch`` box prompts (one per image) on cached embeddings; ``size`` is the encoder's resolution,
    which the decoder step does not depend on (the encoder runs once per image, timed separately)."""
    mx.random.seed(0)
    model = mlx_evit.create_model(name, image_size=size)
    model.eval()
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(size=(1, size, size, 3)).astype(np.float32))
    encode = _time(lambda: mx.eval(model.image_encoder(x)), 1)
    set_trainable(model, "decoder")
    optimizer = optim.AdamW(learning_rate=1e-4, weight_decay=0.01)
    embeddings = mx.array(rng.normal(size=(batch, 64, 64, 256)).astype(np.float32))
    index = mx.arange(batch)
    corners = rng.uniform(0, 900, (batch, 2))
    boxes = mx.array(np.concatenate([corners, corners + 100], axis=1).astype(np.float32))
    targets = np.zeros((batch, 256, 256), np.float32)
    targets[:, 60:120, 40:140] = 1
    targets = mx.array(targets)

    def loss_fn():
        per_prompt, _ = _losses(model, embeddings, index, {"boxes": boxes}, targets, False)
        return per_prompt.mean()

    grad_fn = nn.value_and_grad(model, loss_fn)

    def step():
        loss, grads = grad_fn()
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)

    mx.reset_peak_memory()
    seconds = _time(step, steps)
    return {"case": f"{name} decoder train step (cached embeddings)", "batch": batch, "size": size,
            "seconds_per_step": seconds, "prompts_per_second": batch / seconds,
            "encoder_seconds_per_image": encode, "peak_mib": mx.get_peak_memory() / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="seg_b0,sam_l0", help=f"comma list of {', '.join([*SEG, *SAM])}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="seg crop / SAM encoder resolution (default 512)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (default 5)")
    p.add_argument("--output", help="also write the results as JSON")
    args = p.parse_args(argv)
    results = []
    for key in args.models.split(","):
        if key in SEG:
            results.append(bench_seg(SEG[key], args.batch, args.size, args.steps))
        elif key in SAM:
            results.append(bench_sam(SAM[key], args.batch, args.size, args.steps))
        else:
            p.error(f"unknown model {key!r}")
        print(json.dumps(results[-1]), flush=True)
    info = {"device": str(mx.default_device()), "platform": platform.platform(), "mlx": mx.__version__,
            "rss_peak_mib": _rss_mib(), "results": results}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    print(f"{info['device']}, peak RSS {info['rss_peak_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
