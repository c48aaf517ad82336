"""Fine-tune an EfficientViT on a folder of images, one subfolder per class.

    DATA_DIR/cat/001.jpg, DATA_DIR/cat/002.jpg, ..., DATA_DIR/dog/001.jpg, ...

From pretrained weights, a tag's (downloaded from the Hub) or a local checkpoint / MLX directory;
the classifier is replaced for the new classes:

    python examples/finetune.py DATA_DIR --output my_model --model efficientvit_b0.r224_in1k
    python examples/finetune.py DATA_DIR --output my_model --weights B0_DIR --head-only

A small seed model (``EfficientViT.build``) from scratch:

    python examples/finetune.py DATA_DIR --output my_model --model seed --image-size 64

A stratified ``--val-fraction`` of each class is held out for validation.
Training uses random resized crops and horizontal flips, AdamW with a
linear warm-up and a cosine decay, and BatchNorm in training mode (its
statistics adapt to the new data). ``--head-only`` trains the classifier
alone on the frozen network: everything else, BatchNorm statistics included,
stays as pretrained (the model runs in eval mode), which is what a small
data set can support. The result is an MLX model directory (weights,
config, class names) for ``mlx_evit.load`` and
``python -m mlx_evit.classify --weights OUT_DIR``.

Data parallel on several processes or Macs, under ``mlx.launch``:

    mlx.launch -n 2 python examples/finetune.py DATA_DIR --output my_model --model seed
    mlx.launch --hostfile hosts.json --backend ring python examples/finetune.py DATA_DIR --output my_model

Every rank reads the same split and shuffle (same ``--seed``) and takes its
share of every global batch of ``--batch-size`` images; the gradients are
averaged across ranks (the loss is the mean over the global batch), so the
weights follow those of one process to float32 round-off (BatchNorm
excepted: its batch statistics are each rank's own, and the running
statistics are averaged at the end of each epoch). Rank 0 saves. A rank
that fails stops all of them before anything is saved.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

import mlx_evit  # first: it sets up BLAS for mlx.core
from mlx_evit.ops.backend import default_device_is_gpu
from mlx_evit.tasks.distributed import RankFailure, Ranks, shard_bounds
from mlx_evit.api import pretrained_weights
from mlx_evit.errors import HubError
from mlx_evit.outputs import check_output_dir
from mlx_evit.tasks.training import check_ranks
from mlx_evit.tasks.transforms import INTERPOLATIONS, ImageLoadError, eval_transform, load_image
from mlx_evit.models.registry import IMAGENET_MEAN, IMAGENET_STD, PREPROCESSING_KEYS, get_entry

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

# The last Linear layer of each family: replaced for the new classes, and
# the only layer that --head-only trains.
CLASSIFIER = {"seed": "head", "mit": "head.classifier.4", "msra": "head.linear"}

# The --model seed architecture: small enough to train from scratch on a CPU.
SEED_ARCH = dict(embed_dim=32, depths=(1, 1, 2), num_heads=(2, 2, 4), mlp_ratio=3.0)

# Preprocessing: the keys kept from a pretrained config, and the defaults (timm's).
DEFAULT_CFG = dict(input_size=(3, 224, 224), interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)

Sample = tuple[Path, int]  # (image file, class index)


# ----------------------------------------------------------------------------- data


def find_images(data_dir: Path) -> tuple[list[Sample], list[str]]:
    """Image files under ``data_dir/<class>/`` and the sorted class names (``ValueError`` if too few)."""
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir}: not a directory")
    classes = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((data_dir / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    if len(classes) < 2 or counts.min() < 2:
        raise ValueError(
            f"{data_dir}: need at least 2 class subfolders with at least 2 images each "
            f"(found {dict(zip(classes, counts.tolist()))})"
        )
    return samples, classes


def split(samples: list[Sample], val_fraction: float, rng: np.random.Generator) -> tuple[list[Sample], list[Sample]]:
    """Stratified random split: ``val_fraction`` of each class (at least one image) for validation."""
    train, val = [], []
    for label in sorted({label for _, label in samples}):
        group = [s for s in samples if s[1] == label]
        order = rng.permutation(len(group))
        n_val = min(max(1, round(val_fraction * len(group))), len(group) - 1)
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val


def random_resized_crop(
    image: Image.Image,
    size: tuple[int, int],
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``; resize to ``size`` (W, H).

    After 10 rejected draws (a crop that does not fit), the whole image,
    centre-cropped to the nearest allowed aspect ratio, is used.
    """
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            break
    else:
        aspect = min(max(width / height, ratio[0]), ratio[1])
        w, h = (width, round(width / aspect)) if width / height <= aspect else (round(height * aspect), height)
        left, top = (width - w) // 2, (height - h) // 2
    return image.resize(size, resample, box=(left, top, left + w, top + h))


