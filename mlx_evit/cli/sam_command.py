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
from typing import Any, Optional, Sequence

import numpy as np

from mlx_evit.cli.common import unit_fraction as _fraction
from mlx_evit.cli.common import positive_int as _positive
from mlx_evit.cli.common import (
    load_task_model,
    EXIT_OK,
    Console,
    CreatedFiles,
    InputError,
    UsageError,
    add_dtype,
    add_force,
    add_model_options,
    add_output,
    add_progress,
    command_parser,
    exit_status_text,
    model_name,
    output_folder,
    plural,
    prog_name,
    refuse,
    run_command,
    weights_path,
)

from mlx_evit.tasks.sam_predictor import DEFAULT_MODEL

__all__ = ["main", "build_parser", "parse_point", "parse_box"]

PROG = "python -m mlx_evit.sam"

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

outputs (-o/--output DIR; NAME is the image file name without extension):
  NAME_mask<i>.png     each mask, 0/255 grayscale, at the image size
  NAME_overlay.png     the masks coloured over the image, prompts drawn
  NAME.json            per mask: predicted IoU, box (XYXY, inclusive), area,
                       the prompt it came from (--everything: Meta's record
                       fields: bbox XYWH, predicted_iou, stability_score, ...)
  Existing files are replaced only with --force; DIR must not hold an input.
  The folder is checked before the model loads. Points and boxes must lie
  inside the image (0 <= X <= width, 0 <= Y <= height); a box needs X0 < X1
  and Y0 < Y1.

""" + exit_status_text() + """
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
    """``"X0,Y0,X1,Y1"`` -> the box, with X0 < X1 and Y0 < Y1 (zero-area boxes are refused)."""
    x0, y0, x1, y1 = _numbers(text, (4,), "X0,Y0,X1,Y1")
    if x1 <= x0 or y1 <= y0:
        raise argparse.ArgumentTypeError(f"a box needs X0 < X1 and Y0 < Y1 (a non-zero area), got {text!r}")
    return x0, y0, x1, y1


_EVERYTHING_ONLY = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_thresh", "crop_layers")
_PROMPT_ONLY = ("multimask",)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = command_parser(prog or prog_name("sam"), "Segment an image with EfficientViT-SAM from point and box "
                       "prompts, or segment everything.", _EPILOG)
    p.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, ...)")
    p.add_argument("--point", action="append", type=parse_point, default=[], metavar="X,Y[,LABEL]",
                   help="a point prompt; LABEL 1 foreground (default), 0 background; repeatable (default: none)")
    p.add_argument("--box", action="append", type=parse_box, default=[], metavar="X0,Y0,X1,Y1",
                   help="a box prompt; repeatable: several boxes alone are one batch (default: none)")
    p.add_argument("--multimask", action="store_true", help="three masks per prompt")
    p.add_argument("--everything", action="store_true", help="automatic mask generation (no prompts)")
    add_output(p, "folder", "folder for the masks, overlay and json (required)", required=True,
               aliases=("--output-dir",))
    add_force(p, "replace existing files in DIR")
    add_model_options(p, "sam", model_default=DEFAULT_MODEL,
                      weights_help="original .pt, any checkpoint the converter reads, or a converted folder "
                                   "(default: the model's released weights, downloaded once and cached)")
    add_dtype(p)
    p.add_argument("--alpha", type=_fraction, default=0.5, help="mask opacity in the overlay")
    g = p.add_argument_group("--everything options (refused without --everything)")
    g.add_argument("--points-per-side", type=_positive, default=32, metavar="N",
                   help="a grid of N x N prompt points per crop")
    g.add_argument("--points-per-batch", type=_positive, default=16, metavar="N",
                   help="prompt points decoded together: the mask decoder's memory grows with N (about 1.2 GB "
                        "at 16, 3.5 GB at 64 as in Meta's SAM), not with the image size")
    g.add_argument("--pred-iou-thresh", type=_fraction, default=0.88, metavar="T",
                   help="keep masks whose predicted IoU is at least T")
    g.add_argument("--stability-thresh", type=_fraction, default=0.95, metavar="T",
                   help="keep masks whose stability score is at least T")
    g.add_argument("--crop-layers", type=int, choices=range(0, 4), default=0, metavar="{0,1,2,3}",
                   help="also run on 4^i crops of the image for i = 1..L")
    add_progress(p)
    return p


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the web app: mlx_evit.cli.sam_serve
        from mlx_evit.cli.sam_serve import main as serve

        return serve(argv[1:], prog=f"{prog or prog_name('sam')} serve")
    if argv[:1] == ["train"]:  # fine-tuning: mlx_evit.cli.sam_train
        from mlx_evit.cli.sam_train import main as train

        return train(argv[1:], prog=f"{prog or prog_name('sam')} train")
    parser = build_parser(prog)
    return run_command(parser, argv, lambda args, console: _run(parser, args, console))


