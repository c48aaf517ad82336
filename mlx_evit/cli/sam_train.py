"""``python -m mlx_evit.sam train``: fine-tune EfficientViT-SAM on your own masks (parsing and printing).

The library is :mod:`mlx_evit.tasks.sam_training`.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from mlx_evit.cli.common import (
    EXIT_OK,
    Console,
    add_batch_size,
    add_force,
    add_format,
    add_model_options,
    add_output,
    add_progress,
    command_parser,
    exit_status_text,
    prog_name,
    run_command,
)
from mlx_evit.cli.common import positive_int as _positive
from mlx_evit.cli.segment_train import _nonnegative_float, check_start, train_and_report

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
    p.add_argument("data", metavar="DATA", help="training data folder (see below)")
    add_output(p, "folder", "MLX model folder to write (default: --resume's folder)")
    add_force(p, "replace an existing MLX model folder DIR")
    add_model_options(
        p, "sam",
        model_help="registered SAM model to fine-tune, e.g. efficientvit_sam_l0, with or without its tag "
                   "('timm/' prefix accepted); its released weights unless --no-pretrained "
                   "(default: none; give --model or --weights)",
        weights_help="start from a local checkpoint or MLX model folder instead (default: none)")
    p.add_argument("--no-pretrained", action="store_true", help="start --model from random weights")
    p.add_argument("--annotations", metavar="FILE", help="COCO-style JSON of DATA's masks (default: DATA/masks, "
                   "else the JSON file in DATA)")
    p.add_argument("--train", choices=("decoder", "encoder", "all"), default="decoder", help="what to train")
    p.add_argument("--steps", type=_positive, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=_positive, help="passes over the training images (default: 1)")
    add_batch_size(p, 4, "global batch: images per step over all ranks")
    p.add_argument("--masks-per-image", type=_positive, default=4, metavar="N", help="masks sampled per image")
    p.add_argument("--prompts", type=_prompts, default=("box", "point"), metavar="KINDS",
                   help="box, point or box,point (default: box,point)")
    p.add_argument("--corrections", type=int, default=1, metavar="N", help="correction-point rounds")
    p.add_argument("--lr", type=_nonnegative_float, default=1e-4, help="peak learning rate")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, metavar="STEPS", help="linear warm-up steps (default: 5%%, at most 250)")
    p.add_argument("--schedule", choices=("cosine", "poly"), default="cosine", help="decay after warm-up")
    p.add_argument("--clip", type=_nonnegative_float, default=1.0, help="gradient norm clip, 0 = off")
    p.add_argument("--image-size", type=_positive, metavar="PX", help="encoder resolution (default: the model's)")
    p.add_argument("--val", metavar="DIR", help="validation data: mask IoU from box prompts before and after "
                   "(default: none)")
    p.add_argument("--val-every", type=int, default=0, metavar="STEPS",
                   help="validate every STEPS, 0 = at the end only")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                   help="rewrite DIR every STEPS, 0 = only at the end")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (default: none)")
    p.add_argument("--stop-after", type=_positive, metavar="STEP",
                   help="save and stop after STEP, to resume later (default: run to the end)")
    p.add_argument("--seed", type=int, default=0, help="random seed (order, prompts)")
    add_format(p, ("text", "json"), "text", "the summary on stdout")
    add_progress(p)
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
        image_size=args.image_size)
    if result is None or ranks.rank != 0:
        return status
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        before = f"{result['iou_before']:.4f} -> " if "iou_before" in result else ""
        iou = f", validation mask IoU {before}{result['iou']:.4f}" if "iou" in result else ""
        print(f"trained steps {result['start_step'] + 1}-{result['step']} of {result['steps']} on "
              f"{ranks.describe()} ({result['images_per_second']:.1f} img/s){iou}; saved {result['output']}")
    return EXIT_OK
