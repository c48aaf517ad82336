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
from typing import Any, Optional, Sequence, TextIO

import numpy as np

from mlx_evit.cli.common import EXIT_FAILED as EXIT_IMAGES_FAILED
from mlx_evit.cli.common import (
    load_problem,
    EXIT_OK,
    Console,
    CreatedFiles,
    InputError,
    UsageError,
    add_dtype,
    add_force,
    add_format,
    add_model_options,
    add_output,
    add_progress,
    add_recursive,
    add_skip_errors,
    command_parser,
    exit_status_text,
    model_name,
    output_folder,
    plural,
    prog_name,
    refuse,
    run_command,
    unit_fraction,
    weights_path,
)

__all__ = ["main", "build_parser", "label_file_for"]

PROG = "python -m mlx_evit.segment"
FORMATS = ("none", "json", "csv")
REPORTS = ("text", "json")

_EPILOG = """\
outputs (-o/--output DIR), per image NAME (the file name without extension;
a second image of the same name becomes NAME_2, ...):
  NAME.png          label map: a palette PNG, pixel value = class index,
                    coloured with the dataset's palette
  NAME_overlay.png  the colours blended over the image (--alpha; --no-overlay
                    to skip)
  NAME.json/.csv    with --format json|csv: pixel fraction of every class
  Existing files are replaced only with --force; DIR must not hold an input.
  The folder is checked before the model loads. A run that stops (an
  unreadable image without --skip-errors, an error, Ctrl-C) removes the files
  it created, so the rerun needs no --force.

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
  pixel accuracy and per-class IoU (--format text|json); -o DIR writes the
  JSON report to DIR/summary.json too.

""" + exit_status_text() + """
examples:
  python -m mlx_evit.segment street.png --model efficientvit_seg_b0_cityscapes -o out/
  python -m mlx_evit.segment photos/ --model efficientvit_seg_l1_ade20k -o out/ --format json --alpha 0.6
  python -m mlx_evit.segment frame.png --weights efficientvit_seg_b1_cityscapes.pt -o out/
  python -m mlx_evit.segment --eval val/images --labels-dir val/labels --dataset ade20k \\
      --model efficientvit_seg_b1_ade20k --format json
"""

_IMAGE_ONLY = ("alpha", "no_overlay", "recursive")
_EVAL_ONLY = ("labels_dir", "report")


def _format(text: str) -> str:
    return "text" if text == "none" else text  # "none": the old spelling of text (no per-image files)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    from mlx_evit.tasks.segmenter import DEFAULT_MODEL

    parser = command_parser(prog or prog_name("segment"),
                            "Semantic segmentation with EfficientViT-Seg (Cityscapes, ADE20K): label maps, overlays, "
                            "per-class fractions, or mIoU on a labelled set.", _EPILOG)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image file, folder or glob pattern")
    add_model_options(parser, "segment", model_default=DEFAULT_MODEL,
                      weights_help="original efficientvit_seg_*.pt, another checkpoint, or a converted MLX folder "
                                   "(default: the model's released weights, downloaded once and cached)")
    add_output(parser, "folder", "folder for the per-image outputs (needed to segment images); with --eval: "
                                 "also write the report there as summary.json",
               aliases=("--output-dir",))
    add_format(parser, ("text", "json", "csv"), None,
               "images: json|csv also writes NAME.json|.csv with the per-class pixel fractions (default: text, "
               "none written); --eval: the report on stdout, text or json (default: text)", type=_format)
    parser.add_argument("--alpha", type=unit_fraction, default=0.5, help="overlay opacity of the colours")
    parser.add_argument("--no-overlay", action="store_true", help="write no overlay PNGs")
    parser.add_argument("--dataset", choices=("cityscapes", "ade20k"),
                        help="classes and label conventions (default: the model's)")
    add_dtype(parser)
    parser.add_argument("--resize-method", choices=("ipp", "opencv"), default="ipp",
                        help="which OpenCV cubic resize to reproduce (ipp: what x86 OpenCV wheels run)")
    add_recursive(parser)
    add_skip_errors(parser, "report an unreadable image (or, with --eval, an unpaired one) and go on")
    add_force(parser, "replace existing output files")
    parser.add_argument("--eval", metavar="IMAGES_DIR", help="evaluate on the images under IMAGES_DIR (default: "
                                                             "segment the INPUTs)")
    parser.add_argument("--labels-dir", metavar="LABELS_DIR",
                        help="ground-truth label PNGs (with --eval; required there) (default: none)")
    parser.add_argument("--report", choices=("text", "json"), help=argparse.SUPPRESS)  # old --format of --eval
    add_progress(parser)
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


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # fine-tuning: mlx_evit.cli.segment_train
        from mlx_evit.cli.segment_train import main as train

        return train(argv[1:], prog=f"{prog or prog_name('segment')} train")
    parser = build_parser(prog)

    def body(args: argparse.Namespace, console: Console) -> int:
        if args.eval is not None:
            return _evaluate(parser, args, console)
        return _segment(parser, args, console)

    return run_command(parser, argv, body)


def _run_inputs(files: Sequence[str], args: argparse.Namespace) -> list[str]:
    inputs = list(files)
    if args.weights:
        inputs.append(args.weights)
        if os.path.isdir(args.weights):
            inputs.extend(os.path.join(args.weights, n) for n in os.listdir(args.weights))
    return inputs


