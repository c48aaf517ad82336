"""``python -m mlx_evit.sam``: promptable segmentation of one image with EfficientViT-SAM.

The library is :mod:`mlx_evit.sam` (:class:`~mlx_evit.sam.SamPredictor`,
:class:`~mlx_evit.sam.SamAutomaticMaskGenerator`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from mlx_evit.ops.dtypes import DTYPE_NAMES as DTYPES
from mlx_evit.errors import one_line
from mlx_evit.cli.common import EXIT_FAILED as EXIT_IMAGE_FAILED
from mlx_evit.cli.common import unit_fraction as _fraction
from mlx_evit.cli.common import EXIT_OK, EXIT_USAGE, guarded
from mlx_evit.cli.common import positive_int as _positive

__all__ = ["main", "build_parser", "parse_point", "parse_box"]

PROG = "python -m mlx_evit.sam"
DEFAULT_MODEL = "efficientvit_sam_l0"
# Mask colours of the overlay (RGB), cycled.
PALETTE = np.array([[30, 144, 255], [255, 64, 64], [64, 200, 64], [255, 200, 0], [200, 64, 255],
                    [0, 220, 220], [255, 128, 0], [160, 160, 160]], np.uint8)

_EPILOG = """\
prompts (pixel coordinates of IMAGE, x to the right, y down):
  --point X,Y[,LABEL]  a point; LABEL 1 (foreground, the default) or 0
                       (background); repeat for several points
  --box X0,Y0,X1,Y1    a box; several --box options (without --point) are
                       decoded in one batch, one result per box
  --multimask          three candidate masks per prompt instead of one
  --everything         segment everything (automatic mask generator; no prompts)

outputs (--output-dir DIR; NAME is the image file name without extension):
  NAME_mask<i>.png     each mask, 0/255 grayscale, at the image size
  NAME_overlay.png     the masks coloured over the image, prompts drawn
  NAME.json            per mask: predicted IoU, box (XYXY, inclusive), area,
                       the prompt it came from (--everything: Meta's record
                       fields: bbox XYWH, predicted_iou, stability_score, ...)
  Existing files are replaced only with --force; DIR must not hold an input.
  The folder is checked before the model loads.

exit status:
  0 done   1 the image could not be read   2 bad arguments, model, weights
  or output   3 unexpected error (rerun with MLX_EVIT_DEBUG=1)   130 interrupted

examples:
  python -m mlx_evit.sam photo.jpg --point 320,200 --output-dir out/
  python -m mlx_evit.sam photo.jpg --point 320,200 --point 100,80,0 --box 50,40,600,420 -o out/
  python -m mlx_evit.sam photo.jpg --box 10,10,200,200 --box 220,30,400,300 -o out/ --multimask
  python -m mlx_evit.sam photo.jpg --everything --model efficientvit_sam_xl0 -o out/
  python -m mlx_evit.sam photo.jpg --point 320,200 --weights efficientvit_sam_l0.pt -o out/
