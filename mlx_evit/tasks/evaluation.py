"""Accuracy of a classifier on a labelled image folder, alone or across ``mx.distributed`` ranks.

Python::

    from mlx_evit.classify import Classifier
    from mlx_evit.tasks.evaluation import evaluate, find_dataset

    clf = Classifier.from_pretrained("my_model")     # a converted folder, checkpoint or registered name
    result = evaluate(clf, find_dataset("val/"))          # val/<class>/<image>
    print(result.top1, result.top5, result.mean_per_class_accuracy)
    result.write("report/")        # summary.json, predictions.csv, confusion.csv

Command line: ``python -m mlx_evit.evaluate DIR --weights MODEL_DIR``
(``--help``); under ``mlx.launch -n N`` the files are sharded across the
ranks and the results are gathered on rank 0, identical to one process.

A class folder maps to one of the model's classes by a class map
(``class_indices`` / :func:`read_class_map`; ``--class-map`` on the command line)
entry, else by WordNet id (``n01440764``), else by label name (case,
underscores and spaces do not matter: ``great_white_shark`` is "great white
shark"), else by one of the label's WordNet synonyms; a name that fits
several classes ("crane") must be given by id or map. Every folder must map.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np

import mlx.core as mx

from mlx_evit.errors import EvaluationError, InputTypeError
from mlx_evit.tasks.class_map import map_classes, read_class_map
from mlx_evit.tasks.classifier import IMAGE_EXTENSIONS, Classifier, load_pixels
from mlx_evit.tasks.inference import prepare
from mlx_evit.tasks.labels import Label
from mlx_evit.tasks.distributed import RankFailure, Ranks

__all__ = [
    "Dataset",
    "Evaluation",
    "EvaluationError",
    "ImageFailed",
    "RankFailure",
    "Ranks",
    "evaluate_classifier",
    "evaluate",
    "find_dataset",
    "map_classes",
    "read_class_map",
    "as_classifier",
    "check_output",
    "OUTPUT_FILES",
]

OUTPUT_FILES = ("summary.json", "predictions.csv", "confusion.csv")
"""What :meth:`Evaluation.write` puts in its folder."""

TOP_K = 5


class ImageFailed(EvaluationError):
    """An image could not be read (without ``skip_errors``); the message names the file."""


# ---------------------------------------------------------------- data set


@dataclass(frozen=True)
class Dataset:
    """A folder of class subfolders: ``root/<class>/**/<image>``.

    ``folders``: class folder names, sorted; ``files``: image paths
    (``root/<class>/...``), grouped by folder and sorted; ``targets``: the
    folder index of each file; ``ignored``: files directly in ``root``.
    """

    root: str
    folders: tuple[str, ...]
    files: tuple[str, ...]
    targets: tuple[int, ...]
    ignored: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.files)

    def relative(self, i: int) -> str:
        """File ``i`` relative to the root, with ``/`` separators."""
        return os.path.relpath(self.files[i], self.root).replace(os.sep, "/")

    def fingerprint(self) -> str:
        """A digest of the class folders and relative file names (ranks compare it)."""
        import hashlib

        digest = hashlib.sha256()
        for name in self.folders:
            digest.update(b"d" + name.encode("utf-8", "surrogateescape") + b"\0")
        for i in range(len(self.files)):
            digest.update(b"f" + self.relative(i).encode("utf-8", "surrogateescape") + b"\0")
        return digest.hexdigest()


def find_dataset(root: Union[str, os.PathLike]) -> Dataset:
    """The class folders and image files under ``root`` (hidden entries skipped).

    Images are found by extension (:data:`mlx_evit.classify.IMAGE_EXTENSIONS`),
    in subfolders of a class folder too. Raises :class:`EvaluationError` when
    ``root`` is not a folder, has no class subfolders or no images.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise EvaluationError(f"{root}: not a folder" if os.path.exists(root) else f"{root}: no such folder")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise EvaluationError(f"{root}: cannot list ({e.strerror or e})") from None
    folders = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
    ignored = tuple(e.path for e in entries if not e.name.startswith(".") and not e.is_dir() and _is_image(e.name))
    if not folders:
        raise EvaluationError(f"{root}: no class subfolders (expected {root}/<class>/<image>)")
    files, targets = [], []
    for index, name in enumerate(folders):
        for path in _images_under(os.path.join(root, name)):
            files.append(path)
            targets.append(index)
    if not files:
        raise EvaluationError(f"{root}: no image files in its {len(folders)} class folders")
    return Dataset(root, tuple(folders), tuple(files), tuple(targets), ignored)


