"""``python -m mlx_evit.segment train``: fine-tune EfficientViT-Seg on your own data (parsing and printing).

The library is :mod:`mlx_evit.tasks.seg_training`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from mlx_evit.cli.common import EXIT_OK, EXIT_USAGE, guarded
from mlx_evit.cli.common import positive_int as _positive

__all__ = ["main", "build_parser", "parse_size"]

PROG = "python -m mlx_evit.segment train"
EXIT_DATA = 1

_EPILOG = """\
data (DATA and --val):
  DATA/images/*.jpg|png with DATA/labels/<same name>.png: class index per
  pixel, 255 = ignore; or the Cityscapes (leftImg8bit/, gtFine/) or ADE20K
  (images/training, annotations/training) layouts. Every label is checked
  before training: a missing or extra file, a size that differs from the
  image, a value past the last class stops the run with one line naming them.

classes (--classes FILE): one name per line; its length sets the class count.
  Another count than the model's re-initialises the classifier layer only.

output (--output OUT): an MLX model folder with the class names, a palette
  and the preprocessing: python -m mlx_evit.segment IMAGE --weights OUT,
  python -m mlx_evit.segment --eval IMAGES --labels-dir LABELS --weights OUT.
  It is rewritten whole every --checkpoint-every steps and at the end, with
  the optimizer state: --resume OUT continues exactly where it stopped.

several processes or Macs (data parallel; the same global --batch-size):
  mlx.launch -n 2 python -m mlx_evit.segment train DATA --output OUT ...

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Fine-tune EfficientViT-Seg on your own labelled images.",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="training data folder (see below)")
    p.add_argument("--output", "-o", metavar="OUT", help="model folder to write (default: --resume's)")
    p.add_argument("--model", "-m", metavar="NAME", help="registered model, e.g. efficientvit_seg_b0_cityscapes "
                   "(its released weights unless --no-pretrained)")
    p.add_argument("--no-pretrained", action="store_true", help="start --model from random weights")
    p.add_argument("--weights", "-w", metavar="PATH", help="start from a local checkpoint or MLX model folder")
    p.add_argument("--classes", metavar="FILE", help="class names, one per line")
    p.add_argument("--steps", type=_positive, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=_positive, help="passes over the training images (default 1)")
    p.add_argument("--batch-size", "-b", type=_positive, default=8, help="global batch (default 8)")
    p.add_argument("--image-size", type=parse_size, default=(512, 512), metavar="HxW",
                   help="training crop, multiples of 32 (default 512x512)")
    p.add_argument("--lr", type=_nonnegative_float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--warmup", type=int, metavar="STEPS", help="linear warm-up steps (default 10%%, at most 1500)")
    p.add_argument("--schedule", choices=("poly", "cosine"), default="poly", help="decay after warm-up (default poly)")
    p.add_argument("--clip", type=_nonnegative_float, default=1.0, help="gradient norm clip, 0 = off (default 1)")
    p.add_argument("--scale", type=_scale, default=(0.5, 2.0), metavar="LOW,HIGH",
                   help="random scale range (default 0.5,2.0)")
    p.add_argument("--val", metavar="DIR", help="validation data (same layouts): mIoU before, during, after")
    p.add_argument("--val-every", type=int, default=0, metavar="STEPS", help="validate every STEPS (default: at the end)")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                   help="rewrite OUT every STEPS, 0 = only at the end (default 500)")
    p.add_argument("--resume", metavar="OUT", help="continue the run saved in OUT")
    p.add_argument("--stop-after", type=_positive, metavar="STEP", help="save and stop after STEP (resume later)")
    p.add_argument("--seed", type=int, default=0, help="random seed (initialisation, order, augmentation)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT model folder")
    p.add_argument("--report", choices=("text", "json"), default="text", help="summary on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.output is None and args.resume is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: --output is required", file=sys.stderr)
        return EXIT_USAGE
    if args.resume is None and args.model is None and args.weights is None:
        print(f"{PROG}: error: name the model to fine-tune: --model NAME or --weights PATH", file=sys.stderr)
        return EXIT_USAGE
    return guarded(lambda: _run(args), lambda message: print(f"{PROG}: error: {message}", file=sys.stderr))


def _run(args: argparse.Namespace) -> int:
    import mlx_evit  # noqa: F401  (BLAS set-up before mlx.core)
    from mlx_evit.errors import HubError
    from mlx_evit.tasks.distributed import RankFailure, Ranks
    from mlx_evit.tasks.transforms import ImageLoadError
    from mlx_evit.tasks.seg_training import SegTrainConfig, train_segmentation
    from mlx_evit.tasks.training import TrainingError

    ranks = Ranks(prog=PROG)
    where = f"rank {ranks.rank}: " if ranks.distributed else ""
    config = SegTrainConfig(
        data=Path(args.data), output=args.output, model=args.model, weights=args.weights,
        pretrained=not args.no_pretrained, classes=args.classes, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, image_size=args.image_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup=args.warmup, schedule=args.schedule, clip=args.clip, scale=args.scale, val=args.val,
        val_every=args.val_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
        stop_after=args.stop_after, seed=args.seed, force=args.force, progress=not args.quiet,
        log=(lambda m: None) if args.quiet else (lambda m: print(f"{PROG}: {m}", file=sys.stderr, flush=True)))
    try:
        result = train_segmentation(config, ranks)
    except (TrainingError, HubError) as e:
        print(f"{PROG}: {where}error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except ImageLoadError as e:
        print(f"{PROG}: {where}error: {e}; stopping, nothing saved since the last checkpoint", file=sys.stderr)
        return EXIT_DATA
    except RankFailure as e:
        print(f"{PROG}: {where}error: {e}; stopping, nothing saved since the last checkpoint", file=sys.stderr)
        from mlx_evit.tasks.distributed import EXIT_RANK_FAILED
        return EXIT_RANK_FAILED
    if ranks.rank != 0:
        return EXIT_OK
    if args.report == "json":
        print(json.dumps(result, indent=2))
    else:
        before = f"{result['miou_before']:.4f} -> " if "miou_before" in result else ""
        miou = f", validation mIoU {before}{result['miou']:.4f}" if "miou" in result else ""
        print(f"trained steps {result['start_step'] + 1}-{result['step']} of {result['steps']} on "
              f"{ranks.describe()} ({result['images_per_second']:.1f} img/s){miou}; saved {result['output']}")
    return EXIT_OK
