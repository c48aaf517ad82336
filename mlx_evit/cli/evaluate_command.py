"""``python -m mlx_evit.evaluate``: accuracy of a model on a folder of class subfolders.

Alone, or under ``mlx.launch -n N`` (any ``mx.distributed`` backend): the
files are sharded across the ranks, rank 0 gathers the results (identical to
one process) and writes the outputs. The library is :mod:`mlx_evit.tasks.evaluation`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Optional, Sequence, TextIO

from mlx_evit.ops.dtypes import DTYPE_NAMES
from mlx_evit.cli.common import EXIT_FAILED as EXIT_IMAGES_FAILED
from mlx_evit.cli.common import EXIT_OK, EXIT_USAGE, guarded, positive_int

__all__ = ["main", "build_parser"]

PROG = "python -m mlx_evit.evaluate"

_EPILOG = """\
data:
  DIR/<class>/<image>: one subfolder per class (images in nested folders
  count for their class; files directly in DIR are ignored). A folder maps
  to a model class by a --class-map entry, else by WordNet id (n01440764),
  else by label name (case, spaces and underscores ignored), else by a
  WordNet synonym of the label. A fine-tuned model's own class names match
  its training folders. Every folder must map, else the run stops at once
  and lists the ones that do not.

class map (--class-map FILE):
  a JSON object {"folder": class} or lines FOLDER<TAB>CLASS (.csv: two
  columns); a class is a logit index, a WordNet id or a label name.