def normalize(pixels: np.ndarray, cfg: dict) -> np.ndarray:
    """uint8 ``(..., 3)`` -> float32 scaled to [0, 1] and normalized with the config's mean/std."""
    mean, std = np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32)
    return (pixels.astype(np.float32) / 255.0 - mean) / std


def train_batches(
    samples: list[Sample], cfg: dict, batch_size: int, rng: np.random.Generator, shard: tuple[int, int] = (0, 1)
) -> Iterator[tuple[mx.array, mx.array]]:
    """One epoch of augmented batches ``(B, H, W, 3)``, labels ``(B,)``; the last partial batch is dropped.

    ``shard = (rank, ranks)``: this rank's contiguous share of each global
    batch of ``batch_size``. Every rank draws the same shuffle and one seed
    per image from ``rng``, so an image gets the same augmentation whichever
    rank loads it.
    """
    height, width = cfg["input_size"][-2:]
    resample = INTERPOLATIONS[cfg.get("interpolation", "bicubic")]
    order = rng.permutation(len(samples))
    seeds = rng.integers(0, 2**63 - 1, size=len(samples))
    lo, hi = shard_bounds(batch_size, shard[1], shard[0])
    for start in range(0, len(order) - batch_size + 1, batch_size):
        images, labels = [], []
        for position in range(start + lo, start + hi):
            path, label = samples[order[position]]
            image_rng = np.random.default_rng(seeds[position])
            crop = np.asarray(random_resized_crop(load_image(path), (width, height), image_rng, resample=resample))
            images.append(crop[:, ::-1] if image_rng.random() < 0.5 else crop)  # horizontal flip
            labels.append(label)
        yield mx.array(normalize(np.stack(images), cfg)), mx.array(labels)


