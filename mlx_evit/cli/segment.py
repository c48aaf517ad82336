"""``python -m mlx_evit.segment``: segment images, or evaluate mIoU on a labelled set (EfficientViT-Seg).

The library is :mod:`mlx_evit.tasks.segmenter` (:class:`~mlx_evit.tasks.segmenter.Segmenter`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

import numpy as np

from mlx_evit.ops.dtypes import DTYPE_NAMES
from mlx_evit.cli.common import EXIT_FAILED as EXIT_IMAGES_FAILED
from mlx_evit.cli.common import unit_fraction as _alpha
from mlx_evit.cli.common import EXIT_OK, EXIT_USAGE, error_printer, guarded

__all__ = ["main", "build_parser", "label_file_for"]

PROG = "python -m mlx_evit.segment"
FORMATS = ("none", "json", "csv")
REPORTS = ("text", "json")

_EPILOG = """\
outputs (--output-dir DIR), per image NAME (the file name without extension;
a second image of the same name becomes NAME_2, ...):
  NAME.png          label map: a palette PNG, pixel value = class index,
                    coloured with the dataset's palette
  NAME_overlay.png  the colours blended over the image (--alpha, default 0.5;
                    --no-overlay to skip)
  NAME.json/.csv    with --format json|csv: pixel fraction of every class
  Existing files are replaced only with --force; DIR must not hold an input.
  The folder is checked before the model loads.

preprocessing (the original evaluation's): Cityscapes models resize to
1024x2048, ADE20K models take the short side to 512 and the long side to a
multiple of 32, with OpenCV's cubic filter (reproduced in numpy; no OpenCV
needed); the logits are resized bicubically to the image size.

evaluation (--eval IMAGES_DIR --labels-dir LABELS_DIR):
  every image under IMAGES_DIR (recursively) is paired with the label PNG of
  the same relative path and name in LABELS_DIR; Cityscapes names
  X_leftImg8bit.png pair with X_gtFine_labelIds.png (or
  X_gtFine_labelTrainIds.png). Cityscapes label ids map to the 19 train ids
  (others ignored); ADE20K labels are value - 1 (0 ignored). Prints mIoU,
  pixel accuracy and per-class IoU (--report text|json); --output FILE
  writes the JSON report too.

exit status:
  0  done (with --skip-errors: at least one image was processed)
  1  an image or label could not be read (the run stops there unless --skip-errors)
  2  bad arguments, or the model, weights or output cannot be used
  3  unexpected error (rerun with MLX_EVIT_DEBUG=1 for the traceback)   130  interrupted

