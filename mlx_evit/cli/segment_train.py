"""``python -m mlx_evit.segment train``: fine-tune EfficientViT-Seg on your own data (parsing and printing).

The library is :mod:`mlx_evit.tasks.seg_training`. :func:`check_start` and
:func:`train_and_report` are shared with ``sam train`` (:mod:`mlx_evit.cli.sam_train`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

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
    command_parser,
    exit_status_text,
    folder_output_name,
    model_name,
    prog_name,
    run_command,
    weights_path,
)
from mlx_evit.cli.common import positive_int as _positive

__all__ = ["main", "build_parser", "parse_size", "check_start", "train_and_report"]

_EPILOG = """\
data (DATA and --val):
  DATA/images/*.jpg|png with DATA/labels/<same name>.png: class index per
  pixel, 255 = ignore; or the Cityscapes (leftImg8bit/, gtFine/) or ADE20K
  (images/training, annotations/training) layouts. Every label is checked
  before training: a missing or extra file, a size that differs from the
  image, a value past the last class stops the run with one line naming them.

classes (--classes FILE): one name per line; its length sets the class count.
  Another count than the model's re-initialises the classifier layer only.

output (-o/--output DIR): an MLX model folder with the class names, a palette
  and the preprocessing: python -m mlx_evit.segment IMAGE --weights DIR,
  python -m mlx_evit.segment --eval IMAGES --labels-dir LABELS --weights DIR.
  It is rewritten whole every --checkpoint-every steps and at the end, with
  the optimizer state: --resume DIR continues exactly where it stopped. An
  existing folder is replaced only with --force, and only if it is an MLX
  model folder.

progress: a bar redrawn on a terminal (or with --progress), else a line
  every 10 steps; -q/--quiet: nothing on stderr but errors.

several processes or Macs (data parallel; the same global --batch-size):
  mlx.launch -n 2 python -m mlx_evit.segment train DATA --output OUT ...

""" + exit_status_text((0, 1, 2, 3, 4, 130), notes={1: "an image could not be read once training had started"}) + """
examples:
  python -m mlx_evit.segment train data/ --output my_seg --model efficientvit_seg_b0_cityscapes \\
      --classes classes.txt --steps 2000 --val val/
  python -m mlx_evit.segment train data/ --output my_seg --weights seg_b1_dir --image-size 512x1024
  python -m mlx_evit.segment train data/ --resume my_seg
"""


def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` or ``"512x1024"`` (height x width) -> (h, w)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 32:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW in pixels (at least 32), got {text!r}")
    return (values[0], values[-1])


def _scale(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return lo, hi


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = command_parser(prog or f"{prog_name('segment')} train",
                       "Fine-tune EfficientViT-Seg on your own labelled images.", _EPILOG)
    p.add_argument("data", metavar="DATA", help="training data folder (see below)")
    add_output(p, "folder", "MLX model folder to write (default: --resume's folder)")
    add_force(p, "replace an existing MLX model folder DIR")
    add_model_options(
        p, "segment",
        model_help="registered segmentation model to fine-tune, e.g. efficientvit_seg_b0_cityscapes, with or "
                   "without its tag ('timm/' prefix accepted); its released weights unless --no-pretrained "
                   "(default: none; give --model or --weights)",
        weights_help="start from a local checkpoint or MLX model folder instead (default: none)")
    p.add_argument("--no-pretrained", action="store_true", help="start --model from random weights")
    p.add_argument("--classes", metavar="FILE", help="class names, one per line (default: the model's)")
    p.add_argument("--steps", type=_positive, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=_positive, help="passes over the training images (default: 1)")
    add_batch_size(p, 8, "global batch: images per step over all ranks")
    p.add_argument("--image-size", type=parse_size, default=(512, 512), metavar="HxW",
                   help="training crop, multiples of 32 (default: 512x512)")
    p.add_argument("--lr", type=_nonnegative_float, default=3e-4, help="peak learning rate")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, metavar="STEPS", help="linear warm-up steps (default: 10%%, at most 1500)")
    p.add_argument("--schedule", choices=("poly", "cosine"), default="poly", help="decay after warm-up")
    p.add_argument("--clip", type=_nonnegative_float, default=1.0, help="gradient norm clip, 0 = off")
    p.add_argument("--scale", type=_scale, default=(0.5, 2.0), metavar="LOW,HIGH",
                   help="random scale range (default: 0.5,2.0)")
    p.add_argument("--val", metavar="DIR", help="validation data (same layouts): mIoU before, during, after "
                   "(default: none)")
    p.add_argument("--val-every", type=int, default=0, metavar="STEPS",
                   help="validate every STEPS, 0 = at the end only")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                   help="rewrite DIR every STEPS, 0 = only at the end")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (default: none)")
    p.add_argument("--stop-after", type=_positive, metavar="STEP",
                   help="save and stop after STEP, to resume later (default: run to the end)")
    p.add_argument("--seed", type=int, default=0, help="random seed (initialisation, order, augmentation)")
    add_format(p, ("text", "json"), "text", "the summary on stdout")
    add_progress(p)
    return p


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser(prog)
    return run_command(parser, argv, _run)


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
        lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, schedule=args.schedule, clip=args.clip,
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


def _run(args: argparse.Namespace, console: Console) -> int:
    from mlx_evit.tasks.seg_training import SegTrainConfig, train_segmentation

    check_start(args, "segment")
    result, ranks, status = train_and_report(args, console, train_segmentation, SegTrainConfig,
                                             classes=args.classes, image_size=args.image_size, scale=args.scale)
    if result is None or ranks.rank != 0:
        return status
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        before = f"{result['miou_before']:.4f} -> " if "miou_before" in result else ""
        miou = f", validation mIoU {before}{result['miou']:.4f}" if "miou" in result else ""
        print(f"trained steps {result['start_step'] + 1}-{result['step']} of {result['steps']} on "
              f"{ranks.describe()} ({result['images_per_second']:.1f} img/s){miou}; saved {result['output']}")
    return EXIT_OK