def eval_arrays(samples: list[Sample], cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Validation images with the model's evaluation transform (resize, centre crop), once."""
    transform = eval_transform(cfg)
    return np.stack([transform(path) for path, _ in samples]), np.array([label for _, label in samples])


# ----------------------------------------------------------------------------- model


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``submodule(model, "head.classifier.4")``: follow attribute names and list indices."""
    for part in path.split("."):
        model = model[int(part)] if isinstance(model, list) else getattr(model, part)
    return model


def build_model(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, dict]:
    """The model to train and its preprocessing config.

    ``seed``: a small seed model, random. With pretrained weights (``--weights``
    or a tag fetched from the Hub): the same architecture with a new, random
    classifier for ``num_classes`` and every other weight copied. A bare
    architecture name without weights: random weights.
    """
    size = args.image_size
    if args.model == "seed":
        size = size or 224
        patch = max(1, min(16, size // 8))  # at least an 8x8 grid of tokens
        if size % patch:
            raise ValueError(f"--image-size {size}: the seed model needs a multiple of its patch size {patch}")
        arch = dict(SEED_ARCH, image_size=size, patch_size=patch)
        model = mlx_evit.create_model("efficientvit_seed", num_classes=num_classes, **arch)
        return model, dict(DEFAULT_CFG, input_size=(3, size, size))
    weights = args.weights
    if weights is None and "." in args.model:  # a pretrained tag: timm's weights from the Hub
        weights = pretrained_weights(args.model, log=lambda message: print(message, file=sys.stderr))
    if weights is None:
        name, arch, base = args.model, dict(get_entry(args.model).defaults), None
        pretrained = mlx_evit.get_pretrained_cfg(name)
        cfg = pretrained.to_dict() if pretrained else {}
    else:
        base = mlx_evit.load(weights, fuse=False, model=args.model)
        name, arch, cfg = base.arch_name, dict(base.arch_args), base.pretrained_cfg or {}
    if size and arch.get("img_size", size) != size:  # M series: the attention windows follow the image size
        arch["img_size"] = size
        if base is not None:  # reload, resizing the checkpoint's attention bias tables
            base = mlx_evit.create_model(name, pretrained=weights, img_size=size)
    model = mlx_evit.create_model(name, **dict(arch, num_classes=num_classes))
    if base is not None:  # copy every weight but the classifier's
        prefix = CLASSIFIER[get_entry(name).family] + "."
        model.load_weights([(k, v) for k, v in tree_flatten(base.parameters()) if not k.startswith(prefix)],
                           strict=False)
    cfg = dict(DEFAULT_CFG, **{k: cfg[k] for k in PREPROCESSING_KEYS if k in cfg})
    if size:
        cfg["input_size"] = (3, size, size)
    return model, cfg


# ----------------------------------------------------------------------------- training


def progress(epoch: int, epochs: int, step: int, steps: int, loss: float, acc: float) -> None:
    """Progress bar on stderr: redrawn in place on a terminal, once per epoch otherwise."""
    if step < steps and not sys.stderr.isatty():
        return
    done = round(24 * step / max(steps, 1))
    bar = "#" * done + "-" * (24 - done)
    print(f"\repoch {epoch}/{epochs} [{bar}] {step}/{steps} loss {loss:.4f} acc {acc:.3f}",
          end="", file=sys.stderr, flush=True)


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int,
             ranks: Optional[Ranks] = None) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on preprocessed images.

    With ``ranks``, ``images`` are this rank's shard and the counts are summed over the ranks.
    """
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(mx.array(images[start : start + batch_size]))
        correct += (mx.argmax(logits, axis=-1) == mx.array(labels[start : start + batch_size])).sum().item()
    if ranks is None:
        return correct / len(images)
    correct, total = ranks.all_sum(np.array([correct, len(images)], np.int32)).tolist()
    return correct / total


def train(model: nn.Module, train_set: list[Sample], val_set: list[Sample], cfg: dict,
          args: argparse.Namespace, rng: np.random.Generator, ranks: Optional[Ranks] = None) -> float:
    """Train in place; returns the final validation accuracy.

    ``ranks``: data parallel over ``mx.distributed`` ranks (default: one). Raises
    ``ImageLoadError`` on the rank that could not read an image, :class:`RankFailure` on the others.
    """
    ranks = ranks if ranks is not None else Ranks(mx.distributed.init())
    classifier = submodule(model, CLASSIFIER[get_entry(model.arch_name).family])
    if args.head_only:
        model.freeze()
        classifier.unfreeze()
    batch_size = min(args.batch_size, len(train_set))
    if batch_size < ranks.size:
        raise ValueError(f"--batch-size {batch_size} is smaller than the {ranks.size} ranks; each needs an image")
    steps = len(train_set) // batch_size
    # Learning rate: linear warm-up over the first epoch, then a cosine decay to 1% of the peak.
    lr, warmup = args.lr, steps if args.epochs > 1 else 0
    schedule = optim.cosine_decay(lr, args.epochs * steps - warmup, lr / 100)
    if warmup:
        schedule = optim.join_schedules([optim.linear_schedule(lr / 100, lr, warmup), schedule], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)
    lo, hi = shard_bounds(len(val_set), ranks.size, ranks.rank)  # each rank validates its share
    problem = None
    try:
        val_images, val_labels = eval_arrays(val_set[lo:hi], cfg) if hi > lo else (np.zeros((0, 1, 1, 3)), [])
    except ImageLoadError as e:
        problem = e
    check_ranks(ranks, problem)
    # The mean over the global batch: each rank's sum, scaled by ranks / batch, then averaged across ranks.
    scale = ranks.size / batch_size

    def loss_fn(x, y):
        logits = model(x)
        loss = nn.losses.cross_entropy(logits, y, label_smoothing=0.1, reduction="sum") * scale
        return loss, (mx.argmax(logits, axis=-1) == y).sum()

    state = [model.state, optimizer.state]

    def step(x, y):
        (loss, correct), grads = nn.value_and_grad(model, loss_fn)(x, y)
        optimizer.update(model, nn.average_gradients(grads))  # a no-op on one rank
        return loss, correct

    # On the GPU, compiling fuses the elementwise work between convolutions and matmuls. The CPU
    # backend builds fused kernels with a C++ compiler on first use (a minute or more for a
    # training step) and gains nothing measurable from them, so the step runs eagerly there.
    # Under mlx.launch the step runs eagerly too (the gradient all-reduce stays outside mx.compile).
    if default_device_is_gpu() and not ranks.distributed:
        step = partial(mx.compile, inputs=state, outputs=state)(step)

    accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        # Full fine-tuning: BatchNorm uses and updates batch statistics. Head only: frozen network.
        model.train(not args.head_only)
        total_loss = total_acc = 0.0
        batches = train_batches(train_set, cfg, batch_size, rng, (ranks.rank, ranks.size))
        for i in range(1, steps + 1):
            try:
                x, y = next(batches)
                problem = None
            except ImageLoadError as e:
                problem = e
            check_ranks(ranks, problem)  # every rank learns of a failure before the gradients are exchanged
            loss, correct = step(x, y)
            mx.eval(state)
            loss, correct = ranks.all_sum(np.array([loss.item(), correct.item()], np.float32)).tolist()
            total_loss, total_acc = total_loss + loss / ranks.size, total_acc + correct / batch_size
            if ranks.rank == 0:
                progress(epoch, args.epochs, i, steps, total_loss / i, total_acc / i)
        model.eval()
        if ranks.distributed and not args.head_only:
            average_batch_norm_statistics(model, ranks)
        accuracy = evaluate(model, val_images, val_labels, batch_size, ranks)
        if ranks.rank == 0:
            print(f" val acc {accuracy:.3f}", file=sys.stderr, flush=True)
    return accuracy


def average_batch_norm_statistics(model: nn.Module, ranks: Ranks) -> None:
    """Replace each BatchNorm's running mean and variance by their average over the ranks."""
    for _, module in model.named_modules():
        if isinstance(module, nn.BatchNorm) and "running_mean" in module:
            for name in ("running_mean", "running_var"):
                total = ranks.all_sum(np.array(module[name], np.float32))
                setattr(module, name, mx.array(total / ranks.size))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", type=Path, help="folder with one subfolder of images per class")
    p.add_argument("--output", "-o", type=Path, required=True, help="MLX model directory to write")
    p.add_argument("--model", help="'seed' (default without --weights), a registered architecture, or a "
                                   "pretrained tag such as efficientvit_b0.r224_in1k (weights from the Hub)")
    p.add_argument("--weights", help="pretrained weights: MLX model directory or checkpoint")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-4 to fine-tune pretrained weights "
                                            "fully, else 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--image-size", type=int, help="training resolution (default: the model's; seed: 224)")
    p.add_argument("--head-only", action="store_true", help="train the classifier only (pretrained weights)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (split, augmentation, initialisation)")
    p.add_argument("--force", action="store_true", help="replace an existing --output model directory")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.model == "seed" and args.weights:
        p.error("--model seed trains from scratch; name the architecture of --weights or leave --model out")
    args.model = args.model or (None if args.weights else "seed")
    pretrained = bool(args.weights) or "." in (args.model or "")
    if args.head_only and not pretrained:
        p.error("--head-only needs pretrained weights (--weights, or a tagged --model)")
    if args.lr is None:
        args.lr = 1e-4 if pretrained and not args.head_only else 1e-3
    try:  # before training: an MLX model directory (or a new/empty one), never the data or the weights
        args.checked_output = check_model_dir(args.output, [args.data_dir, args.weights], args.force)
    except ValueError as e:
        p.error(str(e))
    return args


