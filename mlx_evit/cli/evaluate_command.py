"""``python -m mlx_evit.evaluate``: accuracy of a model on a folder of class subfolders.

Alone, or under ``mlx.launch -n N`` (any ``mx.distributed`` backend): the
files are sharded across the ranks, rank 0 gathers the results (identical to
one process) and writes the outputs. The library is :mod:`mlx_evit.tasks.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional, Sequence, TextIO

from mlx_evit.cli.common import EXIT_FAILED as EXIT_IMAGES_FAILED
from mlx_evit.cli.common import (
    load_problem,
    EXIT_OK,
    EXIT_RANK_FAILED,
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
    add_skip_errors,
    command_parser,
    exit_status_text,
    model_name,
    output_folder,
    plural,
    prog_name,
    run_command,
    weights_path,
)

__all__ = ["main", "build_parser"]

PROG = "python -m mlx_evit.evaluate"

_EPILOG = """\
data:
  DATA_DIR/<class>/<image>: one subfolder per class (images in nested
  folders count for their class; files directly in DATA_DIR are ignored).
  A folder maps to a model class by a --class-map entry, else by WordNet id (n01440764),
  else by label name (case, spaces and underscores ignored), else by a
  WordNet synonym of the label. A fine-tuned model's own class names match
  its training folders. Every folder must map, else the run stops at once
  and lists the ones that do not.

class map (--class-map FILE):
  a JSON object {"folder": class} or lines FOLDER<TAB>CLASS (.csv: two
  columns); a class is a logit index, a WordNet id or a label name.