def _load(args: argparse.Namespace, console: Console):
    from mlx_evit.errors import HubError
    from mlx_evit.tasks.segmenter import Segmenter, SegmenterError

    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        return Segmenter.load(args.model, weights=args.weights, dtype=args.dtype, dataset=args.dataset,
                              resize_method=args.resize_method, log=console.log)
    except (SegmenterError, HubError, ValueError) as e:
        raise UsageError(load_problem(e)) from None


def _check_model(args: argparse.Namespace) -> None:
    """--model of the seg family (no download for another family's name); --weights that exists."""
    if args.model:
        args.model = model_name(args.model, "segment")
    if args.weights:
        weights_path(args.weights)


def _segment(parser: argparse.ArgumentParser, args: argparse.Namespace, console: Console) -> int:
    from mlx_evit.tasks.classifier import expand_inputs
    from mlx_evit.outputs import OutputError
    from mlx_evit.tasks.transforms import ImageLoadError, load_image

    refuse(parser, args, _EVAL_ONLY, "applies only with --eval")
    if not args.inputs:
        raise UsageError("no inputs: give image files, folders or patterns (or --eval IMAGES_DIR)")
    if not args.output:
        raise UsageError("--output DIR is required: the label maps and overlays are written there")
    fmt = args.format or "text"
    files, problems = expand_inputs(args.inputs, args.recursive)
    out = output_folder(args.output, _run_inputs(files, args), args.force, what="label maps and overlays")
    _check_model(args)
    for problem in problems:
        console.error(problem.message)
    if problems and not args.skip_errors:
        return EXIT_IMAGES_FAILED
    if not files:
        console.error("no images to segment")
        return EXIT_IMAGES_FAILED
    segmenter = _load(args, console)
    names = output_names(files)
    progress = _Progress(len(files), sys.stderr, console.show_progress())
    written = CreatedFiles(out)
    done = failed = 0
    try:
        for file, name in zip(files, names):
            try:
                pixels = np.asarray(load_image(file))
            except ImageLoadError as e:
                progress.clear()
                failed += 1
                if not args.skip_errors:
                    raise InputError(f"{e}; stopping (the files of this run were removed)") from None
                console.error(e)
                progress.step(file)
                continue
            result = segmenter(pixels)
            try:
                written.write_file(f"{name}.png", _png(result.palette_image()))
                if not args.no_overlay:
                    written.write_file(f"{name}_overlay.png", _png(result.overlay(pixels, args.alpha)))
                if fmt != "text":
                    text = _fractions_text(fmt, file, segmenter.classes, result.class_fractions(), segmenter.name)
                    written.write_file(f"{name}.{fmt}", text)
            except OutputError as e:
                progress.clear()
                raise UsageError(e) from None
            done += 1
            progress.step(file)
    except BaseException:
        written.undo()
        raise
    skipped = failed + len(problems)
    console.log(f"segmented {plural(done, 'image')} with {segmenter.name} into {out.path}"
                + (f"; {skipped} unreadable skipped" if skipped else ""))
    return EXIT_OK if done else EXIT_IMAGES_FAILED


def _evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace, console: Console) -> int:
    from mlx_evit.tasks.classifier import IMAGE_EXTENSIONS

    refuse(parser, args, _IMAGE_ONLY, "does not apply to --eval")
    if args.inputs:
        raise UsageError("--eval takes the images folder; give no other inputs")
    if not args.labels_dir:
        raise UsageError("--eval needs --labels-dir LABELS_DIR")
    if args.format == "csv":
        raise UsageError("--format csv: the --eval report is text or json")
    if args.format and args.report and args.format != args.report:
        raise UsageError(f"--format {args.format} and --report {args.report} disagree (--report is the old name)")
    fmt = args.format or args.report or "text"
    images_dir, labels_dir = Path(args.eval), Path(args.labels_dir)
    for option, folder in (("--eval", images_dir), ("--labels-dir", labels_dir)):
        if not folder.is_dir():
            raise UsageError(f"{option} {folder}: not a folder")
    out = None
    if args.output:
        out = output_folder(args.output, [str(images_dir), str(labels_dir), *_run_inputs([], args)], args.force,
                            what="summary.json", marker="summary.json",
                            describe="an evaluation output folder (with summary.json)")
    _check_model(args)
    images = sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                    and not p.name.startswith("."))
    if not images:
        raise InputError(f"--eval {images_dir}: no images")
    pairs, failures = [], []
    for image in images:
        label = label_file_for(image, images_dir, labels_dir)
        if label is None:
            failures.append(f"{image}: no label file for it in {labels_dir}")
        else:
            pairs.append((str(image), str(label)))
    for message in failures:
        console.error(message)
    if failures and not args.skip_errors:
        return EXIT_IMAGES_FAILED
    segmenter = _load(args, console)
    progress = _Progress(len(pairs), sys.stderr, console.show_progress())
    bad: list[str] = []

    def on_error(file: str, message: str) -> None:
        progress.clear()
        console.error(message)
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
    if fmt == "json":
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(_report_text(report))
    sys.stdout.flush()
    if out is not None:
        from mlx_evit.outputs import OutputError

        try:
            out.write_file("summary.json", json.dumps(report, indent=2) + "\n")
        except OutputError as e:
            raise UsageError(e) from None
    return EXIT_OK if report["images"] else EXIT_IMAGES_FAILED


class _Stop(Exception):
    """An unreadable pair without --skip-errors."""


def _pct(value: Any) -> str:
    return "   n/a" if value is None else f"{100 * value:6.2f}"


def _report_text(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']} on {plural(report['images'], report['dataset'] + ' image')}",
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
