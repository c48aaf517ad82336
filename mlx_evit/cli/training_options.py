"""What ``segment train`` and ``sam train`` share: their common options, the checks before anything loads,
running the trainer with errors as one line, and the summary they print.

The commands themselves (:mod:`mlx_evit.cli.segment_train`, :mod:`mlx_evit.cli.sam_train`) add their
own options and name their trainer and metric.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from mlx_evit.cli.common import (
    EXIT_INPUT,
    EXIT_OK,
    EXIT_RANK_FAILED,
    EXIT_USAGE,
    Console,
    UsageError,
    add_batch_size,
    add_force,
    add_format,
    add_model_options,
    add_output,
    add_progress,
    folder_output_name,
    model_name,
    weights_path,
)
from mlx_evit.cli.common import positive_int as _positive

__all__ = ["nonnegative_float", "add_model_and_length", "add_schedule_and_run", "check_start", "train_and_report",
           "print_summary"]


def nonnegative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_model_and_length(p: argparse.ArgumentParser, kind: str, what: str, example: str, batch: int) -> None:
    """DATA, ``-o``, ``--force``, ``-m``/``-w``, ``--no-pretrained``, ``--steps``/``--epochs``, ``-b``."""
    p.add_argument("data", metavar="DATA", help="training data folder (see below)")
    add_output(p, "folder", "MLX model folder to write (default: --resume's folder)")
    add_force(p, "replace an existing MLX model folder DIR")
    add_model_options(
        p, kind,
        model_help=f"registered {what} model to fine-tune, e.g. {example}, with or without its tag ('timm/' "
                   "prefix accepted); its released weights unless --no-pretrained (default: none; give --model "
                   "or --weights)",
        weights_help="start from a local checkpoint or MLX model folder instead (default: none)")
    p.add_argument("--no-pretrained", action="store_true", help="start --model from random weights")
    p.add_argument("--steps", type=_positive, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=_positive, help="passes over the training images (default: 1)")
    add_batch_size(p, batch, "global batch: images per step over all ranks")


def add_schedule_and_run(p: argparse.ArgumentParser, *, lr: float, warmup: str, schedules: Sequence[str],
                         val_help: str, seed_help: str) -> None:
    """The optimizer and schedule (``schedules[0]`` the default), validation, checkpoints, resume, seed,
    ``-f`` and progress."""
    p.add_argument("--lr", type=nonnegative_float, default=lr, help="peak learning rate")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="AdamW, or SGD with momentum 0.9 (default: adamw)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.01, help="weight decay")
    p.add_argument("--warmup", type=int, metavar="STEPS", help=f"linear warm-up steps (default: {warmup})")
    p.add_argument("--schedule", choices=tuple(schedules), default=schedules[0], help="decay after warm-up")
    p.add_argument("--clip", type=nonnegative_float, default=1.0, help="gradient norm clip, 0 = off")
    p.add_argument("--val", metavar="DIR", help=f"{val_help} (default: none)")
    p.add_argument("--val-every", type=int, default=0, metavar="STEPS",
                   help="validate every STEPS, 0 = at the end only")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                   help="rewrite DIR every STEPS, 0 = only at the end")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (default: none)")
    p.add_argument("--stop-after", type=_positive, metavar="STEP",
                   help="save and stop after STEP, to resume later (default: run to the end)")
    p.add_argument("--seed", type=int, default=0, help=f"random seed ({seed_help})")
    add_format(p, ("text", "json"), "text", "the summary on stdout")
    add_progress(p)


def check_start(args: argparse.Namespace, kind: str) -> None:
    """The checks of both trainers before anything loads: an output, a model, names and paths that exist."""
    if args.output is None and args.resume is None:
        raise UsageError("-o/--output DIR is required (or --resume DIR)")
    if args.resume is None and args.model is None and args.weights is None:
        raise UsageError("name the model to fine-tune: --model NAME or --weights PATH")
    if args.output is not None:
        folder_output_name(args.output, "an MLX model folder")
    if args.model is not None:
        args.model = model_name(args.model, kind)
    if args.weights is not None:
        weights_path(args.weights)


def train_and_report(args: argparse.Namespace, console: Console, trainer, config_type, **options) -> tuple:
    """Run ``trainer(config_type(...), ranks)``; (result or None, ranks, exit status) with errors as one line."""
    import mlx_evit  # noqa: F401  (BLAS set-up before mlx.core)
    from mlx_evit.errors import HubError
    from mlx_evit.tasks.distributed import RankFailure, Ranks
    from mlx_evit.tasks.training import TrainingError
    from mlx_evit.tasks.transforms import ImageLoadError

    ranks = Ranks(prog=console.prog)
    where = f"rank {ranks.rank}: " if ranks.distributed else ""
    stopped = "; stopping, nothing saved since the last checkpoint"
    config = config_type(
        data=Path(args.data), output=args.output, model=args.model, weights=args.weights,
        pretrained=not args.no_pretrained, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, warmup=args.warmup, schedule=args.schedule, clip=args.clip,
        val=args.val, val_every=args.val_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
        stop_after=args.stop_after, seed=args.seed, force=args.force, progress=not args.quiet,
        progress_bar=console.show_progress(), log=console.log, **options)
    try:
        return trainer(config, ranks), ranks, EXIT_OK
    except (TrainingError, HubError) as e:
        console.error(f"{where}{e}")
        return None, ranks, EXIT_USAGE
    except ImageLoadError as e:
        console.error(f"{where}{e}{stopped}")
        return None, ranks, EXIT_INPUT
    except RankFailure as e:
        console.error(f"{where}{e}{stopped}")
        return None, ranks, EXIT_RANK_FAILED


def print_summary(result: dict, args: argparse.Namespace, ranks, metric: str, label: str) -> int:
    """The run's summary on stdout (``-f json``: the whole result), with ``metric`` before and after."""
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return EXIT_OK
    before = f"{result[metric + '_before']:.4f} -> " if metric + "_before" in result else ""
    value = f", {label} {before}{result[metric]:.4f}" if metric in result else ""
    print(f"trained steps {result['start_step'] + 1}-{result['step']} of {result['steps']} on "
          f"{ranks.describe()} ({result['images_per_second']:.1f} img/s){value}; saved {result['output']}")
    return EXIT_OK
