"""``python -m mlx_evit.classify`` / ``mlx-evit-classify``: classify image files, print or write the results.

Results go through :mod:`mlx_evit.outputs` (checked before the model loads,
never over an input, written atomically); failed images are records in every
structured format. The library is :class:`mlx_evit.classify.Classifier`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Any, Optional, Sequence, TextIO

from mlx_evit.tasks.classifier import (
    DEFAULT_MODEL,
    Classification,
    Classifier,
    ClassifierError,
    ImageFailure,
    expand_inputs,
)
from mlx_evit.errors import HubError
from mlx_evit.outputs import OutputError, check_output_file
from mlx_evit.cli.common import (
    load_problem,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Console,
    UsageError,
    add_batch_size,
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
    plural,
    positive_int,
    prog_name,
    run_command,
    weights_path,
)

__all__ = ["main", "build_parser", "FORMATS", "CSV_COLUMNS"]

FORMATS = ("text", "json", "jsonl", "csv")
CSV_COLUMNS = ("file", "model", "rank", "index", "label", "wnid", "score", "error")

EXIT_IMAGES_FAILED = EXIT_FAILED


# ---------------------------------------------------------------- output


def _record(result: Classification, model: str) -> dict[str, Any]:
    return {"file": result.file, "model": model, "top_k": [p.to_dict() for p in result.top_k]}


def _failure_record(failure: ImageFailure) -> dict[str, Any]:
    return {"file": failure.file, "error": failure.message}


class _Writer:
    """Writes results in one format to a text stream (JSON is written at the end, as one list).

    Failed images are records too (``{"file", "error"}``; a csv row with only
    ``file``, ``model`` and ``error``); the text format reports them on stderr only.
    """

    def __init__(self, fmt: str, stream: TextIO, model: str):
        self.fmt, self.stream, self.model = fmt, stream, model
        self.records: list[dict[str, Any]] = []
        self.csv = None
        if fmt == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow(CSV_COLUMNS)

    def write(self, result: Classification) -> None:
        if self.fmt == "text":
            lines = [result.file] + [f"  {100 * p.score:5.1f}%  {p.label}" for p in result.top_k]
            self.stream.write("\n".join(lines) + "\n")
        elif self.fmt == "json":
            self.records.append(_record(result, self.model))
        elif self.fmt == "jsonl":
            self.stream.write(json.dumps(_record(result, self.model), ensure_ascii=False) + "\n")
        else:
            for rank, p in enumerate(result.top_k, 1):
                self.csv.writerow((result.file, self.model, rank, p.index, p.label, p.wnid or "", repr(p.score), ""))
        self.stream.flush()

    def fail(self, failure: ImageFailure) -> None:
        if self.fmt == "json":
            self.records.append(_failure_record(failure))
        elif self.fmt == "jsonl":
            self.stream.write(json.dumps(_failure_record(failure), ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            self.csv.writerow((failure.file, self.model, "", "", "", "", "", failure.message))
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write(json.dumps(self.records, indent=2, ensure_ascii=False) + "\n")
        self.stream.flush()


class _Progress:
    """A progress bar on stderr (redrawn in place on a terminal, one line per update otherwise)."""

    def __init__(self, total: int, stream: TextIO, enabled: bool):
        self.total, self.stream, self.enabled = total, stream, enabled
        self.done, self.start = 0, time.perf_counter()
        self.tty = enabled and stream.isatty()

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        self.done += n
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{plural(self.total, 'image')}, {rate:.1f} img/s")
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"classified {self.done}/{plural(self.total, 'image')} ({rate:.1f} img/s)\n")
        self.stream.flush()

    def clear(self) -> None:
        """End an unfinished bar so that a message starts on a fresh line."""
        if self.tty and 0 < self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------- CLI

_EPILOG = f"""\
inputs:
  image files, folders (their image files; subfolders with --recursive) and
  glob patterns (quote them: "photos/*.jpg"; "**" needs --recursive).

weights:
  without --weights, the tag's timm weights (timm/<name>.<tag> on the
  Hugging Face Hub) are downloaded once, converted to MLX and cached under
  $MLX_EVIT_CACHE (default: $HF_HOME/mlx_evit). HF_ENDPOINT, HF_HOME and
  HF_HUB_OFFLINE=1 are honoured; offline, the cached conversion is used.

output formats (--format):
  text   per image: the file, then "  81.2%  tabby" lines
  json   a list of {{"file", "model", "top_k": [{{"index", "label", "wnid", "score"}}]}}
  jsonl  one such record per line
  csv    columns {",".join(CSV_COLUMNS)} (one row per file and rank)
  scores are softmax probabilities. Unreadable images are reported on stderr
  and, in json/jsonl/csv, as records {{"file", "error"}} (csv: the error column).

output (--output FILE):
  one file ("-" is stdout, the default). An existing file is replaced only
  with --force. A symbolic link is written through (its target gets the
  results); a terminal, /dev/null or a FIFO is written, never replaced; an
  input of the run (also through a link) is refused; a replaced file keeps
  its permissions and hard links; files are written atomically. A run that
  stops at an unreadable image (no --skip-errors) leaves an existing output
  file as it was. The target is checked before the model loads.

