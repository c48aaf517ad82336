"""Classify images with a pretrained EfficientViT: library API and command line.

Python::

    from mlx_evit.classify import Classifier

    clf = Classifier.load("efficientvit_b1.r224_in1k")  # or weights="path/to/checkpoint"
    for result in clf.classify_files(["cat.jpg", "dog.png"], top_k=3):
        print(result.file, [(p.label, round(p.score, 3)) for p in result.top_k])

Command line (``python -m mlx_evit.classify --help``, or ``mlx-evit-classify``)::

    python -m mlx_evit.classify cat.jpg photos/ --recursive --format json

Each image goes through its tag's own eval transform (:mod:`mlx_evit.preprocess`,
identical to timm's), images are batched, and the scores are softmax
probabilities over the model's classes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, TextIO, Union

import mlx.core as mx
import numpy as np

from .labels import Label, LabelFileError, imagenet_labels, read_labels
from .inference import prepare
from .outputs import OutputError, check_output_file
from .preprocess import EvalTransform, ImageInput, ImageLoadError, eval_transform, load_image
from .registry import get_pretrained_cfg, split_name

__all__ = [
    "DEFAULT_MODEL",
    "IMAGE_EXTENSIONS",
    "Prediction",
    "Classification",
    "ImageFailure",
    "Classifier",
    "ClassifierError",
    "expand_inputs",
    "main",
]

DEFAULT_MODEL = "efficientvit_b1.r224_in1k"
"""79.4% ImageNet top-1 at 224 px: the accuracy/speed middle of the B series."""

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .tga .ico".split()
)
"""File extensions picked up when a folder or a glob is expanded (explicit files are always tried)."""

FORMATS = ("text", "json", "jsonl", "csv")
DTYPES = ("float32", "float16", "bfloat16")
CSV_COLUMNS = ("file", "model", "rank", "index", "label", "wnid", "score", "error")

EXIT_OK, EXIT_IMAGES_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEBUG_ENV = "MLX_EVIT_DEBUG"  # set to 1: unexpected errors raise with their traceback


class ClassifierError(ValueError):
    """The model, weights or labels cannot be used; the message names the problem."""


@dataclass(frozen=True)
class Prediction:
    """One of the top-k classes of an image."""

    index: int  # logit index
    label: str
    wnid: Optional[str]  # WordNet id (ImageNet classes), else None
    score: float  # softmax probability

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "wnid": self.wnid, "score": self.score}


@dataclass(frozen=True)
class Classification:
    """The top-k predictions for one image file."""

    file: str
    top_k: tuple[Prediction, ...]


@dataclass(frozen=True)
class ImageFailure:
    """An input that could not be classified; ``message`` names the file and the cause."""

    file: str
    message: str


# ---------------------------------------------------------------- library


class Classifier:
    """A model ready for inference, with its preprocessing and class labels.

    ``model``: any mlx_evit model (``(B, H, W, 3)`` -> logits); it is
    prepared for inference in place (:func:`mlx_evit.inference.prepare`: eval
    mode, BatchNorms folded, compiled forward).
    ``labels``: one :class:`~mlx_evit.labels.Label` (or name) per class;
    default: the model's own (``model.labels``), else ImageNet-1k for 1000
    classes, else ``"class <i>"``. ``preprocess``: a pretrained cfg dict /
    :class:`~mlx_evit.registry.PretrainedCfg` / :class:`EvalTransform`;
    default ``model.pretrained_cfg``. ``name``: the model name reported with
    results. Raises :class:`ClassifierError` when labels and classes disagree.
    """

    def __init__(
        self,
        model: Any,
        *,
        labels: Optional[Sequence[Union[Label, str]]] = None,
        preprocess: Any = None,
        name: Optional[str] = None,
    ):
        num_classes = getattr(model, "num_classes", None)
        if not num_classes:
            raise ClassifierError("the model has no classifier head (num_classes is 0); it returns features")
        self.model = model
        self.num_classes = int(num_classes)
        cfg = preprocess if preprocess is not None else getattr(model, "pretrained_cfg", None)
        try:
            self.transform: EvalTransform = eval_transform(cfg if cfg is not None else {})
        except (TypeError, ValueError) as e:
            raise ClassifierError(f"bad preprocessing config: {e}") from None
        self.labels = _resolve_labels(labels, getattr(model, "labels", None), self.num_classes)
        self.name = name or _model_name(model)
        self._predict = prepare(model)  # in place: eval mode, BatchNorms folded; compiled forward
        self.dtype = self._predict.dtype

    @classmethod
    def load(
        cls,
        model: Optional[str] = None,
        *,
        weights: Optional[Union[str, os.PathLike]] = None,
        dtype: str = "float32",
        labels: Optional[Union[str, os.PathLike, Sequence[Union[Label, str]]]] = None,
        revision: str = "main",
        log: Optional[Callable[[str], None]] = None,
    ) -> "Classifier":
        """Load a classifier by name and/or weights.

        Without ``weights``, the tag's timm weights come from the Hugging Face
        Hub, converted once and cached (:func:`mlx_evit.hub.pretrained_dir`).
        ``weights``: a converted MLX directory or any checkpoint the converter
        reads; ``model`` then checks the architecture and, when it carries a
        tag, selects that tag's preprocessing. ``dtype``: float32, float16 or
        bfloat16. ``labels``: a label file path or a list of labels.
        Raises :class:`ClassifierError` and :class:`mlx_evit.hub.HubError`.
        """
        from .convert import load

        if dtype not in DTYPES:
            raise ClassifierError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if isinstance(labels, (str, os.PathLike)):
            try:
                labels = read_labels(labels)
            except LabelFileError as e:
                raise ClassifierError(str(e)) from None
        requested = model
        if model is None and weights is None:
            requested = DEFAULT_MODEL
        registry_cfg = None
        if requested is not None:
            try:
                registry_cfg = get_pretrained_cfg(requested)
            except ValueError as e:
                raise ClassifierError(str(e)) from None
        if weights is None:
            from .hub import pretrained_dir

            weights = pretrained_dir(requested, revision=revision, log=log)
        try:
            net = load(weights, dtype=dtype, model=requested)
        except (OSError, ValueError, KeyError, TypeError) as e:
            message = _one_line(e)
            if os.fspath(weights) not in message:
                message = f"{os.fspath(weights)}: {message}"
            raise ClassifierError(f"cannot load weights: {message}") from None
        # A tag given by name selects its preprocessing, whatever the weights' config says.
        tagged = requested is not None and split_name(requested)[1] is not None
        preprocess = registry_cfg if tagged else None
        return cls(net, labels=labels, preprocess=preprocess, name=requested if tagged else None)

    # -- inference

    def probabilities(self, pixels: Union[np.ndarray, mx.array]) -> np.ndarray:
        """Softmax probabilities ``(B, num_classes)`` float32 of preprocessed ``(B, H, W, 3)`` images."""
        logits = self._predict(mx.array(pixels))  # cast to the model's dtype; float32 logits
        probs = mx.softmax(logits, axis=-1)
        mx.eval(probs)
        return np.asarray(probs)

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[tuple[Prediction, ...]]:
        """The ``k`` most probable classes of each row of ``probs`` (ties: lower index first)."""
        k = _check_top_k(k, self.num_classes)
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        rows = []
        for row, indices in zip(probs, order):
            rows.append(tuple(self._prediction(int(i), float(row[i])) for i in indices))
        return rows

    def _prediction(self, index: int, score: float) -> Prediction:
        label = self.labels[index]
        return Prediction(index=index, label=label.name, wnid=label.wnid, score=score)

    def classify(self, images: Sequence[ImageInput], top_k: int = 5) -> list[tuple[Prediction, ...]]:
        """Top-k predictions for PIL images or paths, one batch (errors raise :class:`ImageLoadError`)."""
        if not images:
            return []
        pixels = np.stack([self.transform(image) for image in images])
        return self.top_k(self.probabilities(pixels), top_k)

    def classify_files(
        self,
        paths: Sequence[Union[str, os.PathLike]],
        *,
        top_k: int = 5,
        batch_size: int = 16,
        progress: Optional[Callable[[int], None]] = None,
        workers: Optional[int] = None,
    ) -> Iterator[Union[Classification, ImageFailure]]:
        """Classify image files in batches; yields one result per path, in order.

        Unreadable files yield an :class:`ImageFailure` (the caller decides
        whether to go on; closing the iterator stops the work). Images are
        decoded and transformed on ``workers`` threads (default: up to 4),
        the next batch while the model runs the current one. ``progress`` is
        called with the number of files finished after each batch.
        """
        _check_top_k(top_k, self.num_classes)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        names = [os.fspath(p) for p in paths]
        chunks = [names[i : i + batch_size] for i in range(0, len(names), batch_size)]
        pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1))
        try:
            pending = self._submit(pool, chunks[0]) if chunks else []
            for i, chunk in enumerate(chunks):
                current = pending
                pending = self._submit(pool, chunks[i + 1]) if i + 1 < len(chunks) else []
                loaded = [future.result() for future in current]
                good = [pixels for pixels in loaded if isinstance(pixels, np.ndarray)]
                rows = iter(self.top_k(self.probabilities(np.stack(good)), top_k) if good else [])
                for name, pixels in zip(chunk, loaded):
                    if isinstance(pixels, np.ndarray):
                        yield Classification(name, next(rows))
                    else:
                        yield ImageFailure(name, pixels)
                if progress is not None:
                    progress(len(chunk))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, pool: ThreadPoolExecutor, chunk: Sequence[str]) -> list[Future]:
        return [pool.submit(self._load_one, name) for name in chunk]

    def _load_one(self, name: str) -> Union[np.ndarray, str]:
        """Preprocessed pixels, or the error message for this file."""
        try:
            return self.transform(load_image(name))
        except ImageLoadError as e:
            return str(e)
        except MemoryError:
            return f"{name}: out of memory while decoding"
        except Exception as e:  # a decoder bug must not stop the other files
            return f"{name}: cannot decode image ({type(e).__name__}: {_one_line(e)})"


def _check_top_k(k: int, num_classes: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"top_k must be a positive integer, got {k!r}")
    return min(int(k), num_classes)


def _resolve_labels(explicit: Any, own: Any, num_classes: int) -> tuple[Label, ...]:
    """Labels in logit order: explicit ones, the model's own, ImageNet-1k or generic names."""
    if explicit is not None:
        labels, source = _as_labels(explicit), "the label list"
    elif own is not None:
        labels, source = _as_labels(own), "the model's config"
    elif num_classes == 1000:
        return tuple(imagenet_labels())
    else:
        return tuple(Label(i, f"class {i}") for i in range(num_classes))
    if len(labels) != num_classes:
        raise ClassifierError(f"{source} has {len(labels)} labels but the model has {num_classes} classes")
    return labels