output (-o/--output DIR):
  summary.json     top-1, top-5, per-class and mean per-class accuracy,
                   throughput, ranks, skipped images
  predictions.csv  file, true_class, true_index, top1_correct, top5_correct,
                   pred1_index, pred1_label, pred1_score, ... pred5_*
  confusion.csv    true class (rows) x top-1 prediction (columns; "other":
                   a class outside the data set's)
  An existing DIR is replaced only with --force and only if it holds a
  summary.json; it is checked before the model runs.

format (--format): the summary on stdout as text, or as json (what
  summary.json holds).

several processes or Macs (mlx.launch, see the README):
  mlx.launch -n 2 python -m mlx_evit.evaluate DATA_DIR --weights MODEL_DIR
  mlx.launch --hostfile hosts.json --backend ring python -m mlx_evit.evaluate ...
  Every rank needs DATA_DIR and the weights at the same path. A rank that fails
  stops all of them before anything is written; mlx.launch itself exits 0
  even then, so check the "evaluated ... on N ranks" line or summary.json.

""" + exit_status_text((0, 1, 2, 3, 4, 130)) + """"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    from mlx_evit.tasks.classifier import DEFAULT_MODEL
    from mlx_evit.tasks.distributed import DEFAULT_TIMEOUT

    p = command_parser(prog or prog_name("evaluate"), "Evaluate a classifier on a labelled image folder (one "
                       "subfolder per class): top-1, top-5, per-class accuracy, throughput.", _EPILOG)
    p.add_argument("data", metavar="DATA_DIR", help="folder with one subfolder of images per class")
    add_model_options(p, "classify", model_default=DEFAULT_MODEL,
                      weights_help="MLX model folder (e.g. from examples/finetune.py), timm folder or checkpoint "
                                   "file (default: the model's published weights, downloaded once and cached)")
    add_output(p, "folder", "write summary.json, predictions.csv, confusion.csv into DIR")
    add_format(p, ("text", "json"), "text", "the summary on stdout")
    p.add_argument("--class-map", metavar="FILE",
                   help="folder -> class table (JSON object, or FOLDER<TAB>CLASS lines) (default: none)")
    p.add_argument("--labels", metavar="FILE", help="class names of the model (one per line, or JSON) "
                                                    "(default: the model's)")
    add_batch_size(p)
    add_dtype(p, "model dtype (half precision is for the GPU)")
    add_skip_errors(p, "report unreadable images, leave them out and count them in the summary")
    add_force(p, "replace the outputs of an earlier evaluation in DIR")
    add_progress(p)
    p.add_argument("--rank-timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="with several ranks: how long one waits for the others")
    return p


class _Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, else a line every few seconds."""

    def __init__(self, total: int, ranks: str, stream: TextIO, enabled: bool, bar: bool):
        self.total, self.ranks, self.stream, self.enabled = total, ranks, stream, enabled
        self.tty = enabled and bar
        self.start = self.last = time.perf_counter()
        self.skipped = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = done / max(now - self.start, 1e-9)
        if self.tty:
            filled = int(30 * done / max(total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{plural(total, 'image')} "
                              f"on {self.ranks}{self._skipped()}, {rate:.1f} img/s")
            if done >= total:
                self.stream.write("\n")
        elif done >= total or now - self.last >= 5:
            self.stream.write(f"read {done}/{plural(total, 'image')} on {self.ranks}{self._skipped()} "
                              f"({rate:.1f} img/s)\n")
            self.last = now
        self.stream.flush()

    def _skipped(self) -> str:
        return f" ({self.skipped} unreadable skipped)" if self.skipped else ""

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point of ``python -m mlx_evit.evaluate``; returns the exit status."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    from mlx_evit.tasks.distributed import RankFailure, Ranks

    try:
        ranks = Ranks(timeout=args.rank_timeout, prog=parser.prog)
    except (RuntimeError, ValueError) as e:
        Console(parser.prog).error(f"cannot join the distributed group: {e}")
        return EXIT_USAGE
    where = f"rank {ranks.rank}: " if ranks.distributed else ""
    console = Console(parser.prog + (f": {where.rstrip(': ')}" if where else ""), quiet=args.quiet,
                      force_progress=args.progress)

    def body(args: argparse.Namespace, _console: Console) -> int:
        try:
            return _run(args, ranks, console)
        except RankFailure as e:
            console.error(f"{e}; stopping, nothing written")
            return EXIT_RANK_FAILED

    return run_command(parser, argv, body)


def _run(args: argparse.Namespace, ranks, console: Console) -> int:
    from mlx_evit.tasks.classifier import Classifier, ClassifierError
    from mlx_evit.tasks.evaluation import EvaluationError, ImageFailed, evaluate, find_dataset, map_classes, read_class_map
    from mlx_evit.tasks.distributed import RankFailure
    from mlx_evit.errors import HubError
    from mlx_evit.outputs import OutputError

    error = console.error
    leader = ranks.rank == 0
    quiet = args.quiet
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()

    def log(message: str) -> None:
        if leader:
            console.log(message)

    # Everything that can be wrong with the arguments is found before the images are read, on every rank.
    problem, code = None, EXIT_OK
    out = dataset = classifier = indices = None
    try:
        dataset = find_dataset(args.data)
        class_map = read_class_map(args.class_map) if args.class_map else None
        if args.output and leader:
            out = _check_output(args)
        model = model_name(args.model, "classify") if args.model else None
        if args.weights:
            weights_path(args.weights)
        classifier = Classifier.load(model, weights=args.weights, dtype=args.dtype, labels=args.labels, log=log)
        indices = map_classes(dataset.folders, classifier.labels, class_map)
    except (EvaluationError, OutputError, ClassifierError, HubError, ValueError, UsageError) as e:
        problem, code = load_problem(e), EXIT_USAGE
        error(problem)
    try:
        ranks.check(problem)
        if ranks.distributed:  # every rank must see the same files
            prints = ranks.gather_bytes(dataset.fingerprint().encode())
            differ = [r for r, p in enumerate(prints) if p != prints[0]]
            if differ:
                raise RankFailure(f"{args.data} holds different class folders or files on rank(s) "
                                  f"{', '.join(map(str, differ))} than on rank 0")
    except RankFailure:
        if problem:
            return code
        raise

    if dataset.ignored:
        log(f"ignoring {len(dataset.ignored)} image file(s) directly in {args.data} (not in a class folder)")
    progress = _Progress(len(dataset), ranks.describe(), sys.stderr, leader and not quiet,
                         bar=console.show_progress())
    failures = []

    def on_error(message: str) -> None:
        progress.clear()
        progress.skipped += 1
        error(message)
        failures.append(message)

    try:
        result = evaluate(classifier, dataset, indices, batch_size=args.batch_size, skip_errors=args.skip_errors,
                          ranks=ranks, progress=progress, on_error=on_error)
    except ImageFailed:
        return EXIT_IMAGES_FAILED  # already reported
    if not leader:
        return EXIT_OK
    if result.count == 0:
        error(f"none of the {len(dataset)} images could be read")
        return EXIT_IMAGES_FAILED
    if out is not None:
        try:
            result.write(out)
        except OutputError as e:
            error(str(e))
            return EXIT_USAGE
    if args.format == "json":
        sys.stdout.write(json.dumps(result.summary(), indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        _print_summary(result, sys.stdout, args.output)
    return EXIT_OK


def _check_output(args: argparse.Namespace):
    """The checked output folder (a name like report.json is refused; --force is suggested only where it helps)."""
    from mlx_evit.tasks.evaluation import check_output

    output_folder(args.output, [], args.force, what="summary.json, predictions.csv, confusion.csv",
                  marker="summary.json", describe="an evaluation output folder (with summary.json)", check=False)
    return check_output(args.output, args.data, force=args.force)


def _pct(value: Optional[float]) -> str:
    return "   n/a" if value is None or math.isnan(value) else f"{100 * value:5.1f}%"


def _print_summary(result, stream: TextIO, output: Optional[str]) -> None:
    k = result.top_indices.shape[1]
    skipped = f", {len(result.errors)} unreadable skipped" if result.errors else ""
    ranks = f"{result.ranks} rank" + ("" if result.ranks == 1 else "s")
    lines = [
        f"evaluated {plural(result.count, 'image')} of {plural(len(result.dataset.folders), 'class', 'classes')} "
        f"on {ranks}{skipped}: "
        f"{result.model}, {result.dataset.root}",
        f"top-1 {_pct(result.top1).strip()}  top-{k} {_pct(result.top5).strip()}  "
        f"mean per-class {_pct(result.mean_per_class_accuracy).strip()}  "
        f"{result.throughput:.1f} images/s ({result.seconds:.1f} s)",
    ]
    width = max(len(f) for f in result.dataset.folders)
    for row in result.per_class():
        lines.append(f"  {row['class']:<{width}}  {row['images']:6d} {'image ' if row['images'] == 1 else 'images'}  "
                     f"top-1 {_pct(row['top1'])}  "
                     f"top-{k} {_pct(row['top5'])}")
    if output:
        lines.append(f"wrote {os.path.join(output, 'summary.json')}, predictions.csv, confusion.csv")
    stream.write("\n".join(lines) + "\n")
    stream.flush()
