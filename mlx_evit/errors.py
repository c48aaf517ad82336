"""The package's error types and the one helper that turns any error into a one-line message.

Every error a user can cause (a bad file, key, option, argument) is a
:class:`MlxEvitError`, and also the builtin it has always been
(``ValueError``, ``RuntimeError`` or ``TypeError``), so ``except ValueError``
keeps working. Messages name the problem in the terms of the API (argument
names, files), never command-line options; commands print
``one_line(error)``.

Hierarchy::

    MlxEvitError
      CheckpointError, CheckpointMismatchError, ConversionError   (ValueError)
      HubError                                                     (RuntimeError)
      InputTypeError                                               (TypeError)
      ImageInputError, ImageLoadError                              (ValueError)
      ClassifierError, SegmenterError, SamError, EvaluationError   (ValueError)
      ImageNotSetError: a SamError that is also a RuntimeError
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = [
    "MlxEvitError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConversionError",
    "HubError",
    "InputTypeError",
    "ImageInputError",
    "ImageLoadError",
    "ClassifierError",
    "SegmenterError",
    "SamError",
    "ImageNotSetError",
    "EvaluationError",
    "MlxEvitWarning",
    "DatasetWarning",
    "one_line",
    "mismatch_parts",
    "describe_error",
    "ModelConfigError",
    "short_name",
]


class MlxEvitError(Exception):
    """Base of every error mlx_evit raises on purpose; the message is one line naming the problem."""


class CheckpointError(MlxEvitError, ValueError):
    """A checkpoint file cannot be read safely; the message names the file and the problem."""


class CheckpointMismatchError(MlxEvitError, ValueError):
    """A checkpoint does not fit the model; the message lists the keys."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class ConversionError(MlxEvitError, ValueError):
    """A checkpoint cannot be converted or loaded; the message is one line naming the problem."""


class HubError(MlxEvitError, RuntimeError):
    """Pretrained weights cannot be fetched or converted; the message says why and what to do."""


class InputTypeError(MlxEvitError, TypeError):
    """An argument of a type the API does not take (e.g. an image that is neither a path, a PIL image
    nor an array); the message names the argument and the type given."""


class ImageInputError(MlxEvitError, ValueError):
    """An image argument of an accepted type that cannot be used (shape, dtype, values)."""


class ImageLoadError(MlxEvitError, ValueError):
    """An image file could not be read; the message names the file and the cause."""


class ClassifierError(MlxEvitError, ValueError):
    """The model, weights, labels or an argument of a classifier cannot be used."""


class SegmenterError(MlxEvitError, ValueError):
    """The model, weights, data or an argument of a segmenter cannot be used."""


class SamError(MlxEvitError, ValueError):
    """The model, weights, image, prompts or an argument of EfficientViT-SAM cannot be used."""


class ImageNotSetError(SamError, RuntimeError):
    """A SAM prediction was asked for before ``set_image``."""


class EvaluationError(MlxEvitError, ValueError):
    """The data, class mapping or options of an evaluation cannot be used."""


class MlxEvitWarning(UserWarning):
    """Base of the warnings mlx_evit issues."""


class DatasetWarning(MlxEvitWarning):
    """The data look unlike what the chosen dataset's rules expect (e.g. its label file names)."""


class ModelConfigError(ConversionError):
    """A model folder's ``config.json`` holds an unknown or out-of-range value; the message names the file and key."""


def short_name(value: object, limit: int = 80, bare: bool = False) -> str:
    """``value`` quoted for a one-line message: control characters escaped, long text cut in the middle.

    ``short_name("a\\nb")`` is ``'a\\nb'`` (the newline escaped); a 20 MB key
    becomes its first and last characters around ``...`` plus its length,
    so messages stay short whatever a file names. ``bare``: a short name of
    plain characters (letters, digits, ``_.:/-``) is given without quotes.
    """
    raw = value if isinstance(value, str) else str(value)
    if bare and len(raw) <= limit and raw and all(c.isascii() and (c.isalnum() or c in "_.:/-") for c in raw):
        return raw
    text = repr(raw)
    if len(text) <= limit:
        return text
    keep = max(8, limit - 24)
    head, tail = repr(raw[: keep * 2 // 3])[: keep * 2 // 3], repr(raw[-(keep // 3):])[-(keep // 3):]
    return f"{head}...{tail} ({len(raw)} chars)"


def one_line(message: object, limit: Optional[int] = None) -> str:
    """``message`` (an exception or text) on one line: whitespace runs become one space.

    An exception without a message gives its type name; ``limit`` cuts the
    result to that many characters (ending in ``...``).
    """
    line = " ".join(str(message).split())
    if not line and isinstance(message, BaseException):
        line = type(message).__name__
    if limit is not None and len(line) > limit:
        line = line[: max(0, limit - 3)] + "..."
    return line


def mismatch_parts(missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]) -> list[str]:
    """``["2 missing (e.g. key)", ...]``: counts with the first example of each kind."""
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {items[0]})")
    return parts


def describe_error(e: BaseException, limit: int = 1200) -> str:
    """One-line message for any error (a :class:`CheckpointMismatchError`'s key lists become counts)."""
    lines = str(e).splitlines()
    if isinstance(e, CheckpointMismatchError) and len(lines) > 1 and (e.missing or e.unexpected or e.mismatched):
        head = lines[0].rstrip(":")  # load_state_dict's multi-line key listing, summarised
        return one_line(f"{head}: {'; '.join(mismatch_parts(e.missing, e.unexpected, e.mismatched))}", limit)
    return one_line(e, limit)