def _as_labels(values: Any) -> tuple[Label, ...]:
    out = []
    for i, value in enumerate(values):
        if isinstance(value, Label):
            out.append(Label(i, value.name, value.wnid, value.description, value.definition))
        elif isinstance(value, str):
            out.append(Label(i, value))
        elif isinstance(value, Mapping) and isinstance(value.get("name"), str):
            out.append(Label(i, value["name"], value.get("wnid"), value.get("description"), value.get("definition")))
        else:
            raise ClassifierError(f"label {i} is neither a name nor a Label: {value!r:.60}")
    return tuple(out)


def _model_name(model: Any) -> str:
    arch = getattr(model, "arch_name", None) or type(model).__name__
    cfg = getattr(model, "pretrained_cfg", None) or {}
    tag = cfg.get("tag") if isinstance(cfg, Mapping) else getattr(cfg, "tag", None)
    return f"{arch}.{tag}" if tag else arch


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


# ---------------------------------------------------------------- inputs


def expand_inputs(inputs: Sequence[str], recursive: bool = False) -> tuple[list[str], list[ImageFailure]]:
    """Image files named by files, folders and glob patterns, in order, without repeats.

    A file is taken as given (whatever its extension). A folder contributes
    its image files (by extension, hidden files skipped), its subfolders'
    too with ``recursive``. A pattern (``*``, ``?``, ``[``) is expanded with
    :mod:`glob` (``**`` spans folders with ``recursive``). Returns the files
    and the inputs that named nothing (missing file, empty folder, pattern
    without match).
    """
    files: list[str] = []
    problems: list[ImageFailure] = []
    for item in inputs:
        if os.path.isdir(item):
            found = _folder_images(item, recursive)
            if not found:
                hint = "" if recursive else " (--recursive includes subfolders)"
                problems.append(ImageFailure(item, f"{item}: no image files in this folder{hint}"))
            files.extend(found)
        elif os.path.lexists(item) or not any(c in item for c in "*?["):
            if os.path.lexists(item) and not os.path.exists(item):
                problems.append(ImageFailure(item, f"{item}: broken symbolic link"))
            elif not os.path.exists(item):
                problems.append(ImageFailure(item, f"{item}: no such file"))
            else:
                files.append(item)
        else:
            import glob

            matches = sorted(glob.glob(item, recursive=recursive))
            found = []
            for match in matches:
                if os.path.isdir(match):
                    found.extend(_folder_images(match, recursive))
                elif _is_image_name(match):
                    found.append(match)
            if not found:
                problems.append(ImageFailure(item, f"{item}: no image files match this pattern"))
            files.extend(found)
    return list(dict.fromkeys(files)), problems