output (--output OUT_DIR):
  summary.json     top-1, top-5, per-class and mean per-class accuracy,
                   throughput, ranks, skipped images
  predictions.csv  file, true_class, true_index, top1_correct, top5_correct,
                   pred1_index, pred1_label, pred1_score, ... pred5_*
  confusion.csv    true class (rows) x top-1 prediction (columns; "other":
                   a class outside the data set's)
  An existing OUT_DIR is replaced only with --force and only if it holds a
  summary.json; it is checked before the model runs.

several processes or Macs (mlx.launch, see the README):
  mlx.launch -n 2 python -m mlx_evit.evaluate DIR --weights MODEL_DIR
  mlx.launch --hostfile hosts.json --backend ring python -m mlx_evit.evaluate ...
  Every rank needs DIR and the weights at the same path. A rank that fails
  stops all of them before anything is written; mlx.launch itself exits 0
  even then, so check the "evaluated ... on N ranks" line or summary.json.

exit status:
  0  done    1  an image could not be read (without --skip-errors), or none could
  2  bad arguments, data folder, class mapping, model or output
  3  unexpected error (rerun with MLX_EVIT_DEBUG=1 for the traceback)
  4  another rank failed, hung or was lost   130  interrupted
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from mlx_evit.tasks.classifier import DEFAULT_MODEL
    from mlx_evit.tasks.distributed import DEFAULT_TIMEOUT

    p = argparse.ArgumentParser(prog=PROG, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Evaluate a classifier on a labelled image folder (one subfolder per "
                                            "class): top-1, top-5, per-class accuracy, throughput.")
    p.add_argument("data", metavar="DIR", help="folder with one subfolder of images per class")
    p.add_argument("--model", "-m", metavar="NAME",
                   help=f"registered model with tag (default {DEFAULT_MODEL} without --weights; with --weights: "
                        "checks the architecture, a tag selects its preprocessing)")
    p.add_argument("--weights", "-w", metavar="PATH", help="MLX model folder (e.g. from examples/finetune.py), "
                                                           "timm folder or checkpoint file")
    p.add_argument("--class-map", metavar="FILE", help="folder -> class table (JSON object, or FOLDER<TAB>CLASS lines)")
    p.add_argument("--labels", metavar="FILE", help="class names of the model (one per line, or JSON)")
    p.add_argument("--batch-size", "-b", type=positive_int, default=16, metavar="N", help="images per batch (16)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="model dtype (default float32; half precision is for the GPU)")
    p.add_argument("--skip-errors", action="store_true",
                   help="report unreadable images, leave them out and count them in the summary")
    p.add_argument("--output", "-o", metavar="OUT_DIR", help="write summary.json, predictions.csv, confusion.csv")
    p.add_argument("--force", action="store_true", help="replace the outputs of an earlier evaluation in OUT_DIR")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--rank-timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"with several ranks: how long one waits for the others (default {DEFAULT_TIMEOUT:g})")
    return p


class _Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, else a line every few seconds."""

    def __init__(self, total: int, ranks: str, stream: TextIO, enabled: bool):
        self.total, self.ranks, self.stream, self.enabled = total, ranks, stream, enabled
        self.tty = enabled and stream.isatty()
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = done / max(now - self.start, 1e-9)
        if self.tty:
            filled = int(30 * done / max(total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} images on {self.ranks}, "
                              f"{rate:.1f} img/s")
            if done >= total:
                self.stream.write("\n")
        elif done >= total or now - self.last >= 5:
            self.stream.write(f"evaluated {done}/{total} images on {self.ranks} ({rate:.1f} img/s)\n")
            self.last = now
        self.stream.flush()

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m mlx_evit.evaluate``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from mlx_evit.tasks.distributed import EXIT_RANK_FAILED, RankFailure, Ranks

    try:
        ranks = Ranks(timeout=args.rank_timeout, prog=PROG)
    except (RuntimeError, ValueError) as e:
        sys.stderr.write(f"{PROG}: error: cannot join the distributed group: {' '.join(str(e).split())}\n")
        return EXIT_USAGE
    where = f"rank {ranks.rank}: " if ranks.distributed else ""

    def error(message: str) -> None:
        sys.stderr.write(f"{PROG}: {where}error: {message}\n")
        sys.stderr.flush()

    def body() -> int:
        try:
            return _run(args, ranks, error)
        except RankFailure as e:
            error(f"{e}; stopping, nothing written")
            return EXIT_RANK_FAILED

    return guarded(body, error)


def _run(args: argparse.Namespace, ranks, error: Callable[[str], None]) -> int:
    from mlx_evit.tasks.classifier import Classifier, ClassifierError
    from mlx_evit.tasks.evaluation import EvaluationError, ImageFailed, check_output, evaluate, find_dataset, map_classes, read_class_map
    from mlx_evit.tasks.distributed import RankFailure
    from mlx_evit.loading.hub import HubError
    from mlx_evit.outputs import OutputError

    leader = ranks.rank == 0
    quiet = args.quiet
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()

    def log(message: str) -> None:
        if not quiet and leader:
            sys.stderr.write(f"{PROG}: {message}\n")
            sys.stderr.flush()

    # Everything that can be wrong with the arguments is found before the images are read, on every rank.
    problem, code = None, EXIT_OK
    out = dataset = classifier = indices = None
    try:
        dataset = find_dataset(args.data)
        class_map = read_class_map(args.class_map) if args.class_map else None
        if args.output and leader:
            out = check_output(args.output, args.data, force=args.force)
        classifier = Classifier.load(args.model, weights=args.weights, dtype=args.dtype, labels=args.labels, log=log)
        indices = map_classes(dataset.folders, classifier.labels, class_map)
    except (EvaluationError, OutputError, ClassifierError, HubError, ValueError) as e:
        problem, code = str(e), EXIT_USAGE
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
    progress = _Progress(len(dataset), ranks.describe(), sys.stderr, leader and not quiet)
    failures = []

    def on_error(message: str) -> None:
        progress.clear()
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
    _print_summary(result, sys.stdout, args.output)
    return EXIT_OK


def _pct(value: Optional[float]) -> str:
    return "   n/a" if value is None or math.isnan(value) else f"{100 * value:5.1f}%"


def _print_summary(result, stream: TextIO, output: Optional[str]) -> None:
    k = result.top_indices.shape[1]
    skipped = f", {len(result.errors)} unreadable skipped" if result.errors else ""
    ranks = f"{result.ranks} rank" + ("" if result.ranks == 1 else "s")
    lines = [
        f"evaluated {result.count} images of {len(result.dataset.folders)} classes on {ranks}{skipped}: "
        f"{result.model}, {result.dataset.root}",
        f"top-1 {_pct(result.top1).strip()}  top-{k} {_pct(result.top5).strip()}  "
        f"mean per-class {_pct(result.mean_per_class_accuracy).strip()}  "
        f"{result.throughput:.1f} images/s ({result.seconds:.1f} s)",
    ]
    width = max(len(f) for f in result.dataset.folders)
    for row in result.per_class():
        lines.append(f"  {row['class']:<{width}}  {row['images']:6d} images  top-1 {_pct(row['top1'])}  "
                     f"top-{k} {_pct(row['top5'])}")
    if output:
        lines.append(f"wrote {output}/summary.json, predictions.csv, confusion.csv")
    stream.write("\n".join(lines) + "\n")
    stream.flush()