def _images_under(folder: str) -> list[str]:
    found = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(top, n) for n in names if _is_image(n))
    return sorted(found)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------- results


@dataclass
class Evaluation:
    """Per-image top-k predictions of a data set, and the accuracy figures derived from them.

    ``top_indices`` / ``top_scores``: ``(N, k)`` class indices and softmax
    scores per file (rows of unread files are zero); ``status``: ``(N,)``
    1 evaluated, 2 unreadable; ``errors``: file index -> message.
    """

    dataset: Dataset
    class_indices: tuple[int, ...]  # model class of each folder
    labels: tuple[Label, ...]  # the model's
    top_indices: np.ndarray
    top_scores: np.ndarray
    status: np.ndarray
    errors: dict[int, str]
    seconds: float
    ranks: int = 1
    model: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # batch size, dtype, ... for the summary

    @property
    def evaluated(self) -> np.ndarray:
        return self.status == 1

    @property
    def truth(self) -> np.ndarray:
        """``(N,)`` model class index of each file's folder."""
        return np.asarray(self.class_indices, np.int64)[np.asarray(self.dataset.targets, np.int64)]

    def _hits(self) -> tuple[np.ndarray, np.ndarray]:
        truth = self.truth
        top1 = self.top_indices[:, 0] == truth
        topk = (self.top_indices == truth[:, None]).any(axis=1)
        return top1, topk

    @property
    def count(self) -> int:
        return int(self.evaluated.sum())

    @property
    def top1(self) -> float:
        top1, _ = self._hits()
        return _mean(top1[self.evaluated])

    @property
    def top5(self) -> float:
        """Top-k accuracy with k = min(5, classes)."""
        _, topk = self._hits()
        return _mean(topk[self.evaluated])

    def per_class(self) -> list[dict[str, Any]]:
        """One record per class folder: images evaluated, top-1 and top-5 accuracy (None without images)."""
        top1, topk = self._hits()
        targets = np.asarray(self.dataset.targets)
        rows = []
        for f, (folder, index) in enumerate(zip(self.dataset.folders, self.class_indices)):
            mask = (targets == f) & self.evaluated
            rows.append({"class": folder, "index": int(index), "label": self.labels[index].name,
                         "images": int(mask.sum()), "top1": _mean(top1[mask]), "top5": _mean(topk[mask])})
        return rows

    @property
    def mean_per_class_accuracy(self) -> float:
        """Mean of the per-class top-1 accuracies (classes without evaluated images left out)."""
        values = [row["top1"] for row in self.per_class() if row["images"]]
        return float(np.mean(values)) if values else math.nan

    @property
    def throughput(self) -> float:
        """Images evaluated per second of wall time (all ranks together)."""
        return self.count / self.seconds if self.seconds > 0 else math.nan

    def confusion(self) -> tuple[list[str], np.ndarray]:
        """Column names and counts ``(folders, columns)``: true folder x predicted (top-1) class.

        Columns are the folders' classes, plus ``other`` when the model has
        classes outside them.
        """
        folders = list(self.dataset.folders)
        column_of = {int(index): f for f, index in enumerate(self.class_indices)}
        extra = len(self.labels) > len(folders)
        counts = np.zeros((len(folders), len(folders) + extra), np.int64)
        for i in np.flatnonzero(self.evaluated):
            predicted = column_of.get(int(self.top_indices[i, 0]), len(folders))
            counts[self.dataset.targets[i], predicted] += 1
        return folders + (["other"] if extra else []), counts

    def rows(self) -> list[dict[str, Any]]:
        """Per-image records (evaluated files, in data set order) as written to ``predictions.csv``."""
        top1, topk = self._hits()
        truth = self.truth
        out = []
        for i in np.flatnonzero(self.evaluated):
            row: dict[str, Any] = {
                "file": self.dataset.relative(int(i)),
                "true_class": self.dataset.folders[self.dataset.targets[i]],
                "true_index": int(truth[i]),
                "top1_correct": int(top1[i]),
                "top5_correct": int(topk[i]),
            }
            for k, (index, score) in enumerate(zip(self.top_indices[i], self.top_scores[i]), 1):
                row[f"pred{k}_index"] = int(index)
                row[f"pred{k}_label"] = self.labels[int(index)].name
                row[f"pred{k}_score"] = str(np.float32(score))  # shortest float32 round-trip
            out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        """The figures as one JSON-ready dict (what ``summary.json`` holds)."""
        k = self.top_indices.shape[1]
        return {
            "model": self.model,
            "data": self.dataset.root,
            "images": len(self.dataset),
            "evaluated": self.count,
            "skipped": len(self.errors),
            "errors": [{"file": self.dataset.relative(i), "message": m} for i, m in sorted(self.errors.items())],
            "classes": len(self.dataset.folders),
            "top1": _json_float(self.top1),
            "top5": _json_float(self.top5),
            "top_k": k,
            "mean_per_class_accuracy": _json_float(self.mean_per_class_accuracy),
            "per_class": [dict(row, top1=_json_float(row["top1"]), top5=_json_float(row["top5"]))
                          for row in self.per_class()],
            "seconds": round(self.seconds, 3),
            "images_per_second": _json_float(round(self.throughput, 2)),
            "ranks": self.ranks,
            **self.info,
        }

    def csv_texts(self) -> dict[str, str]:
        """The contents of the three output files, by name."""
        k = self.top_indices.shape[1]
        columns = ["file", "true_class", "true_index", "top1_correct", "top5_correct"]
        columns += [f"pred{j}_{what}" for j in range(1, k + 1) for what in ("index", "label", "score")]
        predictions = io.StringIO()
        writer = csv.DictWriter(predictions, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        names, counts = self.confusion()
        confusion = io.StringIO()
        table = csv.writer(confusion, lineterminator="\n")
        table.writerow(["true \\ predicted", *names])
        for folder, row in zip(self.dataset.folders, counts):
            table.writerow([folder, *row.tolist()])
        summary = json.dumps(self.summary(), indent=2, ensure_ascii=False) + "\n"
        return {"summary.json": summary, "predictions.csv": predictions.getvalue(),
                "confusion.csv": confusion.getvalue()}

    def write(self, folder: Any, *, force: bool = False) -> list[str]:
        """Write :data:`OUTPUT_FILES` into ``folder`` (created); returns their paths.

        ``folder``: a path, or the :class:`mlx_evit.outputs.OutputDir` of
        :func:`check_output` (checked before the work). Each file is written
        atomically; an existing output folder is replaced only with ``force``
        (see :mod:`mlx_evit.outputs`). Raises :class:`mlx_evit.outputs.OutputError`.
        """
        from mlx_evit.outputs import OutputDir

        out = folder if isinstance(folder, OutputDir) else check_output(folder, self.dataset.root, force=force)
        return [os.fspath(out.write_file(name, text)) for name, text in self.csv_texts().items()]


def check_output(folder: Union[str, os.PathLike], data_root: Union[str, os.PathLike], *, force: bool = False,
                 option: str = "--output") -> Any:
    """Check an output folder before the work: an :class:`mlx_evit.outputs.OutputDir`.

    A non-empty folder is replaced only with ``force`` and only when it holds
    a ``summary.json`` (an earlier evaluation); it must not hold the data set
    nor lie inside it (it would become a class folder). Raises
    :class:`mlx_evit.outputs.OutputError`.
    """
    from mlx_evit.outputs import OutputError, check_output_dir

    real, root = os.path.realpath(os.fspath(folder)), os.path.realpath(os.fspath(data_root))
    if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
        raise OutputError(f"{option} {os.fspath(folder)}: lies inside the data folder {os.fspath(data_root)}; "
                          "choose a folder outside it")
    return check_output_dir(folder, [data_root], force, marker="summary.json",
                            describe="an evaluation output folder (with summary.json)", option=option)


def as_classifier(model: Any) -> Classifier:
    """A :class:`Classifier` of a classifier (itself), a classification model, or a registered name / local path."""
    if isinstance(model, Classifier):
        return model
    if isinstance(model, (str, os.PathLike)):
        return Classifier.from_pretrained(model)
    if hasattr(model, "num_classes") and callable(model):
        return Classifier(model)
    raise InputTypeError(f"classifier must be a Classifier, a classification model, a model name or a path; "
                         f"got {type(model).__module__}.{type(model).__qualname__}")


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def _json_float(value: float) -> Optional[float]:
    return None if value is None or math.isnan(value) else float(value)


# ---------------------------------------------------------------- evaluation


def evaluate_classifier(
    classifier: Union[Classifier, Any, str, os.PathLike],
    dataset: Dataset,
    class_indices: Optional[Sequence[int]] = None,
    *,
    batch_size: int = 16,
    skip_errors: bool = False,
    ranks: Optional[Ranks] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    on_error: Optional[Callable[[str], None]] = None,
) -> Evaluation:
    """Classify every image of ``dataset`` and collect the top-5 of each.

    ``class_indices``: the model class of each folder (default
    :func:`map_classes` on the classifier's labels). With several ``ranks``
    (default: ``mx.distributed.init()``), the global batches of
    ``batch_size`` files are dealt round-robin to the ranks, so every image
    runs in the same batch (and batch split) as in a single process; after
    each round the ranks synchronise (a failure anywhere stops all of
    them), and at the end every rank holds all results. ``progress(done, total)`` is called
    after each round; ``on_error(message)`` for each unreadable image.
    ``classifier``: a :class:`Classifier`, a classification model (wrapped
    in one), or a registered name / local path
    (:meth:`Classifier.from_pretrained`).
    Raises :class:`ImageFailed` for an unreadable image without
    ``skip_errors`` (on the rank that read it; :class:`RankFailure` on the
    others) and :class:`RankFailure` when another rank failed.
    """
    classifier = as_classifier(classifier)
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be at least 1, got {batch_size}")
    ranks = ranks if ranks is not None else Ranks()
    labels = tuple(classifier.labels)
    if class_indices is None:
        class_indices = map_classes(dataset.folders, labels)
    class_indices = tuple(int(i) for i in class_indices)
    if len(class_indices) != len(dataset.folders):
        raise EvaluationError(f"class_indices has {len(class_indices)} entries for {len(dataset.folders)} folders")
    n, k = len(dataset), min(TOP_K, classifier.num_classes)
    batches = -(-n // batch_size)
    rounds = -(-batches // ranks.size)

    top_indices = np.zeros((n, k), np.int32)
    top_scores = np.zeros((n, k), np.float32)
    status = np.zeros(n, np.int32)
    errors: dict[int, str] = {}
    # A fixed plan for the CPU batch split: the default predictor times its first calls to choose
    # between splitting and not, and the two differ in the last bit, so results would depend on
    # the run. Splitting every batch over the default number of streams is reproducible (and was
    # faster here for B0 and M0 at batch 16); the GPU never splits.
    predict = prepare(classifier.model, streams=max(1, min(2, os.cpu_count() or 1)), compile=True)
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))

    def submit(b: int) -> list[Future]:
        if b >= batches:
            return []
        return [pool.submit(load_pixels, classifier.transform, dataset.files[i])
                for i in range(b * batch_size, min(n, (b + 1) * batch_size))]

    try:
        pending = submit(ranks.rank)  # images decode while the model runs the previous batch
        for r in range(rounds):
            b = r * ranks.size + ranks.rank
            current, pending = pending, submit(b + ranks.size)
            problem = None
            try:
                loaded = [future.result() for future in current]
                good = [j for j, pixels in enumerate(loaded) if isinstance(pixels, np.ndarray)]
                if good:
                    logits = predict(mx.array(np.stack([loaded[j] for j in good])))
                    probs = mx.softmax(logits, axis=-1)
                    mx.eval(probs)
                    rows = iter(classifier.top_k(np.asarray(probs), k))
                for j, pixels in enumerate(loaded):
                    i = b * batch_size + j
                    if isinstance(pixels, np.ndarray):
                        top = next(rows)
                        status[i] = 1
                        top_indices[i] = [p.index for p in top]
                        top_scores[i] = [p.score for p in top]
                    else:
                        status[i], errors[i] = 2, pixels
                        if on_error is not None:
                            on_error(pixels)
                        if not skip_errors:
                            problem = problem or pixels
            except Exception as e:  # reported to the other ranks first, then raised here
                try:
                    ranks.check(f"{type(e).__name__}: {e}")
                except RankFailure:
                    pass
                raise
            try:
                ranks.check(problem)
            except RankFailure:
                if problem:
                    raise ImageFailed(problem) from None
                raise
            if progress is not None:
                progress(min(n, (r + 1) * ranks.size * batch_size), n)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if ranks.distributed:
        top_indices = ranks.all_sum(top_indices)
        top_scores = ranks.all_sum(top_scores)
        status = ranks.all_sum(status)
        gathered = ranks.gather_bytes(json.dumps(errors).encode())
        errors = {int(i): m for blob in gathered for i, m in json.loads(blob.decode()).items()}
    seconds = time.perf_counter() - start
    return Evaluation(dataset, class_indices, labels, top_indices, top_scores, status, dict(sorted(errors.items())),
                      seconds, ranks.size, classifier.name, {"batch_size": batch_size, "dtype": str(classifier.dtype).rsplit(".", 1)[-1]})


evaluate = evaluate_classifier
"""The name the README has always used (``from mlx_evit.evaluate import evaluate``)."""
