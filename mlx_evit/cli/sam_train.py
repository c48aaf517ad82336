"""``python -m mlx_evit.sam train``: fine-tune EfficientViT-SAM on your own masks (parsing and printing).

The library is :mod:`mlx_evit.tasks.sam_training`.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from mlx_evit.cli.common import Console, command_parser, exit_status_text, prog_name, run_command
from mlx_evit.cli.common import positive_int as _positive
from mlx_evit.cli.training_options import (add_model_and_length, add_schedule_and_run, check_start, print_summary,
                                           train_and_report)

__all__ = ["main", "build_parser"]

_EPILOG = """\
data (DATA and --val):
  DATA/images/<stem>.jpg|png with DATA/masks/<stem>_<k>.png, one binary mask
  per instance; or a COCO-style JSON in DATA (--annotations FILE to name it)
  with polygons or RLE, images under DATA/images or DATA. Every mask is read
  before training: a mask without an image, a size that differs from its
  image, an empty mask stops the run with one line naming them.

what is trained (--train):
  decoder  the mask decoder; the image encoder is frozen and each image's
           embedding computed once (fast; 4 MiB of memory per image)
  encoder  the image encoder (the decoder frozen)
  all      everything

prompts (--prompts box,point): per step, the masks' boxes (jittered) or one
  point inside each (three outputs, the best one supervised); then
  --corrections rounds of a point in the error region.

output (-o/--output DIR): an MLX model folder for python -m mlx_evit.sam
  IMAGE --weights DIR, SamPredictor and SamAutomaticMaskGenerator; rewritten
  every --checkpoint-every steps with the optimizer state (--resume DIR). An
  existing folder is replaced only with --force, and only if it is an MLX
  model folder.

progress: a bar redrawn on a terminal (or with --progress), else a line
  every 10 steps; -q/--quiet: nothing on stderr but errors.

""" + exit_status_text((0, 1, 2, 3, 4, 130), notes={1: "an image could not be read once training had started"}) + """
examples:
  python -m mlx_evit.sam train data/ --output my_sam --model efficientvit_sam_l0 --steps 500 --val val/
  mlx.launch -n 2 python -m mlx_evit.sam train data/ --output my_sam --weights sam_l0_dir --train all
"""


def _prompts(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or any(k not in ("box", "point") for k in kinds):
        raise argparse.ArgumentTypeError(f"expected box, point or box,point; got {text!r}")
    return kinds


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = command_parser(prog or f"{prog_name('sam')} train",
                       "Fine-tune EfficientViT-SAM on your own instance masks.", _EPILOG)
    add_model_and_length(p, "sam", "SAM", "efficientvit_sam_l0", batch=4)
    p.add_argument("--annotations", metavar="FILE", help="COCO-style JSON of DATA's masks (default: DATA/masks, "
                   "else the JSON file in DATA)")
    p.add_argument("--train", choices=("decoder", "encoder", "all"), default="decoder", help="what to train")
    p.add_argument("--masks-per-image", type=_positive, default=4, metavar="N", help="masks sampled per image")
    p.add_argument("--prompts", type=_prompts, default=("box", "point"), metavar="KINDS",
                   help="box, point or box,point (default: box,point)")
    p.add_argument("--corrections", type=int, default=1, metavar="N", help="correction-point rounds")
    p.add_argument("--image-size", type=_positive, metavar="PX", help="encoder resolution (default: the model's)")
    p.add_argument("--focal-weight", type=float, default=20.0, metavar="W",
                   help="focal : dice loss weight (default 20, SAM's; 0 for a decoder trained from random weights)")
    add_schedule_and_run(p, lr=1e-4, warmup="5%%, at most 250", schedules=("cosine", "poly"),
                         val_help="validation data: mask IoU from box prompts before and after",
                         seed_help="order, prompts")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry point; returns the exit status."""
    return run_command(build_parser(prog), argv, _run)


def _run(args: argparse.Namespace, console: Console) -> int:
    from mlx_evit.tasks.sam_training import SamTrainConfig, train_sam

    check_start(args, "sam")
    result, ranks, status = train_and_report(
        args, console, train_sam, SamTrainConfig, annotations=args.annotations, train=args.train,
        masks_per_image=args.masks_per_image, prompts=args.prompts, corrections=args.corrections,
        image_size=args.image_size, focal_weight=args.focal_weight)
    if result is None or ranks.rank != 0:
        return status
    return print_summary(result, args, ranks, "iou", "validation mask IoU")
