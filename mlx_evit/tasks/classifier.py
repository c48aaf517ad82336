"""The image classifier library: :class:`Classifier` (a prepared model + preprocessing + labels) and its inputs.

Each image goes through its tag's own eval transform (:mod:`mlx_evit.tasks.transforms`,
identical to timm's), images are batched, and the scores are softmax
probabilities over the model's classes. :func:`expand_inputs` turns files,
folders and glob patterns into image files. The command line is
:mod:`mlx_evit.cli.classify_command`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import numpy as np

from mlx_evit.errors import ClassifierError, ImageLoadError, one_line
from mlx_evit.ops.dtypes import DTYPE_NAMES
from mlx_evit.tasks.images import ImageLike, as_batch, rgb_image
from mlx_evit.tasks.inference import prepare
from mlx_evit.tasks.labels import Label, LabelFileError, imagenet_labels, read_labels
from mlx_evit.tasks.transforms import EvalTransform, eval_transform, load_image
from mlx_evit.tasks.pretrained import load_for_task
from mlx_evit.models.registry import get_pretrained_cfg, split_name

__all__ = [
    "DEFAULT_MODEL",
    "IMAGE_EXTENSIONS",
    "Prediction",
    "Classification",
    "ImageFailure",
    "Classifier",
    "ClassifierError",
    "expand_inputs",
]

DEFAULT_MODEL = "efficientvit_b1.r224_in1k"
"""79.4% ImageNet top-1 at 224 px: the accuracy/speed middle of the B series."""

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .tga .ico".split()
)
"""File extensions picked up when a folder or a glob is expanded (explicit files are always tried)."""


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
    prepared for inference in place (:func:`mlx_evit.tasks.inference.prepare`: eval
    mode, BatchNorms folded, compiled forward).
    ``labels``: one :class:`~mlx_evit.tasks.labels.Label` (or name) per class;
    default: the model's own (``model.labels``), else ImageNet-1k for 1000
    classes, else ``"class <i>"``. ``preprocess``: a pretrained cfg dict /
    :class:`~mlx_evit.models.specs.PretrainedCfg` / :class:`EvalTransform`;
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
    def from_pretrained(
        cls,
        name_or_path: Optional[Union[str, os.PathLike]] = None,
        *,
        weights: Optional[Union[str, os.PathLike]] = None,
        dtype: str = "float32",
        labels: Optional[Union[str, os.PathLike, Sequence[Union[Label, str]]]] = None,
        revision: str = "main",
        log: Optional[Callable[[str], None]] = None,
    ) -> "Classifier":
        """A classifier from a registered name or a local checkpoint / MLX model folder.

        ``name_or_path``: a registered classification name
        (``efficientvit_b1.r224_in1k``, ``timm/...`` accepted; weights from
        the Hugging Face Hub, converted once and cached by
        :func:`mlx_evit.load`), or a local file or folder; default
        :data:`DEFAULT_MODEL`. ``weights``: a local file or folder, with
        ``name_or_path`` the name it must hold (its tag selects the
        preprocessing). ``dtype``: float32, float16 or bfloat16. ``labels``:
        a label file path or a list of labels. A name of another kind
        (segmentation, SAM) is refused before any download. Raises
        :class:`ClassifierError` and :class:`~mlx_evit.errors.HubError`.
        """
        if dtype not in DTYPE_NAMES:
            raise ClassifierError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_NAMES)}")
        if isinstance(labels, (str, os.PathLike)):
            try:
                labels = read_labels(labels)
            except LabelFileError as e:
                raise ClassifierError(str(e)) from None
        net, requested = load_for_task(name_or_path, kind="classification", error=ClassifierError,
                                       default=DEFAULT_MODEL, weights=weights, dtype=dtype, fuse=False,
                                       revision=revision, log=log)  # prepare() folds the BatchNorms
        # A tag given by name selects its preprocessing, whatever the weights' config says.
        tagged = requested is not None and split_name(requested)[1] is not None
        preprocess = get_pretrained_cfg(requested) if tagged else None
        return cls(net, labels=labels, preprocess=preprocess, name=requested if tagged else None)

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
        """The same as :meth:`from_pretrained` (the earlier name, kept): ``model`` is ``name_or_path``."""
        return cls.from_pretrained(model, weights=weights, dtype=dtype, labels=labels, revision=revision, log=log)

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

    def classify(self, images: Union[ImageLike, Sequence[ImageLike]],
                 top_k: int = 5) -> Union[tuple[Prediction, ...], list[tuple[Prediction, ...]]]:
        """Top-k predictions of one image, or of a list of images run as one batch.

        An image is a file path, a PIL image, a uint8 ``(H, W, 3)`` array or
        a ``[0, 1]`` float array (:mod:`mlx_evit.tasks.images`). One image
        gives its tuple of predictions; a list gives a list of them. An
        unreadable file raises :class:`~mlx_evit.errors.ImageLoadError`,
        another type :class:`~mlx_evit.errors.InputTypeError`.
        """
        items, batch = as_batch(images)
        _check_top_k(top_k, self.num_classes)
        if not items:
            return []
        pixels = np.stack([self.preprocess(image) for image in items])
        rows = self.top_k(self.probabilities(pixels), top_k)
        return rows if batch else rows[0]

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """One image (any accepted input) through the eval transform: ``(H, W, 3)`` float32, normalised."""
        return self.transform(rgb_image(image, error=ClassifierError))

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
        return load_pixels(self.transform, name)


def load_pixels(transform: Callable[[Any], np.ndarray], path: str) -> Union[np.ndarray, str]:
    """``transform(image)`` of one file, or the one-line message naming why it cannot be read.

    Used by the loader threads of :class:`Classifier` and of :mod:`mlx_evit.tasks.evaluation`: an
    unreadable or undecodable file becomes a message, never an exception that stops the others.
    """
    try:
        return transform(load_image(path))
    except ImageLoadError as e:
        return str(e)
    except MemoryError:
        return f"{path}: out of memory while decoding"
    except Exception as e:  # a decoder bug must not stop the other files
        return f"{path}: cannot decode image ({type(e).__name__}: {one_line(e)})"


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
