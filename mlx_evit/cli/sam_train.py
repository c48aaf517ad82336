"""``python -m mlx_evit.sam train``: fine-tune EfficientViT-SAM on your own masks (parsing and printing).

The library is :mod:`mlx_evit.tasks.sam_training`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from mlx_evit.cli.common import EXIT_OK, EXIT_USAGE, guarded
from mlx_evit.cli.common import positive_int as _positive
from mlx_evit.cli.segment_train import _nonnegative_float

__all__ = ["main", "build_parser"]

PROG = "python -m mlx_evit.sam train"
EXIT_DATA = 1

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

output (--output OUT): an MLX model folder for python -m mlx_evit.sam
  IMAGE --weights OUT, SamPredictor and SamAutomaticMaskGenerator; rewritten
  every --checkpoint-every steps with the optimizer state (--resume OUT).

examples:
  python -m mlx_evit.sam train data/ --output my_sam --model efficientvit_sam_l0 --steps 500 --val val/
  mlx.launch -n 2 python -m mlx_evit.sam train data/ --output my_sam --weights sam_l0_dir --train all
"""


def _prompts(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or any(k not in ("box", "point") for k in kinds):
        raise argparse.ArgumentTypeError(f"expected box, point or box,point; got {text!r}")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Fine-tune EfficientViT-SAM on your own instance masks.",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="training data folder (see below)")
    p.add_argument("--output", "-o", metavar="OUT", help="model folder to write (default: --resume's)")
    p.add_argument("--model", "-m", metavar="NAME", help="registered model, e.g. efficientvit_sam_l0 (its "
                   "released weights unless --no-pretrained)")
    p.add_argument("--no-pretrained", action="store_true", help="start --model from random weights")
    p.add_argument("--weights", "-w", metavar="PATH", help="start from a local checkpoint or MLX model folder")
    p.add_argument("--annotations", metavar="FILE", help="COCO-style JSON of DATA's masks")
    p.add_argument("--train", choices=("decoder", "encoder", "all"), default="decoder",
                   help="what to train (default decoder)")
    p.add_argument("--steps", type=_positive, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=_positive, help="passes over the training images (default 1)")
    p.add_argument("--batch-size", "-b", type=_positive, default=4, help="images per global batch (default 4)")
    p.add_argument("--masks-per-image", type=_positive, default=4, help="masks sampled per image (default 4)")
    p.add_argument("--prompts", type=_prompts, default=("box", "point"), help="box, point or box,point (default)")
    p.add_argument("--corrections", type=int, default=1, help="correction-point rounds (default 1)")
    p.add_argument("--lr", type=_nonnegative_float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--warmup", type=int, metavar="STEPS", help="linear warm-up steps (default 5%%, at most 250)")
    p.add_argument("--schedule", choices=("cosine", "poly"), default="cosine", help="decay (default cosine)")
    p.add_argument("--clip", type=_nonnegative_float, default=1.0, help="gradient norm clip, 0 = off (default 1)")
    p.add_argument("--image-size", type=_positive, metavar="PX", help="encoder resolution (default: the model's)")
    p.add_argument("--val", metavar="DIR", help="validation data: mask IoU from box prompts before and after")
    p.add_argument("--val-every", type=int, default=0, metavar="STEPS", help="validate every STEPS too")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                   help="rewrite OUT every STEPS, 0 = only at the end (default 500)")
    p.add_argument("--resume", metavar="OUT", help="continue the run saved in OUT")
    p.add_argument("--stop-after", type=_positive, metavar="STEP", help="save and stop after STEP (resume later)")
    p.add_argument("--seed", type=int, default=0, help="random seed (order, prompts)")
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
        print(f"{PROG}: error: --output is required", file=sys.stderr)
        return EXIT_USAGE
    if args.resume is None and args.model is None and args.weights is None:
        print(f"{PROG}: error: name the model to fine-tune: --model NAME or --weights PATH", file=sys.stderr)
        return EXIT_USAGE
    return guarded(lambda: _run(args), lambda message: print(f"{PROG}: error: {message}", file=sys.stderr))


def _run(args: argparse.Namespace) -> int:
    import mlx_evit  # noqa: F401  (BLAS set-up before mlx.core)
    from mlx_evit.errors import HubError
    from mlx_evit.tasks.distributed import EXIT_RANK_FAILED, RankFailure, Ranks
    from mlx_evit.tasks.transforms import ImageLoadError
    from mlx_evit.tasks.sam_training import SamTrainConfig, train_sam
    from mlx_evit.tasks.training import TrainingError

    ranks = Ranks(prog=PROG)
    where = f"rank {ranks.rank}: " if ranks.distributed else ""
    config = SamTrainConfig(
        data=Path(args.data), output=args.output, model=args.model, weights=args.weights,
        pretrained=not args.no_pretrained, annotations=args.annotations, train=args.train, steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, masks_per_image=args.masks_per_image, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, schedule=args.schedule, clip=args.clip,
        prompts=args.prompts, corrections=args.corrections, image_size=args.image_size, val=args.val,
        val_every=args.val_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
        stop_after=args.stop_after, seed=args.seed, force=args.force, progress=not args.quiet,
        log=(lambda m: None) if args.quiet else (lambda m: print(f"{PROG}: {m}", file=sys.stderr, flush=True)))
    try:
        result = train_sam(config, ranks)
    except (TrainingError, HubError) as e:
        print(f"{PROG}: {where}error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except ImageLoadError as e:
        print(f"{PROG}: {where}error: {e}; stopping, nothing saved since the last checkpoint", file=sys.stderr)
        return EXIT_DATA
    except RankFailure as e:
        print(f"{PROG}: {where}error: {e}; stopping, nothing saved since the last checkpoint", file=sys.stderr)
        return EXIT_RANK_FAILED
    if ranks.rank != 0:
        return EXIT_OK
    if args.report == "json":
        print(json.dumps(result, indent=2))
    else:
        before = f"{result['iou_before']:.4f} -> " if "iou_before" in result else ""
        iou = f", validation mask IoU {before}{result['iou']:.4f}" if "iou" in result else ""
        print(f"trained steps {result['start_step'] + 1}-{result['step']} of {result['steps']} on "
              f"{ranks.describe()} ({result['images_per_second']:.1f} img/s){iou}; saved {result['output']}")
    return EXIT_OK
