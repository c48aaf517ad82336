"""``python -m mlx_evit.segment train``: fine-tune EfficientViT-Seg on your own data (parsing and printing).

The library is :mod:`mlx_evit.tasks.seg_training`; what it shares with ``sam train`` is in
:mod:`mlx_evit.cli.training_options`.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from mlx_evit.cli.common import Console, command_parser, exit_status_text, prog_name, run_command
from mlx_evit.cli.training_options import (add_model_and_length, add_schedule_and_run, check_start, print_summary,
                                           train_and_report)

__all__ = ["main", "build_parser", "parse_size"]

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


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = command_parser(prog or f"{prog_name('segment')} train",
                       "Fine-tune EfficientViT-Seg on your own labelled images.", _EPILOG)
    add_model_and_length(p, "segment", "segmentation", "efficientvit_seg_b0_cityscapes", batch=8)
    p.add_argument("--classes", metavar="FILE", help="class names, one per line (default: the model's)")
    p.add_argument("--image-size", type=parse_size, default=(512, 512), metavar="HxW",
                   help="training crop, multiples of 32 (default: 512x512)")
    p.add_argument("--scale", type=_scale, default=(0.5, 2.0), metavar="LOW,HIGH",
                   help="random scale range (default: 0.5,2.0)")
    add_schedule_and_run(p, lr=3e-4, warmup="10%%, at most 1500", schedules=("poly", "cosine"),
                         val_help="validation data (same layouts): mIoU before, during, after",
                         seed_help="initialisation, order, augmentation")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry point; returns the exit status."""
    return run_command(build_parser(prog), argv, _run)


def _run(args: argparse.Namespace, console: Console) -> int:
    from mlx_evit.tasks.seg_training import SegTrainConfig, train_segmentation

    check_start(args, "segment")
    result, ranks, status = train_and_report(args, console, train_segmentation, SegTrainConfig,
                                             classes=args.classes, image_size=args.image_size, scale=args.scale)
    if result is None or ranks.rank != 0:
        return status
    return print_summary(result, args, ranks, "miou", "validation mIoU")
