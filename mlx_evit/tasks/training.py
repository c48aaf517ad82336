"""What the segmentation and SAM trainers share: schedules, synchronised BatchNorm, checkpoints, progress.

* :func:`lr_schedule`: linear warm-up, then a cosine or poly decay (a
  function of the optimizer's step, as ``mlx.optimizers`` takes it).
* :class:`SyncBatchNorm`: BatchNorm whose training statistics are those of
  the global batch over every ``mx.distributed`` rank (an ``all_sum`` of
  per-channel sums inside the graph; its gradient is an ``all_sum`` too), so
  N ranks train exactly as one process with the same global batch.
  :func:`sync_batch_norms` switches a model's BatchNorms to it and back.
* Checkpoints: the output folder *is* the checkpoint. Every ``--checkpoint-every``
  steps it is rewritten whole (:func:`mlx_evit.outputs.atomic_directory`):
  the MLX model folder (``config.json`` + ``model.safetensors``, loadable as
  it is) plus ``training_state.safetensors`` (optimizer moments, step) and
  ``training_state.json`` (step, seed, settings). Randomness is a pure
  function of (seed, step, sample), so resuming continues the same run.
* :class:`Progress`: ``step i/N loss lr img/s`` on stderr.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_evit.api import save_model
from mlx_evit.outputs import OutputDir, atomic_directory, check_output_dir
from mlx_evit.tasks.distributed import RankFailure, Ranks

__all__ = ["TrainingError", "lr_schedule", "SyncBatchNorm", "sync_batch_norms", "global_sum", "check_ranks",
           "save_checkpoint", "read_checkpoint", "make_optimizer", "OPTIMIZERS",
           "restore_optimizer", "Progress", "STATE_JSON",
           "STATE_WEIGHTS", "check_train_output", "sample_rng"]

STATE_JSON = "training_state.json"
STATE_WEIGHTS = "training_state.safetensors"
OPTIMIZERS = ("adamw", "sgd")


class TrainingError(ValueError):
    """Bad data, options or checkpoint; the one-line message names the file or option."""




@dataclass
class TrainConfig:
    """The options every trainer takes (:class:`~mlx_evit.tasks.seg_training.SegTrainConfig` and
    :class:`~mlx_evit.tasks.sam_training.SamTrainConfig` add their own and their defaults).

    ``model``: a registered name, its released weights unless ``pretrained=False``; ``weights``: a
    local checkpoint or MLX folder instead. ``steps`` or ``epochs``. ``resume``: a folder a trainer
    wrote (default output: that folder). ``stop_after``: save and stop after that step (the schedule
    still ends at ``steps``), for time-boxed runs.
    """

    data: Union[str, Path]
    output: Optional[Union[str, Path]] = None
    model: Optional[str] = None
    weights: Optional[Union[str, Path]] = None
    pretrained: bool = True
    steps: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: int = 8
    lr: float = 3e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    warmup: Optional[int] = None
    schedule: str = "poly"
    clip: float = 1.0
    val: Optional[Union[str, Path]] = None
    val_every: int = 0
    checkpoint_every: int = 0
    resume: Optional[Union[str, Path]] = None
    stop_after: Optional[int] = None
    seed: int = 0
    force: bool = False
    progress: bool = True
    progress_bar: Optional[bool] = None  # redraw the bar in place (None: when stderr is a terminal)
    log: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr, flush=True), repr=False)

def sample_rng(seed: int, *keys: int) -> np.random.Generator:
    """The random stream of one (seed, kind, step or sample) key: the same on every rank and after a resume."""
    return np.random.default_rng([int(seed), *map(int, keys)])


def lr_schedule(peak: float, steps: int, warmup: int, kind: str = "cosine",
                final: float = 0.01, power: float = 0.9) -> Callable[[mx.array], mx.array]:
    """Learning rate at an optimizer step: linear warm-up from ``final * peak`` over ``warmup`` steps,
    then ``"cosine"`` decay to ``final * peak`` or ``"poly"`` decay ``(1 - t) ** power`` at ``steps``."""
    if kind not in ("cosine", "poly"):
        raise TrainingError(f"--schedule must be cosine or poly, got {kind!r}")
    low = peak * final
    decay_steps = max(1, steps - warmup)

    def schedule(step: mx.array) -> mx.array:
        step = mx.array(step, mx.float32)
        t = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            lr = low + (peak - low) * 0.5 * (1.0 + mx.cos(math.pi * t))
        else:
            lr = low + (peak - low) * (1.0 - t) ** power
        if warmup:
            lr = mx.where(step < warmup, low + (peak - low) * step / warmup, lr)
        return lr

    return schedule


# ----------------------------------------------------------------------------- BatchNorm


def make_optimizer(config: "TrainConfig", total: int, warmup: int) -> optim.Optimizer:
    """``config.optimizer``: ``"adamw"`` (the default) or ``"sgd"`` (momentum 0.9), both with
    ``config.weight_decay`` and :func:`lr_schedule`. SGD's update is linear in the gradient, so runs
    that differ only by the rounding of the gradient (N ranks against one process) stay that close;
    AdamW divides by the gradient's running RMS, which turns round-off of near-zero gradients into
    updates of size ``lr`` (see tests/test_seg_training.py)."""
    if config.optimizer not in OPTIMIZERS:
        raise TrainingError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
    schedule = lr_schedule(config.lr, total, warmup, config.schedule)
    if config.optimizer == "sgd":
        return optim.SGD(learning_rate=schedule, momentum=0.9, weight_decay=config.weight_decay)
    return optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)


def global_sum(group: mx.distributed.Group) -> Callable[[mx.array], mx.array]:
    """``all_sum`` over ``group`` whose gradient is the ``all_sum`` of the cotangents.

    (MLX's own ``all_sum`` passes the cotangent through unchanged, which
    drops the other ranks' share of the gradient of a global statistic.)
    """

    @mx.custom_function
    def total(x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=group, stream=mx.cpu)

    @total.vjp
    def total_vjp(primals, cotangent, output):
        return mx.distributed.all_sum(cotangent, group=group, stream=mx.cpu)

    return total


class SyncBatchNorm(nn.BatchNorm):
    """:class:`mlx.nn.BatchNorm` with the statistics of the global batch (all ranks of ``group``).

    Set by :func:`sync_batch_norms` on an existing BatchNorm (its class is
    swapped; parameters and running statistics stay). Every rank must hold
    the same number of samples. On one rank the same sums are taken without
    communication, so one process and N ranks compute the same numbers.
    """

    group: Optional[mx.distributed.Group] = None

    def _calc_stats(self, x: mx.array, ddof: int = 0) -> tuple[mx.array, mx.array]:
        axes = tuple(range(x.ndim - 1))
        count = math.prod(x.shape[:-1])
        group = self.group
        ranks = 1 if group is None else group.size()

        total = (lambda v: v) if ranks == 1 else global_sum(group)

        x32 = x.astype(mx.float32)
        n = count * ranks
        mean = total(x32.sum(axis=axes)) / n
        var = total(mx.square(x32 - mean).sum(axis=axes)) / max(1, n - ddof)
        return mean.astype(x.dtype), var.astype(x.dtype)


def sync_batch_norms(model: nn.Module, group: Optional[mx.distributed.Group], on: bool = True) -> int:
    """Switch every BatchNorm of ``model`` to :class:`SyncBatchNorm` over ``group`` (``on``) or back to
    :class:`mlx.nn.BatchNorm`; returns how many."""
    count = 0
    for _, module in model.named_modules():
        if isinstance(module, nn.BatchNorm):
            if on:
                module.__class__ = SyncBatchNorm
                object.__setattr__(module, "group", group)
            else:
                module.__class__ = nn.BatchNorm
            count += 1
    return count


def check_ranks(ranks: Ranks, problem: Optional[Exception]) -> None:
    """A synchronisation point of all ranks: re-raises this rank's ``problem``, else :class:`RankFailure`
    if another rank reports one."""
    try:
        ranks.check(str(problem) if problem else None)
    except RankFailure:
        if problem:
            raise problem from None
        raise


# ----------------------------------------------------------------------------- checkpoints


def _is_training_output(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("format") == "mlx_evit"
    except (OSError, ValueError, AttributeError):
        return False


def check_train_output(output: Path, inputs: Iterable[Any], force: bool, resume: bool) -> OutputDir:
    """The checked ``--output`` folder, before any work: new, empty, or (with ``--force`` or ``--resume``)
    an MLX model folder. Raises :class:`TrainingError` naming the problem."""
    try:
        return check_output_dir(output, [i for i in inputs if i], force or resume, option="--output",
                                allow_empty=True, marker=_is_training_output, describe="an MLX model directory")
    except ValueError as e:
        raise TrainingError(str(e)) from None


def save_checkpoint(model: nn.Module, output: Path, inputs: Sequence[Any], optimizer: optim.Optimizer,
                    state: dict, labels: Optional[Sequence[str]] = None, source: Optional[dict] = None,
                    final: bool = False) -> Path:
    """Rewrite ``output`` whole: the model folder plus the training state (see the module docstring).

    ``state``: JSON-able (step, seed, ...). Called on rank 0 only; the folder
    was checked up front (:func:`check_train_output`), so replacing our own
    earlier checkpoint here is expected.
    """
    target = check_output_dir(output, inputs, True, option="--output", marker=_is_training_output,
                              describe="an MLX model directory")
    with atomic_directory(target) as tmp:
        save_model(model, tmp, labels=labels, source=source, force=True)
        arrays = dict(tree_flatten(optimizer.state))
        arrays = {k: v for k, v in arrays.items() if isinstance(v, mx.array)}
        mx.save_safetensors(str(tmp / STATE_WEIGHTS), arrays, metadata={"format": "mlx_evit_training"})
        (tmp / STATE_JSON).write_text(json.dumps(dict(state, final=final), indent=2) + "\n", encoding="utf-8")
    return output


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, mx.array]]:
    """(training state JSON, optimizer arrays) of a folder written by :func:`save_checkpoint`."""
    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        arrays = mx.load(str(folder / STATE_WEIGHTS))
    except FileNotFoundError as e:
        raise TrainingError(f"--resume {folder}: not a training checkpoint (no {Path(e.filename).name})") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise TrainingError(f"--resume {folder}: cannot read the training state ({' '.join(str(e).split())})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise TrainingError(f"--resume {folder}/{STATE_JSON}: no step count")
    return state, arrays


def restore_optimizer(optimizer: optim.Optimizer, model: nn.Module, arrays: dict[str, mx.array], where: str) -> None:
    """Set ``optimizer``'s state (moments, step) from :func:`read_checkpoint`'s arrays."""
    optimizer.init(model.trainable_parameters())
    expected = {k: v.shape for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
    got = {k: v.shape for k, v in arrays.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in got if got[k] != expected[k]]
        raise TrainingError(f"--resume {where}: the optimizer state does not fit this model and --train choice "
                            f"(e.g. {diff[0]})")
    optimizer.state = tree_unflatten(list(arrays.items()))


# ----------------------------------------------------------------------------- progress


class Progress:
    """``step i/N [bar] loss x lr y z img/s`` on stderr: redrawn on a terminal, else every ``every`` steps.

    ``bar``: redraw in place (True) or a line every ``every`` steps (False); None: on a terminal.
    """

    def __init__(self, total: int, enabled: bool = True, every: int = 10, stream=None, bar: Optional[bool] = None):
        self.total, self.enabled, self.every = total, enabled, max(1, every)
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)() if bar is None else bool(bar)
        self.start = time.perf_counter()
        self.images = 0

    def update(self, step: int, loss: float, lr: float, images: int, extra: str = "") -> None:
        self.images += images
        if not self.enabled or not (self.tty or step % self.every == 0 or step == self.total):
            return
        rate = self.images / max(1e-9, time.perf_counter() - self.start)
        bar = "#" * round(20 * step / max(1, self.total))
        line = f"step {step}/{self.total} [{bar:<20}] loss {loss:.4f} lr {lr:.2e} {rate:.1f} img/s{extra}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and step == self.total:
            self.stream.write("\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()

    @property
    def images_per_second(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.start)