def _load_model(args: argparse.Namespace, console: Console):
    """The SAM model of ``--model``/``--weights`` (:func:`~mlx_evit.cli.common.load_task_model`)."""
    return load_task_model(args, console, "SAM", DEFAULT_MODEL)


class _Progress:
    """A bar on stderr for --everything, fed by the mask generator's ``progress`` callback."""

    def __init__(self, stream, enabled: bool):
        self.stream, self.enabled, self.start, self.drawn = stream, enabled, time.perf_counter(), False

    def __call__(self, done, total=None) -> None:
        if not self.enabled:
            return
        if total is None:  # a fraction
            done, total = round(float(done) * 1000), 1000
        total = max(int(total), 1)
        width = 30
        filled = int(width * min(done, total) / total)
        seconds = time.perf_counter() - self.start
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * done / total:5.1f}% {seconds:6.1f} s")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _accepts_progress(function) -> bool:
    import inspect

    try:
        return "progress" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


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


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, console: Console) -> int:
    from mlx_evit.outputs import OutputError
    from mlx_evit.tasks.transforms import ImageLoadError, load_image

    if args.everything:
        refuse(parser, args, _PROMPT_ONLY, "applies to --point/--box prompts, not --everything")
        if args.point or args.box:
            raise UsageError("--everything takes no --point or --box prompts")
    else:
        refuse(parser, args, _EVERYTHING_ONLY, "applies only with --everything")
        if not (args.point or args.box):
            raise UsageError("no prompt: give --point X,Y[,LABEL] and/or --box X0,Y0,X1,Y1, or --everything")
    if args.point and len(args.box) > 1:
        raise UsageError("--point goes with at most one --box (several boxes alone are decoded as a batch)")
    inputs = [args.image] + ([args.weights] if args.weights else [])
    if args.weights and os.path.isdir(args.weights):
        inputs += [os.path.join(args.weights, n) for n in os.listdir(args.weights)]
    out = output_folder(args.output, inputs, args.force, what="masks, overlay and json")  # before any long work
    if args.model:
        args.model = model_name(args.model, "sam")
    if args.weights:
        weights_path(args.weights)
    try:
        image = np.asarray(load_image(args.image))
    except ImageLoadError as e:
        raise InputError(e) from None
    h, w = image.shape[:2]
    for x, y, _ in args.point:
        if not (0 <= x <= w and 0 <= y <= h):
            raise UsageError(f"--point {x:g},{y:g} is outside the {w}x{h} image")
    for box in args.box:
        x0, y0, x1, y1 = box
        if not (0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h):
            raise UsageError(f"--box {','.join(f'{v:g}' for v in box)} is not inside the {w}x{h} image")
    net = _load_model(args, console)
    from mlx_evit.tasks.mask_generator import SamAutomaticMaskGenerator
    from mlx_evit.tasks.sam_predictor import SamPredictor

    predictor = SamPredictor(net)
    name = Path(args.image).stem or "image"
    start = time.perf_counter()
    if args.everything:
        options = dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                       pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_thresh,
                       crop_n_layers=args.crop_layers)
        progress = _Progress(sys.stderr, console.show_progress())
        # The generator's progress callback, wherever this version of the library takes it (if at all).
        if _accepts_progress(SamAutomaticMaskGenerator):
            options["progress"] = progress
        generator = SamAutomaticMaskGenerator(predictor, **options)
        try:
            if "progress" not in options and _accepts_progress(generator.generate):
                records = generator.generate(image, progress=progress)
            else:
                records = generator.generate(image)
        finally:
            progress.close()
        records = sorted(records, key=lambda r: -r["area"])
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
    written = CreatedFiles(out)
    try:
        for entry, mask in zip(entries, masks):
            written.write_file(entry["file"], _png(mask.astype(np.uint8) * 255))
        written.write_file(f"{name}_overlay.png", _png(overlay(image, masks, args.alpha, args.point, args.box)))
        written.write_file(f"{name}.json", json.dumps(report, indent=2) + "\n")
    except OutputError as e:
        written.undo()
        raise UsageError(e) from None
    except BaseException:
        written.undo()
        raise
    console.log(f"{plural(len(masks), 'mask')} from {net.arch_name} in {seconds:.2f} s written to {out.path}")
    return EXIT_OK