def check_model_dir(output: Path, inputs: Sequence, force: bool):
    """The checked --output folder (:func:`mlx_evit.outputs.check_output_dir`); ``ValueError`` names the problem."""
    def is_model_dir(folder: Path) -> bool:  # the config.json that save_model writes
        try:
            return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("format") == "mlx_evit"
        except (OSError, ValueError, AttributeError):
            return False

    return check_output_dir(output, [i for i in inputs if i], force, option="--output", allow_empty=False,
                            marker=is_model_dir, describe="an MLX model directory")


def save_trained(model: nn.Module, args: argparse.Namespace, **info) -> None:
    """Save to --output; if that fails (it changed during training, disk full), save beside it and exit 1."""
    try:
        mlx_evit.save_model(model, args.checked_output, force=args.force, **info)
        return
    except (OSError, ValueError) as e:
        problem = " ".join(str(e).split())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in (args.output.parent, Path(tempfile.gettempdir())):
        fallback = folder / f"{args.output.name}.unsaved-{stamp}"
        try:
            mlx_evit.save_model(model, fallback, **info)
        except (OSError, ValueError):
            continue
        sys.exit(f"error: cannot save to --output ({problem}); saved the trained model to {fallback} instead")
    sys.exit(f"error: cannot save the trained model ({problem}), nor beside {args.output} or in the temp folder")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    ranks = Ranks(prog="finetune.py")  # one rank unless started by mlx.launch
    where = f"rank {ranks.rank}: " if ranks.distributed else ""
    rng = np.random.default_rng(args.seed)
    mx.random.seed(args.seed)  # the same initial weights on every rank
    problem = None
    try:
        samples, classes = find_images(args.data_dir)
        model, cfg = build_model(args, len(classes))
    except (OSError, ValueError, HubError) as e:  # bad folder, weights or name; Hub unreachable
        problem = f"error: {where}{e}"
    try:
        ranks.check(problem)
    except RankFailure as e:
        sys.exit(problem or f"error: {where}{e}; stopping, nothing saved")
    train_set, val_set = split(samples, args.val_fraction, rng)
    if ranks.rank == 0:
        print(f"{model.arch_name}: {len(classes)} classes, {len(train_set)} training / {len(val_set)} validation "
              f"images at {cfg['input_size'][-1]} px, {ranks.describe()}", file=sys.stderr)
    start = time.perf_counter()
    try:
        accuracy = train(model, train_set, val_set, cfg, args, rng, ranks)
        ranks.check(None)
    except (ImageLoadError, ValueError) as e:
        sys.exit(f"error: {where}{e}")
    except RankFailure as e:
        sys.exit(f"error: {where}{e}; stopping, nothing saved")
    if ranks.rank != 0:
        return
    model.pretrained_cfg = cfg
    source = {"finetuned_from": args.weights or args.model, "data": str(args.data_dir), "epochs": args.epochs,
              "head_only": args.head_only, "validation_accuracy": accuracy}
    save_trained(model, args, labels=classes, source=source)
    print(f"validation accuracy {accuracy:.3f} (epochs: {args.epochs}, {time.perf_counter() - start:.0f} s, "
          f"{ranks.describe()}); saved {args.output}")


if __name__ == "__main__":
    main()