def _folder_images(folder: str, recursive: bool) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found.extend(os.path.join(root, n) for n in sorted(names) if _is_image_name(n))
    return found


def _is_image_name(name: str) -> bool:
    base = os.path.basename(name)
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


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
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} images, {rate:.1f} img/s")
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"classified {self.done}/{self.total} images ({rate:.1f} img/s)\n")
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

output (--output):
  "-" is stdout. A symbolic link is written through (its target gets the
  results); a terminal, /dev/null or a FIFO is written, never replaced; an
  input of the run (also through a link) is refused; a replaced file keeps
  its permissions and hard links; files are written atomically. A run that
  stops at an unreadable image (no --skip-errors) leaves an existing output
  file as it was. The target is checked before the model loads.

exit status:
  {EXIT_OK}    every image was classified (with --skip-errors: at least one was)
  {EXIT_IMAGES_FAILED}    an image could not be read (the run stops there unless --skip-errors)
  {EXIT_USAGE}    bad arguments, or the model, weights or labels cannot be loaded
  {EXIT_INTERNAL}    an unexpected error (a bug: rerun with {DEBUG_ENV}=1 for the traceback)
  {EXIT_INTERRUPTED}  interrupted

examples:
  python -m mlx_evit.classify cat.jpg
  python -m mlx_evit.classify photos/ --recursive --format csv --output results.csv
  python -m mlx_evit.classify "shots/*.png" --model efficientvit_m5.r224_in1k --top-k 3
  python -m mlx_evit.classify img.jpg --weights converted_model_dir --labels classes.txt
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m mlx_evit.classify``."""
    parser = argparse.ArgumentParser(
        prog="python -m mlx_evit.classify",
        description="Classify images with an EfficientViT model (ImageNet-1k labels by default).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob pattern")
    parser.add_argument(
        "--model", "-m", metavar="NAME",
        help=f"registered model name with tag (default: {DEFAULT_MODEL}; with --weights: what the weights say)",
    )
    parser.add_argument(
        "--weights", "-w", metavar="PATH",
        help="converted MLX model folder, timm/Hub folder or checkpoint file (default: download the tag's weights)",
    )
    parser.add_argument("--top-k", "-k", type=_positive_int, default=5, metavar="K", help="classes per image (default 5)")
    parser.add_argument(
        "--format", "-f", choices=FORMATS, default=None,
        help="output format (default: from the --output extension, else text)",
    )
    parser.add_argument(
        "--output", "-o", metavar="FILE",
        help="write the results to FILE (atomically; '-' is stdout) instead of stdout; replaces an existing file",
    )
    parser.add_argument("--batch-size", "-b", type=_positive_int, default=16, metavar="N", help="images per batch (default 16)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model weights dtype (default float32)")
    parser.add_argument("--labels", metavar="FILE", help="class names: one per line, or JSON (for fine-tuned models)")
    parser.add_argument("--recursive", "-r", action="store_true", help="descend into subfolders; '**' in patterns")
    parser.add_argument(
        "--skip-errors", action="store_true",
        help="report unreadable images and go on with the others (exit 0 if any image was classified)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or status messages")
    return parser


def _format_for(args: argparse.Namespace) -> str:
    if args.format is not None:
        return args.format
    if args.output:
        ext = os.path.splitext(args.output)[1].lower().lstrip(".")
        if ext in FORMATS:
            return ext
    return "text"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m mlx_evit.classify`` / ``mlx-evit-classify``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    stderr = sys.stderr
    prog = parser.prog

    def error(message: str) -> None:
        stderr.write(f"{prog}: error: {message}\n")
        stderr.flush()

    try:
        return _run(args, _format_for(args), prog, error)
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, without a second error at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        error(f"unexpected {type(e).__name__}: {_one_line(e)} (rerun with {DEBUG_ENV}=1 for the traceback)")
        return EXIT_INTERNAL


def _run(args: argparse.Namespace, fmt: str, prog: str, error: Callable[[str], None]) -> int:
    from .hub import HubError

    stderr = sys.stderr
    files, problems = expand_inputs(args.inputs, args.recursive)
    try:  # before any long work; classify's --output has always replaced an existing file
        target = check_output_file(args.output or "-", inputs=_run_inputs(files, args), force=True, option="--output")
    except OutputError as e:
        error(str(e))
        return EXIT_USAGE
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

    def log(message: str) -> None:
        if not quiet:
            stderr.write(f"{prog}: {message}\n")
            stderr.flush()

    try:
        classifier = Classifier.load(
            args.model, weights=args.weights, dtype=args.dtype, labels=args.labels, log=log
        )
    except (ClassifierError, HubError, ValueError) as e:
        error(str(e))
        return EXIT_USAGE

    try:
        sink = target.open()
    except OutputError as e:
        error(str(e))
        return EXIT_USAGE
    writer = _Writer(fmt, sink.stream, classifier.name)
    machine_stdout = fmt != "text" and target.is_stream
    show = not quiet and len(files) > args.batch_size and (stderr.isatty() or not machine_stdout)
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


if __name__ == "__main__":
    sys.exit(main())