{exit_status_text(notes={EXIT_OK: "with --skip-errors: at least one image was classified"})}
examples:
  python -m mlx_evit.classify cat.jpg
  python -m mlx_evit.classify photos/ --recursive --format csv --output results.csv
  python -m mlx_evit.classify "shots/*.png" --model efficientvit_m5.r224_in1k --top-k 3
  python -m mlx_evit.classify img.jpg --weights converted_model_dir --labels classes.txt
"""


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser of ``python -m mlx_evit.classify``."""
    parser = command_parser(prog or prog_name("classify"),
                            "Classify images with an EfficientViT model (ImageNet-1k labels by default).", _EPILOG)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob pattern")
    add_model_options(parser, "classify", model_default=DEFAULT_MODEL)
    parser.add_argument("-k", "--top-k", type=positive_int, default=5, metavar="K", help="classes per image")
    add_format(parser, FORMATS, None, "output format (default: from the --output extension, else text)")
    add_output(parser, "file", "write the results to FILE (atomically; '-' is stdout) (default: stdout)")
    add_batch_size(parser)
    add_dtype(parser)
    parser.add_argument("--labels", metavar="FILE",
                        help="class names: one per line, or JSON, for fine-tuned models (default: the model's)")
    add_recursive(parser)
    add_force(parser, "replace an existing --output file")
    add_skip_errors(parser, "report unreadable images and go on with the others (exit 0 if any was classified)")
    add_progress(parser)
    return parser


def _format_for(args: argparse.Namespace) -> str:
    if args.format is not None:
        return args.format
    if args.output:
        ext = os.path.splitext(args.output)[1].lower().lstrip(".")
        if ext in FORMATS:
            return ext
    return "text"


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point of ``python -m mlx_evit.classify`` / ``mlx-evit-classify``; returns the exit status."""
    return run_command(build_parser(prog), argv, lambda args, console: _run(args, _format_for(args), console))


def _run(args: argparse.Namespace, fmt: str, console: Console) -> int:
    stderr = sys.stderr
    error = console.error
    files, problems = expand_inputs(args.inputs, args.recursive)
    try:  # before any long work
        target = check_output_file(args.output or "-", inputs=_run_inputs(files, args), force=args.force,
                                   option="--output")
    except OutputError as e:
        raise UsageError(e) from None
    model = model_name(args.model, "classify") if args.model else None
    if args.weights:
        weights_path(args.weights)
    for problem in problems:
        error(problem.message)
    if problems and not args.skip_errors:
        # stop here; stdout still gets the failures as records (a complete json document)
        if target.is_stream:
            _write_failures(target, fmt, problems)
        return EXIT_IMAGES_FAILED
    if not files:
        error("no images to classify")
        _write_failures(target, fmt, problems)
        return EXIT_IMAGES_FAILED

    quiet = args.quiet
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        classifier = Classifier.load(model, weights=args.weights, dtype=args.dtype, labels=args.labels,
                                     log=console.log)
    except (ClassifierError, HubError, ValueError) as e:
        raise UsageError(load_problem(e)) from None

    try:
        sink = target.open()
    except OutputError as e:
        error(str(e))
        return EXIT_USAGE
    writer = _Writer(fmt, sink.stream, classifier.name)
    machine_stdout = fmt != "text" and target.is_stream
    show = not quiet and (args.progress or len(files) > args.batch_size and (stderr.isatty() or not machine_stdout))
    progress = _Progress(len(files), stderr, show)
    failed = classified = 0
    try:
        for problem in problems:
            writer.fail(problem)
        results = classifier.classify_files(
            files, top_k=args.top_k, batch_size=args.batch_size, progress=progress.update
        )
        for result in results:
            if isinstance(result, ImageFailure):
                progress.clear()
                error(result.message)
                writer.fail(result)
                failed += 1
                if not args.skip_errors:
                    results.close()
                    break
            else:
                writer.write(result)
                classified += 1
        stopped = failed and not args.skip_errors
        writer.close()
    except BaseException:
        sink.discard()
        raise
    if stopped:
        sink.discard()  # a file output stays as it was; a stream has the records up to the failure
    else:
        try:
            sink.commit()
        except OutputError as e:
            error(str(e))
            return EXIT_USAGE
    if stopped or (problems or failed) and not classified:
        return EXIT_IMAGES_FAILED
    return EXIT_OK


def _run_inputs(files: Sequence[str], args: argparse.Namespace) -> list[str]:
    """Every file the run reads: images, weights (a folder's files too) and labels; none may be the output."""
    inputs = list(files)
    for path in (args.weights, args.labels):
        if path:
            inputs.append(path)
            if os.path.isdir(path):
                inputs.extend(os.path.join(path, name) for name in os.listdir(path))
    return inputs


def _write_failures(target: Any, fmt: str, failures: Sequence[ImageFailure]) -> None:
    """Only failures to report (no model loaded): write them as the whole output."""
    with target.open() as sink:
        writer = _Writer(fmt, sink.stream, "")
        for failure in failures:
            writer.fail(failure)
        writer.close()