"""


def _numbers(text: str, counts: Sequence[int], what: str) -> list[float]:
    parts = text.split(",")
    if len(parts) not in counts:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} (numbers), got {text!r}") from None
    if not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"expected finite numbers in {what}, got {text!r}")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """``"X,Y"`` or ``"X,Y,LABEL"`` -> (x, y, label), label 1 (foreground) or 0 (background)."""
    v = _numbers(text, (2, 3), "X,Y or X,Y,LABEL")
    label = 1 if len(v) == 2 else v[2]
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(f"point label must be 1 (foreground) or 0 (background), got {text!r}")
    return v[0], v[1], int(label)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"X0,Y0,X1,Y1"`` -> the box, with X0 <= X1 and Y0 <= Y1."""
    x0, y0, x1, y1 = _numbers(text, (4,), "X0,Y0,X1,Y1")
    if x1 < x0 or y1 < y0:
        raise argparse.ArgumentTypeError(f"box corners must satisfy X0 <= X1 and Y0 <= Y1, got {text!r}")
    return x0, y0, x1, y1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Segment an image with EfficientViT-SAM from point "
                                "and box prompts, or segment everything.", epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, ...)")
    p.add_argument("--point", action="append", type=parse_point, default=[], metavar="X,Y[,LABEL]")
    p.add_argument("--box", action="append", type=parse_box, default=[], metavar="X0,Y0,X1,Y1")
    p.add_argument("--multimask", action="store_true", help="three masks per prompt")
    p.add_argument("--everything", action="store_true", help="automatic mask generation (no prompts)")
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR", help="folder for the masks, overlay, json")
    p.add_argument("--force", action="store_true", help="replace existing files in DIR")
    p.add_argument("--model", default=None, metavar="NAME",
                   help=f"efficientvit_sam_l0/_l1/_l2 (512) or _xl0/_xl1 (1024); default {DEFAULT_MODEL}")
    p.add_argument("--weights", metavar="PATH", help="original .pt, any checkpoint the converter reads, or a "
                   "converted folder (default: download the model's released file)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations (default float32)")
    p.add_argument("--alpha", type=_fraction, default=0.5, help="mask opacity in the overlay (default 0.5)")
    g = p.add_argument_group("--everything options")
    g.add_argument("--points-per-side", type=_positive, default=32)
    g.add_argument("--points-per-batch", type=_positive, default=64)
    g.add_argument("--pred-iou-thresh", type=_fraction, default=0.88)
    g.add_argument("--stability-thresh", type=_fraction, default=0.95)
    g.add_argument("--crop-layers", type=int, choices=range(0, 4), default=0, metavar="{0,1,2,3}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the web app: mlx_evit.cli.sam_serve
        from mlx_evit.cli.sam_serve import main as serve
        return serve(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)

    def error(message: str) -> None:
        print(f"{PROG}: error: {one_line(message)}", file=sys.stderr, flush=True)

    return guarded(lambda: _run(args, error), error)


def _log(args: argparse.Namespace) -> Callable[[str], None]:
    def log(message: str) -> None:
        if not args.quiet:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    return log


def _load_model(args: argparse.Namespace, error: Callable[[str], None]):
    from mlx_evit import load
    from mlx_evit.loading.hub import HubError
    from mlx_evit.models.registry import get_entry
    from mlx_evit.sam import EfficientViTSam

    name = args.model or (None if args.weights else DEFAULT_MODEL)
    if name is not None:
        try:
            entry = get_entry(name)
        except ValueError as e:
            error(str(e))
            return None
        if entry.family != "sam":
            error(f"--model {name}: not an EfficientViT-SAM model (choose efficientvit_sam_l0/_l1/_l2/_xl0/_xl1)")
            return None
    source = args.weights
    try:
        if source is None:
            from mlx_evit.api import pretrained_weights

            source = pretrained_weights(name, log=_log(args))
        net = load(source, dtype=args.dtype, model=name)
    except HubError as e:  # offline or unreachable with nothing cached: the message says what to do
        error(str(e))
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        if os.fspath(source) not in message:
            message = f"{os.fspath(source)}: {message}"
        error(f"cannot load weights: {message}")
        return None
    if not isinstance(net, EfficientViTSam):
        error(f"{os.fspath(source)} holds {getattr(net, 'arch_name', type(net).__name__)}, not an EfficientViT-SAM model")
        return None
    return net


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def overlay(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float, points=(), boxes=()) -> np.ndarray:
    """The masks blended over ``image`` in :data:`PALETTE` colours, points as dots, boxes as outlines."""
    out = image.astype(np.float32)
    for i, m in enumerate(masks):
        out[m] = (1 - alpha) * out[m] + alpha * PALETTE[i % len(PALETTE)]
    out = out.round().clip(0, 255).astype(np.uint8)
    h, w = out.shape[:2]
    for x0, y0, x1, y1 in boxes:
        xa, xb = int(np.clip(round(x0), 0, w - 1)), int(np.clip(round(x1), 0, w - 1))
        ya, yb = int(np.clip(round(y0), 0, h - 1)), int(np.clip(round(y1), 0, h - 1))
        for y in (ya, yb):
            out[y, xa : xb + 1] = (0, 255, 0)
        for x in (xa, xb):
            out[ya : yb + 1, x] = (0, 255, 0)
    r = max(2, min(h, w) // 150)
    for x, y, label in points:
        xi, yi = int(round(x)), int(round(y))
        out[max(yi - r, 0) : yi + r + 1, max(xi - r, 0) : xi + r + 1] = (0, 255, 0) if label else (255, 0, 0)
    return out


def _box_xyxy(mask: np.ndarray) -> Optional[list[int]]:
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(ys):
        return None
    return [int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])]


