"""Fine-tune EfficientViT-SAM on your own masks: the library behind ``python -m mlx_evit.sam train``.

Python::

    from mlx_evit.tasks.sam_training import SamTrainConfig, train_sam

    result = train_sam(SamTrainConfig(data="DATA", output="OUT", model="efficientvit_sam_l0", steps=500, val="VAL"))
    result["iou_before"], result["iou"]     # validation mask IoU from box prompts

Training as SAM does it (:mod:`mlx_evit.tasks.sam_train_data` reads the
data): every step takes ``batch_size`` images and up to
``masks_per_image`` of their masks; one prompt kind per step (``prompts``):
the mask's box, jittered (noise of 10% of the side, at most 20 pixels of
the 1024 frame), or one point drawn inside it. A single point is
ambiguous, so it gets the three multimask outputs and only the best of
them (lowest loss) is supervised. Then ``corrections`` rounds add a point
in the error region of the previous prediction (foreground where the mask
was missed, background where it overflowed), with that prediction's
logits as the mask input. Loss per mask: 20 x focal + dice on the 256x256
logits, plus the squared error of the predicted IoU against the IoU of the
predicted mask. ``focal_weight`` replaces the 20; 0 is dice alone, what a
decoder trained from random weights needs: the focal term, weighted to the
background, first drives it to predict nothing, and on small data it had
not recovered after 60 steps (README, "Fine-tune on your own data").

``train``: ``"decoder"`` (default) trains the mask decoder; the image
encoder stays frozen and each image's embedding is computed once and kept
(4 MiB per image, float32), which makes decoder fine-tuning fast on any
Mac. ``"encoder"`` trains the image encoder (its BatchNorms with global
batch statistics), ``"all"`` both and the prompt encoder. Data parallel
under ``mlx.launch`` as for segmentation (same global batch, gradients
averaged, rank 0 writes). The output is an MLX model folder that
``SamPredictor``, ``SamAutomaticMaskGenerator`` and ``python -m mlx_evit.sam
--weights OUT`` load as it is; it is also the checkpoint (``resume``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

import mlx_evit
from mlx_evit.models.registry import get_entry
from mlx_evit.tasks.distributed import Ranks, shard_bounds
from mlx_evit.tasks.transforms import ImageLoadError, load_image
from mlx_evit.tasks.sam_predictor import preprocess_image
from mlx_evit.tasks.sam_train_data import Prepared, check_and_prepare, find_instances
from mlx_evit.tasks.training import (Progress, TrainConfig, TrainingError, check_ranks, check_train_output, make_optimizer,
                                     read_checkpoint, restore_optimizer, sample_rng, save_checkpoint,
                                     sync_batch_norms)

__all__ = ["SamTrainConfig", "train_sam", "validation_iou", "TRAIN_CHOICES"]

TRAIN_CHOICES = ("decoder", "encoder", "all")
PathLike = Union[str, Path]
FOCAL_WEIGHT = 20.0  # SAM's focal : dice ratio (the default of focal_weight)
FOCAL_ALPHA = 0.25


@dataclass
class SamTrainConfig(TrainConfig):
    """Options of :func:`train_sam` (the command's, by the same names; the shared ones are
    :class:`~mlx_evit.tasks.training.TrainConfig`'s); see the module docstring.

    ``image_size``: another encoder resolution than the model's (small ones make quick experiments).
    """

    batch_size: int = 4
    lr: float = 1e-4
    schedule: str = "cosine"
    annotations: Optional[PathLike] = None
    train: str = "decoder"
    masks_per_image: int = 4
    prompts: Sequence[str] = ("box", "point")
    corrections: int = 1
    image_size: Optional[int] = None
    focal_weight: float = FOCAL_WEIGHT


def _load_pixels(path: Path) -> np.ndarray:
    try:
        return np.asarray(load_image(path))
    except ImageLoadError as e:
        raise ValueError(str(e)) from None


def build_sam_model(config: SamTrainConfig) -> nn.Module:
    """The model to train (unfused, eval mode)."""
    if config.resume is not None:
        model = mlx_evit.load(config.resume, fuse=False)
    elif config.weights is not None:
        model = mlx_evit.load(config.weights, fuse=False, model=config.model)
    elif config.model is None:
        raise TrainingError("name the model to fine-tune: --model NAME or --weights PATH")
    else:
        model = mlx_evit.create_model(config.model, pretrained=True if config.pretrained else None)
    if get_entry(model.arch_name).family != "sam":
        raise TrainingError(f"{model.arch_name} is not an EfficientViT-SAM model")
    if config.image_size and config.image_size != model.image_size:
        resized = mlx_evit.create_model(model.arch_name, **dict(model.arch_args, image_size=config.image_size))
        resized.load_weights(tree_flatten(model.parameters()))
        resized.pretrained_cfg = dict(model.pretrained_cfg or {}, input_size=[3, config.image_size, config.image_size])
        model = resized
    model.eval()
    return model


def set_trainable(model: nn.Module, train: str) -> None:
    """Freeze all but the trained part (``decoder``: mask decoder; ``encoder``: image encoder; ``all``:
    everything); BatchNorm running statistics are never trained parameters."""
    model.freeze()
    if train in ("decoder", "all"):
        model.mask_decoder.unfreeze()
    if train in ("encoder", "all"):
        model.image_encoder.unfreeze()
    if train == "all":
        model.prompt_encoder.unfreeze()
    model.image_encoder.freeze(keys=["running_mean", "running_var"], recurse=True, strict=False)


class Embeddings:
    """Image embeddings ``(64, 64, 256)`` float32 by item index, computed on first use by the frozen encoder."""

    def __init__(self, model: nn.Module, items: list[tuple[Path, Prepared]]):
        self.model, self.items, self.cache = model, items, {}

    def image(self, index: int) -> np.ndarray:
        return preprocess_image(_load_pixels(self.items[index][0]), self.model.image_size)[1]

    def __call__(self, indices: Sequence[int]) -> mx.array:
        missing = [i for i in dict.fromkeys(indices) if i not in self.cache]
        for i in missing:
            out = self.model.image_encoder(mx.array(self.image(i)[None]))
            self.cache[i] = np.array(out[0])
        return mx.array(np.stack([self.cache[i] for i in indices]))


CALIBRATION_IMAGES = 64


def calibrate_batch_norms(encoder: nn.Module, images: Sequence[np.ndarray], batch: int = 8) -> int:
    """Set the BatchNorm running statistics of a from-scratch image encoder to the average of its batch
    statistics over ``images`` (preprocessed, one forward pass per ``batch``); returns how many BatchNorms.

    A random encoder's statistics (mean 0, variance 1) never saw data: in eval mode its embedding is
    then nearly the same at every position, so a decoder trained on it cannot follow the image (on the
    README's example images at 256 px, the embedding's spatial standard deviation is 6% of its mean
    magnitude; 90% after calibration). Training the encoder would set these statistics in its first
    steps; a frozen one gets them here.
    """
    norms = [m for _, m in encoder.named_modules() if isinstance(m, nn.BatchNorm)]
    momentum = [m.momentum for m in norms]
    encoder.train()
    for j, lo in enumerate(range(0, len(images), batch)):
        for m in norms:
            m.momentum = 1.0 / (j + 1)  # running average over the batches
        encoder(mx.array(np.stack(images[lo:lo + batch])))
        mx.eval([(m.running_mean, m.running_var) for m in norms])
    for m, value in zip(norms, momentum):
        m.momentum = value
    encoder.eval()
    return len(norms)


def _losses(model: nn.Module, embeddings: mx.array, image_index: mx.array, prompts: dict, targets: mx.array,
            multimask: bool, focal_weight: float = FOCAL_WEIGHT) -> tuple[mx.array, mx.array]:
    """(per-prompt loss ``(P,)``, low-res logits of the supervised output ``(P, 256, 256)``)."""
    pe = model.prompt_encoder
    sparse, dense = pe(prompts.get("points"), prompts.get("boxes"), prompts.get("masks"))
    low, iou = model.mask_decoder(mx.take(embeddings, image_index, axis=0), pe.dense_pe(), sparse, dense, multimask)
    t = targets[:, None]
    p = mx.sigmoid(low)
    ce = mx.logaddexp(0.0, low) - low * t  # binary cross-entropy with logits
    pt = p * t + (1 - p) * (1 - t)
    focal = ((FOCAL_ALPHA * t + (1 - FOCAL_ALPHA) * (1 - t)) * (1 - pt) ** 2 * ce).mean(axis=(2, 3))
    dice = 1 - (2 * (p * t).sum(axis=(2, 3)) + 1) / (p.sum(axis=(2, 3)) + t.sum(axis=(2, 3)) + 1)
    combined = focal_weight * focal + dice  # (P, C)
    hard = mx.stop_gradient(low > 0)
    inter, union = (hard * t).sum(axis=(2, 3)), mx.maximum(hard, t).sum(axis=(2, 3))
    actual = mx.stop_gradient(inter / mx.maximum(union, 1.0))
    iou_loss = mx.square(iou - actual).mean(axis=1)
    best = mx.argmin(mx.stop_gradient(combined), axis=1)[:, None]
    mask_loss = mx.take_along_axis(combined, best, axis=1)[:, 0]
    chosen = mx.take_along_axis(low, best[:, :, None, None], axis=1)[:, 0]
    return mask_loss + iou_loss, chosen


def _first_prompts(kind: str, prepared: list[Prepared], picks: list[np.ndarray], rngs) -> dict:
    """Round-0 prompts in the 1024 frame: jittered boxes, or one point inside each mask."""
    if kind == "box":
        boxes = []
        for prep, pick, rng in zip(prepared, picks, rngs):
            for k in pick:
                box = prep.boxes[k].astype(np.float64)
                side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
                noise = np.clip(rng.normal(0, 1, 4) * 0.1 * side, -20, 20)
                boxes.append(np.clip(box + noise, 0, 1023))
        boxes = np.sort(np.array(boxes).reshape(-1, 2, 2), axis=1).reshape(-1, 4)  # keep x0 <= x1, y0 <= y1
        return {"boxes": mx.array(boxes.astype(np.float32))}
    points = []
    for prep, pick, rng in zip(prepared, picks, rngs):
        for k in pick:
            ys, xs = np.nonzero(prep.targets[k])
            j = rng.integers(len(ys)) if len(ys) else None
            points.append(((xs[j] + 0.5) * 4, (ys[j] + 0.5) * 4) if j is not None else tuple(prep.boxes[k][:2]))
    coords = np.array(points, np.float32)[:, None]
    return {"points": (mx.array(coords), mx.ones((len(points), 1), mx.int32))}


def _correction(prompts: dict, previous: np.ndarray, targets: np.ndarray, valid: np.ndarray,
                rngs: list[np.random.Generator]) -> dict:
    """Add a point in each prompt's error region (label: the target there) and the previous logits as mask input."""
    coords, labels = [], []
    for i, rng in enumerate(rngs):
        error = ((previous[i] > 0) != targets[i]) & valid[i]
        ys, xs = np.nonzero(error)
        if not len(ys):
            ys, xs = np.nonzero(targets[i])
        j = rng.integers(len(ys))
        coords.append(((xs[j] + 0.5) * 4, (ys[j] + 0.5) * 4))
        labels.append(int(targets[i][ys[j], xs[j]]))
    new_c = mx.array(np.array(coords, np.float32)[:, None])
    new_l = mx.array(np.array(labels, np.int32)[:, None])
    out = dict(prompts)
    if "points" in prompts:
        c, lab = prompts["points"]
        out["points"] = (mx.concatenate([c, new_c], axis=1), mx.concatenate([lab, new_l], axis=1))
    else:
        out["points"] = (new_c, new_l)
    out["masks"] = mx.array(previous[..., None])
    return out


def validation_iou(model: nn.Module, embeddings: Embeddings, ranks: Ranks,
                   focal_weight: float = FOCAL_WEIGHT) -> tuple[float, float]:
    """(mean mask IoU, mean loss) over the validation masks from their exact boxes (one output); the IoU
    in the 256 frame's image region. Each rank its share of the images."""
    lo, hi = shard_bounds(len(embeddings.items), ranks.size, ranks.rank)
    total = np.zeros(3)
    for i in range(lo, hi):
        prep = embeddings.items[i][1]
        targets = mx.array(prep.targets.astype(np.float32))
        losses, low = _losses(model, embeddings([i]), mx.zeros((len(targets),), mx.int32),
                              {"boxes": mx.array(prep.boxes)}, targets, False, focal_weight)
        h, w = prep.valid
        pred = np.array(low[:, :h, :w]) > 0
        t = prep.targets[:, :h, :w]
        union = (pred | t).sum(axis=(1, 2))
        total += [((pred & t).sum(axis=(1, 2)) / np.maximum(union, 1)).sum(), float(losses.sum()), len(t)]
    s, loss, n = ranks.all_sum(total)
    return float(s / max(n, 1)), float(loss / max(n, 1))


def _prepare(config: SamTrainConfig, ranks: Ranks):
    if not (config.focal_weight >= 0 and np.isfinite(config.focal_weight)):
        raise TrainingError(f"--focal-weight must be a finite number >= 0, got {config.focal_weight}")
    if config.train not in TRAIN_CHOICES:
        raise TrainingError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, got {config.train!r}")
    bad = [p for p in config.prompts if p not in ("box", "point")]
    if bad or not config.prompts:
        raise TrainingError(f"--prompts: expected box and/or point, got {','.join(config.prompts)}")
    if config.batch_size < ranks.size:
        raise TrainingError(f"--batch-size {config.batch_size} is smaller than the {ranks.size} ranks")
    output = Path(config.output if config.output is not None else config.resume or "")
    if not str(output):
        raise TrainingError("--output is required")
    check_train_output(output, [config.data, config.weights, config.val, config.annotations], config.force,
                       config.resume is not None and Path(config.resume) == output)
    train = check_and_prepare(Path(config.data), find_instances(Path(config.data), config.annotations), _load_pixels)
    val = (check_and_prepare(Path(config.val), find_instances(Path(config.val)), _load_pixels)
           if config.val is not None else None)
    state, arrays = read_checkpoint(Path(config.resume)) if config.resume is not None else (None, None)
    mx.random.seed(config.seed)
    return output, train, val, build_sam_model(config), state, arrays


def train_sam(config: SamTrainConfig, ranks: Optional[Ranks] = None) -> dict[str, Any]:
    """Train as configured; returns a summary (steps, losses, validation IoU before/after, img/s).

    Raises :class:`~mlx_evit.tasks.training.TrainingError` before any step (bad data, options, weights).
    """
    ranks = ranks if ranks is not None else Ranks(mx.distributed.init())
    log = config.log if ranks.rank == 0 else (lambda message: None)
    problem, prepared = None, None
    try:
        prepared = _prepare(config, ranks)
    except (ValueError, OSError) as e:
        problem = e if isinstance(e, TrainingError) else TrainingError(" ".join(str(e).split()))
    check_ranks(ranks, problem)
    output, train, val, model, state, arrays = prepared
    n, B = len(train), config.batch_size
    total = config.steps if config.steps else (config.epochs or 1) * max(1, n // B)
    start = int(state["step"]) if state is not None else 0
    warmup = config.warmup if config.warmup is not None else min(max(total // 20, 1), 250) if total > 1 else 0
    set_trainable(model, config.train)
    optimizer = make_optimizer(config, total, warmup)
    if arrays is not None:
        restore_optimizer(optimizer, model, arrays, str(config.resume))
    frozen_encoder = config.train == "decoder"
    cache = Embeddings(model, train)
    if frozen_encoder and start == 0 and not config.pretrained and config.weights is None:
        images = [cache.image(i) for i in range(min(n, CALIBRATION_IMAGES))]  # the same on every rank
        calibrate_batch_norms(model.image_encoder, images)
        log(f"random encoder: BatchNorm statistics set from {len(images)} training images")
    val_cache = Embeddings(model, val) if val is not None else None
    source = {"finetuned_from": str(config.weights or config.model or (state or {}).get("finetuned_from")),
              "data": str(config.data), "train": config.train, "batch_size": B}
    run_state = dict(step=start, total_steps=total, seed=config.seed, lr=config.lr, train=config.train,
                     finetuned_from=source["finetuned_from"], ranks=ranks.size)
    inputs = [config.data, config.weights, config.val, config.annotations]

    def checkpoint(step: int, final: bool) -> None:
        sync_batch_norms(model, None, on=False)
        model.unfreeze()  # save_model compares every parameter
        problem = None
        if ranks.rank == 0:
            try:
                save_checkpoint(model, output, inputs, optimizer, dict(run_state, step=step),
                                source=dict(source, steps=step), final=final)
            except (OSError, ValueError) as e:
                problem = TrainingError(f"cannot write --output {output}: {' '.join(str(e).split())}")
        check_ranks(ranks, problem)

    masks = sum(len(p.targets) for _, p in train)
    log(f"{model.arch_name} at {model.image_size} px: training the {config.train}, {n} images / {masks} masks, "
        f"batch {B} images x {config.masks_per_image} masks, steps {start + 1}-{total}, {ranks.describe()}")
    result: dict[str, Any] = {"steps": total, "start_step": start}
    if val_cache is not None and start == 0:
        result["iou_before"], result["val_loss_before"] = validation_iou(model, val_cache, ranks, config.focal_weight)
        log(f"validation (boxes) before training: mask IoU {result['iou_before']:.4f}, "
            f"loss {result['val_loss_before']:.4f}")
    if not frozen_encoder:
        sync_batch_norms(model.image_encoder, ranks.group, on=True)
    lo, hi = shard_bounds(B, ranks.size, ranks.rank)
    last = min(total, config.stop_after) if config.stop_after else total
    progress = Progress(last - start, config.progress and ranks.rank == 0, bar=config.progress_bar)
    rounds = 1 + max(0, config.corrections)

    def loss_fn(source, image_index, round_prompts, targets, multimask, count):
        embeddings = source if frozen_encoder else model.image_encoder(source)
        loss = mx.array(0.0)
        for r, prompts in enumerate(round_prompts):
            per_prompt, _ = _losses(model, embeddings, image_index, prompts, targets, multimask and r == 0,
                                    config.focal_weight)
            loss = loss + per_prompt.sum()
        return loss * (ranks.size / (count * rounds))

    grad_fn = nn.value_and_grad(model, loss_fn)
    for step in range(start + 1, last + 1):
        kind = config.prompts[int(sample_rng(config.seed, 3, step).integers(len(config.prompts)))]
        items, picks, rngs = [], [], []
        for position in range((step - 1) * B + lo, (step - 1) * B + hi):
            epoch, index = divmod(position, n)
            item = int(sample_rng(config.seed, 1, epoch).permutation(n)[index])
            rng = sample_rng(config.seed, 2, position)
            k = len(train[item][1].targets)
            items.append(item)
            picks.append(np.sort(rng.choice(k, size=min(k, config.masks_per_image), replace=False)))
            rngs.append(rng)
        prepared = [train[i][1] for i in items]
        targets_np = np.concatenate([p.targets[pick] for p, pick in zip(prepared, picks)])
        valid = np.zeros_like(targets_np)
        image_index = np.repeat(np.arange(len(items)), [len(p) for p in picks])
        prompt_rngs = [rngs[j] for j in image_index]
        for r, j in enumerate(image_index):
            h, w = prepared[j].valid
            valid[r, :h, :w] = True
        count = float(ranks.all_sum(np.array([len(targets_np)], np.float64))[0])
        problem = None
        try:
            source_x = cache(items) if frozen_encoder else mx.array(np.stack([cache.image(i) for i in items]))
        except ValueError as e:
            problem = ImageLoadError(str(e))
        check_ranks(ranks, problem)
        image_index, targets = mx.array(image_index), mx.array(targets_np.astype(np.float32))
        multimask = kind == "point"
        round_prompts = [_first_prompts(kind, prepared, picks, rngs)]
        embeddings = source_x
        if not frozen_encoder and rounds > 1:  # the correction rounds' inputs: no gradient, no BN update
            stats = [(k, v) for k, v in tree_flatten(model.image_encoder.parameters()) if "running" in k]
            embeddings = mx.stop_gradient(model.image_encoder(source_x))
            model.image_encoder.update(tree_unflatten(stats))
        for r in range(1, rounds):
            _, chosen = _losses(model, embeddings, image_index, round_prompts[-1], targets, multimask and r == 1)
            round_prompts.append(_correction(round_prompts[-1], np.array(chosen), targets_np, valid, prompt_rngs))
        if not frozen_encoder:
            model.image_encoder.train()
        loss, grads = grad_fn(source_x, image_index, round_prompts, targets, multimask, count)
        grads = nn.average_gradients(grads)
        if config.clip:
            grads, _ = optim.clip_grad_norm(grads, config.clip)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        model.eval()
        loss = float(ranks.all_sum(np.array([loss.item()], np.float64))[0]) / ranks.size
        progress.update(step - start, loss, float(optimizer.learning_rate.item()), B)
        if not frozen_encoder:
            cache.cache.clear()
            if val_cache is not None:
                val_cache.cache.clear()
        if val_cache is not None and config.val_every and step % config.val_every == 0 and step < last:
            iou, val_loss = validation_iou(model, val_cache, ranks, config.focal_weight)
            progress.message(f"step {step}: validation (boxes) mask IoU {iou:.4f}, loss {val_loss:.4f}")
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < last:
            checkpoint(step, final=False)
            set_trainable(model, config.train)
            if not frozen_encoder:
                sync_batch_norms(model.image_encoder, ranks.group, on=True)
    result["images_per_second"] = progress.images_per_second
    if val_cache is not None:
        result["iou"], result["val_loss"] = validation_iou(model, val_cache, ranks, config.focal_weight)
        source["validation_iou"] = result["iou"]
        log(f"validation (boxes): mask IoU {result['iou']:.4f}, loss {result['val_loss']:.4f}")
    checkpoint(last, final=last == total)
    result.update(output=str(output), step=last)
    return result