examples:
  python -m mlx_evit.segment street.png --model efficientvit_seg_b0_cityscapes --output-dir out/
  python -m mlx_evit.segment photos/ --model efficientvit_seg_l1_ade20k -o out/ --format json --alpha 0.6
  python -m mlx_evit.segment frame.png --weights efficientvit_seg_b1_cityscapes.pt -o out/
  python -m mlx_evit.segment --eval val/images --labels-dir val/labels --dataset ade20k \\
      --model efficientvit_seg_b1_ade20k --report json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Semantic segmentation with EfficientViT-Seg (Cityscapes, ADE20K): label maps, overlays, "
                    "per-class fractions, or mIoU on a labelled set.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image file, folder or glob pattern")
    parser.add_argument("--model", "-m", metavar="NAME",
                        help="registered model, e.g. efficientvit_seg_b1_cityscapes (default without --weights; "
                             "with --weights: checked against them)")
    parser.add_argument("--weights", "-w", metavar="PATH",
                        help="original efficientvit_seg_*.pt, another checkpoint, or a converted MLX folder "
                             "(default: download the model's released file)")
    parser.add_argument("--output-dir", "-o", metavar="DIR", help="folder for the per-image outputs")
    parser.add_argument("--format", "-f", choices=FORMATS, default="none",
                        help="per-class pixel fractions per image (default: none)")
    parser.add_argument("--alpha", type=_alpha, default=0.5, help="overlay opacity of the colours (default 0.5)")
    parser.add_argument("--no-overlay", action="store_true", help="write no overlay PNGs")
    parser.add_argument("--dataset", choices=("cityscapes", "ade20k"),
                        help="classes and label conventions (default: the model's)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="model dtype (default float32)")
    parser.add_argument("--resize-method", choices=("ipp", "opencv"), default="ipp",
                        help="which OpenCV cubic resize to reproduce (default ipp: what x86 OpenCV wheels run)")
    parser.add_argument("--recursive", "-r", action="store_true", help="descend into subfolders; '**' in patterns")
    parser.add_argument("--skip-errors", action="store_true", help="report unreadable images and go on")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument("--eval", metavar="IMAGES_DIR", help="evaluate on the images under IMAGES_DIR")
    parser.add_argument("--labels-dir", metavar="LABELS_DIR", help="ground-truth label PNGs (with --eval)")
    parser.add_argument("--report", choices=REPORTS, default="text", help="evaluation report on stdout")
    parser.add_argument("--output", metavar="FILE", help="also write the evaluation report as JSON to FILE")
    parser.add_argument("--progress", action="store_true", help="show progress even when stderr is not a terminal")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress or status messages")
    return parser


class _Progress:
    """``[i/n] name`` on one stderr line (a terminal, or forced)."""

    def __init__(self, total: int, stream: TextIO, enabled: bool):
        self.total, self.stream, self.enabled = total, stream, enabled and total > 1
        self.done, self.start = 0, time.perf_counter()

    def step(self, name: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        rate = self.done / max(1e-9, time.perf_counter() - self.start)
        width = 24
        bar = "#" * int(width * self.done / self.total)
        self.stream.write(f"\r[{bar:<{width}}] {self.done}/{self.total} {rate:.2f} img/s {os.path.basename(name)[:40]:<40}")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.done < self.total:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


def output_names(files: Sequence[str]) -> list[str]:
    """Output base names: the file stem, ``stem_2``, ``stem_3``, ... for repeats (in input order)."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        stem = Path(f).stem or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        names.append(stem if n == 1 else f"{stem}_{n}")
    return names


def label_file_for(image: Path, images_dir: Path, labels_dir: Path) -> Optional[Path]:
    """The label PNG of ``image``: same relative folder; same stem, or Cityscapes' gtFine names."""
    rel = image.relative_to(images_dir)
    folder = labels_dir / rel.parent
    stem = image.stem
    candidates = [folder / f"{stem}.png"]
    if stem.endswith("_leftImg8bit"):
        base = stem[: -len("_leftImg8bit")]
        candidates = [folder / f"{base}_gtFine_labelIds.png", folder / f"{base}_gtFine_labelTrainIds.png",
                      *candidates]
    return next((c for c in candidates if c.is_file()), None)


def _png(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def _fractions_text(fmt: str, file: str, classes: Sequence[str], fractions: np.ndarray, model: str) -> str:
    if fmt == "json":
        record = {"file": file, "model": model,
                  "classes": [{"index": i, "name": n, "fraction": float(fractions[i])}
                              for i, n in enumerate(classes)]}
        return json.dumps(record, indent=2) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "index", "class", "fraction"])
    for i, n in enumerate(classes):
        writer.writerow([file, i, n, f"{float(fractions[i]):.6f}"])
    return buf.getvalue()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # fine-tuning: mlx_evit.cli.segment_train
        return __import__("mlx_evit.cli.segment_train", fromlist=["main"]).main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)

    printer = error_printer(PROG)

    def error(message: str) -> None:
        printer(" ".join(str(message).split()))

    return guarded(lambda: _evaluate(args, error) if args.eval is not None else _segment(args, error), error)


def _run_inputs(files: Sequence[str], args: argparse.Namespace) -> list[str]:
    inputs = list(files)
    if args.weights:
        inputs.append(args.weights)
        if os.path.isdir(args.weights):
            inputs.extend(os.path.join(args.weights, n) for n in os.listdir(args.weights))
    return inputs


def _load(args: argparse.Namespace, error: Callable[[str], None]):
    from mlx_evit.loading.hub import HubError
    from mlx_evit.tasks.segmenter import Segmenter, SegmenterError

    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()

    def log(message: str) -> None:
        if not args.quiet:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    try:
        return Segmenter.load(args.model, weights=args.weights, dtype=args.dtype, dataset=args.dataset,
                              resize_method=args.resize_method, log=log)
    except (SegmenterError, HubError, ValueError) as e:
        error(str(e))
        return None