def _run(args: argparse.Namespace, error: Callable[[str], None]) -> int:
    from mlx_evit.outputs import OutputError, check_output_dir
    from mlx_evit.tasks.preprocess import ImageLoadError, load_image

    if args.everything and (args.point or args.box):
        error("--everything takes no --point or --box prompts")
        return EXIT_USAGE
    if not args.everything and not (args.point or args.box):
        error("no prompt: give --point X,Y[,LABEL] and/or --box X0,Y0,X1,Y1, or --everything")
        return EXIT_USAGE
    if args.point and len(args.box) > 1:
        error("--point goes with at most one --box (several boxes alone are decoded as a batch)")
        return EXIT_USAGE
    inputs = [args.image] + ([args.weights] if args.weights else [])
    if args.weights and os.path.isdir(args.weights):
        inputs += [os.path.join(args.weights, n) for n in os.listdir(args.weights)]
    try:  # before any long work
        out = check_output_dir(args.output_dir, inputs=inputs, force=args.force, option="--output-dir")
    except OutputError as e:
        error(str(e))
        return EXIT_USAGE
    try:
        image = np.asarray(load_image(args.image))
    except ImageLoadError as e:
        error(str(e))
        return EXIT_IMAGE_FAILED
    h, w = image.shape[:2]
    for x, y, _ in args.point:
        if not (0 <= x <= w and 0 <= y <= h):
            error(f"--point {x:g},{y:g} is outside the {w}x{h} image")
            return EXIT_USAGE
    net = _load_model(args, error)
    if net is None:
        return EXIT_USAGE
    from mlx_evit.sam import SamAutomaticMaskGenerator, SamPredictor

    log = _log(args)
    predictor = SamPredictor(net)
    name = Path(args.image).stem or "image"
    start = time.perf_counter()
    if args.everything:
        generator = SamAutomaticMaskGenerator(
            predictor, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_thresh,
            crop_n_layers=args.crop_layers)
        records = sorted(generator.generate(image), key=lambda r: -r["area"])
        masks = [r.pop("segmentation") for r in records]
        entries = [dict(file=f"{name}_mask{i}.png", **r) for i, r in enumerate(records)]
        report: dict[str, Any] = {"mode": "everything"}
    else:
        predictor.set_image(image)
        points = np.array([p[:2] for p in args.point], np.float64).reshape(-1, 2) if args.point else None
        labels = np.array([p[2] for p in args.point]) if args.point else None
        if len(args.box) > 1:
            m, iou, _ = predictor.predict_batch(boxes=np.array(args.box), multimask_output=args.multimask)
            groups = [(m[b], iou[b], {"box": list(args.box[b])}) for b in range(len(args.box))]
        else:
            box = np.array(args.box[0]) if args.box else None
            m, iou, _ = predictor.predict(points, labels, box, multimask_output=args.multimask)
            prompt = {}
            if args.point:
                prompt["points"] = [[x, y] for x, y, _ in args.point]
                prompt["labels"] = [lab for _, _, lab in args.point]
            if args.box:
                prompt["box"] = list(args.box[0])
            groups = [(m, iou, prompt)]
        masks, entries = [], []
        for prompt_index, (gm, giou, prompt) in enumerate(groups):
            for k in range(len(gm)):
                i = len(masks)
                masks.append(gm[k])
                entries.append({"file": f"{name}_mask{i}.png", "prompt": prompt_index, "candidate": k,
                                "predicted_iou": float(giou[k]), "box_xyxy": _box_xyxy(gm[k]),
                                "area": int(gm[k].sum())})
        report = {"mode": "prompts", "prompts": [g[2] for g in groups], "multimask": args.multimask}
    seconds = time.perf_counter() - start
    report = {"image": os.fspath(args.image), "size": [h, w], "model": net.arch_name, "dtype": args.dtype,
              **report, "seconds": round(seconds, 3), "masks": entries}
    try:
        for entry, mask in zip(entries, masks):
            out.write_file(entry["file"], _png(mask.astype(np.uint8) * 255))
        out.write_file(f"{name}_overlay.png", _png(overlay(image, masks, args.alpha, args.point, args.box)))
        out.write_file(f"{name}.json", json.dumps(report, indent=2) + "\n")
    except OutputError as e:
        error(str(e))
        return EXIT_USAGE
    log(f"{len(masks)} mask(s) from {net.arch_name} in {seconds:.2f} s written to {out.path}")
    return EXIT_OK
