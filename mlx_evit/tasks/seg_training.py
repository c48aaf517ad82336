"""Fine-tune EfficientViT-Seg on your own data: the library behind ``python -m mlx_evit.segment train``.

Python::

    from mlx_evit.tasks.seg_training import SegTrainConfig, train_segmentation

    result = train_segmentation(SegTrainConfig(data="DATA", output="OUT", model="efficientvit_seg_b0_cityscapes",
                                               classes="classes.txt", steps=2000, val="VAL"))
    result["miou"]                     # validation mIoU after training (with val)

Training follows the seg papers: each sample is scaled by a random factor
in 0.5-2.0 of a base size whose short side is the crop's, randomly cropped
(padded with the ignore value), flipped and colour-jittered; the stride-8
logits are upsampled bilinearly to the crop and scored by cross-entropy
over the non-ignored pixels of the whole global batch; AdamW with a linear
warm-up and a poly (default) or cosine decay; gradients clipped by their
global norm. BatchNorm runs in training mode with the statistics of the
global batch (:class:`~mlx_evit.tasks.training.SyncBatchNorm`), so N ranks
under ``mlx.launch`` train as one process with the same global batch; rank 0
validates (every rank its share) and writes. The classifier layer is
re-initialised when ``classes`` sets another class count.

The output is an MLX model folder (unfused; :class:`~mlx_evit.tasks.segmenter.Segmenter`
folds the BatchNorms when it loads it) with the class names, a palette and
the preprocessing in ``config.json``: ``python -m mlx_evit.segment --weights
OUT``, ``Segmenter.load(weights=OUT)`` and ``--eval`` use it as it is. It
is also the checkpoint (see :mod:`mlx_evit.tasks.training`): ``resume``
continues a stopped run exactly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mlx_evit
from mlx_evit.models.registry import IMAGENET_MEAN, IMAGENET_STD, get_entry
from mlx_evit.ops.resampling import cv2_resize_cubic
from mlx_evit.ops.resampling import resize_argmax
from mlx_evit.tasks.distributed import Ranks, shard_bounds
from mlx_evit.tasks.transforms import ImageLoadError
from mlx_evit.tasks.seg_datasets import DATASETS, IGNORE, IoUMeter, get_dataset
from mlx_evit.tasks.seg_train_data import (SegData, augment, check_pairs, default_palette, find_pairs, input_size,
                                           load_pair, read_classes)
from mlx_evit.tasks.training import (Progress, TrainConfig, TrainingError, check_ranks, check_train_output, make_optimizer,
                                     read_checkpoint, restore_optimizer, sample_rng, save_checkpoint,
                                     sync_batch_norms)

__all__ = ["SegTrainConfig", "train_segmentation", "evaluate_miou"]

PathLike = Union[str, Path]


@dataclass
class SegTrainConfig(TrainConfig):
    """Options of :func:`train_segmentation` (the command's, by the same names; the shared ones are
    :class:`~mlx_evit.tasks.training.TrainConfig`'s). ``image_size``: crop (height, width), multiples
    of 32; ``classes``: a file of class names, one per line; ``scale``: the random scale range.
    """

    batch_size: int = 8
    lr: float = 3e-4
    schedule: str = "poly"
    classes: Optional[PathLike] = None
    image_size: tuple[int, int] = (512, 512)
    scale: tuple[float, float] = (0.5, 2.0)


def _classifier_prefix(model: nn.Module) -> str:
    return f"head.output.{len(model.head.output) - 1}."


def build_seg_model(config: SegTrainConfig, classes: Optional[list[str]], largest: int,
                    dataset: Optional[str]) -> tuple[nn.Module, list[str]]:
    """The model to train (unfused) and its class names; a new class count re-initialises the classifier."""
    if config.weights is not None:
        base = mlx_evit.load(config.weights, fuse=False, model=config.model)
    elif config.model is None:
        raise TrainingError("name the model to fine-tune: --model NAME or --weights PATH")
    elif config.pretrained:
        base = mlx_evit.create_model(config.model, pretrained=True)
    else:
        base = mlx_evit.create_model(config.model)
    if get_entry(base.arch_name).family != "seg":
        raise TrainingError(f"{base.arch_name} is not a segmentation model")
    old = base.labels or (list(get_dataset(base.dataset).classes) if base.dataset in DATASETS else None)
    if classes is None:
        if dataset is not None:
            classes = list(get_dataset(dataset).classes)
        elif old is not None and largest < len(old):
            classes = list(old)
        else:
            raise TrainingError(f"the labels reach class {largest} but the model has {base.num_classes} classes; "
                                "pass --classes FILE (one name per line)")
    if len(classes) == base.num_classes:
        return base, classes
    model = mlx_evit.create_model(base.arch_name, **dict(base.arch_args, num_classes=len(classes)))
    prefix = _classifier_prefix(model)
    model.load_weights([(k, v) for k, v in tree_flatten(base.parameters()) if not k.startswith(prefix)],
                       strict=False)
    return model, classes


def _normalise(pixels: np.ndarray) -> np.ndarray:
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return (pixels.astype(np.float32) / 255.0 - mean) / std


def evaluate_miou(model: nn.Module, data: SegData, short: int, ranks: Ranks, num_classes: int) -> float:
    """Validation mIoU (eval mode): short side to ``short``, bicubic logits at the label size, argmax;
    each rank its share of the pairs, the counts summed over the ranks."""
    model.eval()
    meter = IoUMeter(num_classes)
    lo, hi = shard_bounds(len(data.pairs), ranks.size, ranks.rank)
    for pair in data.pairs[lo:hi]:
        pixels, label = load_pair(pair, data.dataset)
        size = input_size(*pixels.shape[:2], short)
        x = _normalise(cv2_resize_cubic(pixels, size) if size != pixels.shape[:2] else pixels)
        logits = model(mx.array(x[None])).astype(mx.float32)
        meter.update(np.asarray(resize_argmax(logits, label.shape)[0]), label)
    counts = np.stack([meter.intersection, meter.union]).astype(np.float64)
    inter, union = ranks.all_sum(counts)
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 0.0


def _batches(config: SegTrainConfig, data: SegData, start: int, total: int, ranks: Ranks, pool: ThreadPoolExecutor):
    """This rank's share of each global batch from step ``start + 1``, one step read ahead:
    ``(images (b, h, w, 3) float32, labels (b, h, w) int32, valid pixels of the global batch)``."""
    n, B = len(data.pairs), config.batch_size
    lo, hi = shard_bounds(B, ranks.size, ranks.rank)
    crop = tuple(config.image_size)

    def sample(position: int):
        epoch, index = divmod(position, n)
        order = sample_rng(config.seed, 1, epoch).permutation(n)
        image, label = load_pair(data.pairs[order[index]], data.dataset)
        return augment(image, label, crop, sample_rng(config.seed, 2, position), config.scale, IMAGENET_MEAN)

    def submit(step: int):
        return [pool.submit(sample, (step - 1) * B + i) for i in range(lo, hi)]

    pending = submit(start + 1) if start < total else None
    for step in range(start + 1, total + 1):
        futures, pending = pending, (submit(step + 1) if step < total else None)
        problem, samples = None, []
        try:
            samples = [f.result() for f in futures]
        except (ImageLoadError, ValueError) as e:
            problem = e
        check_ranks(ranks, problem)
        images = np.stack([_normalise(s[0]) for s in samples])
        labels = np.stack([s[1] for s in samples]).astype(np.int32)
        valid = float(ranks.all_sum(np.array([(labels != IGNORE).sum()], np.float64))[0])
        yield step, images, labels, valid


def _prepare(config: SegTrainConfig, ranks: Ranks):
    """Everything before the first step, on every rank: data checked, model and output ready."""
    data_root = Path(config.data)
    output = Path(config.output if config.output is not None else config.resume or "")
    if not str(output):
        raise TrainingError("--output is required")
    if config.batch_size < ranks.size:
        raise TrainingError(f"--batch-size {config.batch_size} is smaller than the {ranks.size} ranks")
    if any(s % 32 for s in config.image_size):
        raise TrainingError(f"--image-size {config.image_size[0]}x{config.image_size[1]}: use multiples of 32")
    target = check_train_output(output, [data_root, config.weights, config.val], config.force,
                                config.resume is not None and Path(config.resume) == output)
    classes = read_classes(Path(config.classes)) if config.classes is not None else None
    data = find_pairs(data_root, "train")
    val = find_pairs(Path(config.val), "val") if config.val is not None else None
    state, arrays = None, None
    if config.resume is not None:
        state, arrays = read_checkpoint(Path(config.resume))
        model = mlx_evit.load(config.resume, fuse=False)
        classes = model.labels
        if classes is None:
            raise TrainingError(f"--resume {config.resume}: the model folder has no class names")
    count = len(classes) if classes is not None else (get_dataset(data.dataset).num_classes if data.dataset else None)
    largest = check_pairs(data_root, data, count)
    if val is not None:
        check_pairs(Path(config.val), val, count if count is not None else largest + 1)
    if config.resume is None:
        mx.random.seed(config.seed)  # the same initial classifier on every rank
        model, classes = build_seg_model(config, classes, largest, data.dataset)
    return data, val, model, classes, output, target, state, arrays


def train_segmentation(config: SegTrainConfig, ranks: Optional[Ranks] = None) -> dict[str, Any]:
    """Train as configured (see the module docstring); returns a summary (steps, losses, mIoU, img/s).

    Raises :class:`~mlx_evit.tasks.training.TrainingError` (bad data, options, weights) before any step,
    :class:`~mlx_evit.tasks.transforms.ImageLoadError` and
    :class:`~mlx_evit.tasks.distributed.RankFailure` during training.
    """
    ranks = ranks if ranks is not None else Ranks(mx.distributed.init())
    log = config.log if ranks.rank == 0 else (lambda message: None)
    problem, prepared = None, None
    try:
        prepared = _prepare(config, ranks)
    except (ValueError, OSError, ImageLoadError) as e:
        problem = e if isinstance(e, TrainingError) else TrainingError(" ".join(str(e).split()))
    check_ranks(ranks, problem)
    data, val, model, classes, output, target, state, arrays = prepared
    n = len(data.pairs)
    total = config.steps if config.steps else (config.epochs or 1) * max(1, n // config.batch_size)
    if state is not None and state.get("total_steps") and not config.steps and not config.epochs:
        total = int(state["total_steps"])
    start = int(state["step"]) if state is not None else 0
    warmup = config.warmup if config.warmup is not None else min(max(total // 10, 1), 1500) if total > 1 else 0
    optimizer = make_optimizer(config, total, warmup)
    if arrays is not None:
        restore_optimizer(optimizer, model, arrays, str(config.resume))
    short = min(config.image_size)
    dataset_name = data.dataset if data.dataset and len(classes) == get_dataset(data.dataset).num_classes else "custom"
    palette = (get_dataset(dataset_name).palette if dataset_name in DATASETS else default_palette(len(classes)))
    model.pretrained_cfg = dict(dataset=dataset_name, input_size=[3, short, short], crop_mode="short_side",
                                size_multiple=32, interpolation="cv2_cubic", crop_pct=1.0, mean=list(IMAGENET_MEAN),
                                std=list(IMAGENET_STD), palette=palette.tolist())
    source = {"finetuned_from": str(config.weights or config.model or (state or {}).get("finetuned_from")),
              "data": str(config.data), "image_size": list(config.image_size), "batch_size": config.batch_size}
    run_state = dict(step=start, total_steps=total, seed=config.seed, lr=config.lr, schedule=config.schedule,
                     warmup=warmup, batch_size=config.batch_size, ranks=ranks.size, finetuned_from=source["finetuned_from"])
    inputs = [config.data, config.weights, config.val]

    def checkpoint(step: int, final: bool) -> None:
        sync_batch_norms(model, None, on=False)
        problem = None
        if ranks.rank == 0:
            try:
                save_checkpoint(model, output, inputs, optimizer, dict(run_state, step=step), labels=classes,
                                source=dict(source, steps=step), final=final)
            except (OSError, ValueError) as e:
                problem = TrainingError(f"cannot write --output {output}: {' '.join(str(e).split())}")
        sync_batch_norms(model, ranks.group, on=True)
        check_ranks(ranks, problem)

    log(f"{model.arch_name}: {len(classes)} classes, {n} training pairs ({data.layout} layout)"
        f"{f', {len(val.pairs)} validation' if val else ''}, crop {config.image_size[0]}x{config.image_size[1]}, "
        f"batch {config.batch_size}, steps {start + 1}-{total}, {ranks.describe()}")
    result: dict[str, Any] = {"classes": classes, "steps": total, "start_step": start}
    if val is not None and start == 0:
        result["miou_before"] = evaluate_miou(model, val, short, ranks, len(classes))
        log(f"validation mIoU before training {result['miou_before']:.4f}")
    scale_loss = ranks.size  # nn.average_gradients divides by the ranks; the loss is a share of the global mean
    upsample = nn.Upsample(scale_factor=8, mode="linear", align_corners=False)

    def loss_fn(x, y, valid):
        logits = upsample(model(x))
        mask = y != IGNORE
        ce = nn.losses.cross_entropy(logits, mx.where(mask, y, 0), reduction="none")
        return mx.where(mask, ce, 0.0).sum() * (scale_loss / valid)

    grad_fn = nn.value_and_grad(model, loss_fn)
    sync_batch_norms(model, ranks.group, on=True)
    model.train()
    last = min(total, config.stop_after) if config.stop_after else total
    progress = Progress(last - start, config.progress and ranks.rank == 0, bar=config.progress_bar)
    losses = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for step, images, labels, valid in _batches(config, data, start, last, ranks, pool):
            loss, grads = grad_fn(mx.array(images), mx.array(labels), mx.array(max(valid, 1.0)))
            grads = nn.average_gradients(grads)
            if config.clip:
                grads, _ = optim.clip_grad_norm(grads, config.clip)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss)
            loss = float(ranks.all_sum(np.array([loss.item()], np.float64))[0]) / ranks.size
            losses.append(loss)
            progress.update(step - start, loss, float(optimizer.learning_rate.item()), config.batch_size)
            if val is not None and config.val_every and step % config.val_every == 0 and step < last:
                miou = evaluate_miou(model, val, short, ranks, len(classes))
                model.train()
                progress.message(f"step {step}: validation mIoU {miou:.4f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < last:
                checkpoint(step, final=False)
    result["images_per_second"] = progress.images_per_second
    model.eval()
    if val is not None:
        result["miou"] = evaluate_miou(model, val, short, ranks, len(classes))
        source["validation_miou"] = result["miou"]
        log(f"validation mIoU {result['miou']:.4f}")
    checkpoint(last, final=last == total)
    sync_batch_norms(model, None, on=False)
    result.update(final_loss=losses[-1] if losses else None, first_loss=losses[0] if losses else None,
                  output=str(output), step=last)
    return result