def _segment(args: argparse.Namespace, error: Callable[[str], None]) -> int:
    from mlx_evit.classify import expand_inputs
    from mlx_evit.outputs import OutputError, check_output_dir
    from mlx_evit.tasks.preprocess import ImageLoadError, load_image

    if args.labels_dir or args.output:
        error("--labels-dir and --output belong to --eval")
        return EXIT_USAGE
    if not args.inputs:
        error("no inputs: give image files, folders or patterns (or --eval IMAGES_DIR)")
        return EXIT_USAGE
    if not args.output_dir:
        error("--output-dir is required: the label maps and overlays are written there")
        return EXIT_USAGE
    files, problems = expand_inputs(args.inputs, args.recursive)
    try:  # before any long work
        out = check_output_dir(args.output_dir, inputs=_run_inputs(files, args), force=args.force,
                               option="--output-dir")
    except OutputError as e:
        error(str(e))
        return EXIT_USAGE
    for problem in problems:
        error(problem.message)
    if problems and not args.skip_errors:
        return EXIT_IMAGES_FAILED
    if not files:
        error("no images to segment")
        return EXIT_IMAGES_FAILED
    segmenter = _load(args, error)
    if segmenter is None:
        return EXIT_USAGE
    names = output_names(files)
    progress = _Progress(len(files), sys.stderr, not args.quiet and (sys.stderr.isatty() or args.progress))
    done = failed = 0
    for file, name in zip(files, names):
        try:
            pixels = np.asarray(load_image(file))
        except ImageLoadError as e:
            progress.clear()
            error(str(e))
            failed += 1
            if not args.skip_errors:
                return EXIT_IMAGES_FAILED
            progress.step(file)
            continue
        result = segmenter(pixels)
        try:
            out.write_file(f"{name}.png", _png(result.palette_image()))
            if not args.no_overlay:
                out.write_file(f"{name}_overlay.png", _png(result.overlay(pixels, args.alpha)))
            if args.format != "none":
                text = _fractions_text(args.format, file, segmenter.classes, result.class_fractions(),
                                       segmenter.name)
                out.write_file(f"{name}.{args.format}", text)
        except OutputError as e:
            progress.clear()
            error(str(e))
            return EXIT_USAGE
        done += 1
        progress.step(file)
    if not args.quiet:
        print(f"{PROG}: segmented {done} image(s) with {segmenter.name} into {out.path}"
              + (f"; {failed + len(problems)} failed" if failed or problems else ""), file=sys.stderr)
    return EXIT_OK if done else EXIT_IMAGES_FAILED


def _evaluate(args: argparse.Namespace, error: Callable[[str], None]) -> int:
    from mlx_evit.classify import IMAGE_EXTENSIONS
    from mlx_evit.outputs import OutputError, check_output_file

    if args.inputs:
        error("--eval takes the images folder; give no other inputs")
        return EXIT_USAGE
    if not args.labels_dir:
        error("--eval needs --labels-dir LABELS_DIR")
        return EXIT_USAGE
    images_dir, labels_dir = Path(args.eval), Path(args.labels_dir)
    for option, folder in (("--eval", images_dir), ("--labels-dir", labels_dir)):
        if not folder.is_dir():
            error(f"{option} {folder}: not a folder")
            return EXIT_USAGE
    images = sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                    and not p.name.startswith("."))
    if not images:
        error(f"--eval {images_dir}: no images")
        return EXIT_IMAGES_FAILED
    target = None
    if args.output:
        try:
            target = check_output_file(args.output, inputs=[*map(str, images), str(labels_dir),
                                                            *_run_inputs([], args)],
                                       force=args.force, option="--output")
        except OutputError as e:
            error(str(e))
            return EXIT_USAGE
    pairs, failures = [], []
    for image in images:
        label = label_file_for(image, images_dir, labels_dir)
        if label is None:
            failures.append(f"{image}: no label file for it in {labels_dir}")
        else:
            pairs.append((str(image), str(label)))
    for message in failures:
        error(message)
    if failures and not args.skip_errors:
        return EXIT_IMAGES_FAILED
    segmenter = _load(args, error)
    if segmenter is None:
        return EXIT_USAGE
    progress = _Progress(len(pairs), sys.stderr, not args.quiet and (sys.stderr.isatty() or args.progress))
    bad: list[str] = []

    def on_error(file: str, message: str) -> None:
        progress.clear()
        error(message)
        bad.append(file)
        if not args.skip_errors:
            raise _Stop()

    start = time.perf_counter()
    try:
        report = segmenter.evaluate(pairs, on_image=lambda f, _: progress.step(f), on_error=on_error)
    except _Stop:
        return EXIT_IMAGES_FAILED
    report = {"model": segmenter.name, "dataset": segmenter.dataset.name, **report,
              "skipped": sorted({*bad, *(m.split(":")[0] for m in failures)}),
              "seconds": round(time.perf_counter() - start, 3)}
    if args.report == "json":
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(_report_text(report))
    sys.stdout.flush()
    if target is not None:
        try:
            target.write_text(json.dumps(report, indent=2) + "\n")
        except OutputError as e:
            error(str(e))
            return EXIT_USAGE
    return EXIT_OK if report["images"] else EXIT_IMAGES_FAILED


class _Stop(Exception):
    """An unreadable pair without --skip-errors."""


def _pct(value: Any) -> str:
    return "   n/a" if value is None else f"{100 * value:6.2f}"


def _report_text(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']} on {report['images']} {report['dataset']} image(s)",
        f"mIoU            {_pct(report['miou'])}  ({report['classes_present']} of {report['num_classes']} "
        "classes present)",
        f"pixel accuracy  {_pct(report['pixel_accuracy'])}",
        "per-class IoU:",
    ]
    for c in report["per_class"]:
        if c["iou"] is not None:
            lines.append(f"  {c['index']:3d} {c['name']:<24} {_pct(c['iou'])}  ({c['pixels']} px)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
