"""The one model-loading step of the task objects' ``from_pretrained``: names checked by family, then :func:`mlx_evit.api.load`.

A task takes models of one kind (classification, segmentation, SAM). A
registered name of another kind is refused before anything is downloaded
("efficientvit_b0 is a classification model, not a segmentation model"), an
unknown name gets suggestions from the task's own kind, and a file or folder
is loaded and then checked the same way. Reading checkpoints, the Hub and
model folders is :func:`mlx_evit.api.load`'s work; nothing here touches them.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Callable, Optional, Union

from mlx_evit.api import hub_name, load, pretrained_weights
from mlx_evit.errors import HubError, one_line
from mlx_evit.models.registry import get_entry, list_models
from mlx_evit.ops.dtypes import parse_dtype

__all__ = ["KINDS", "kind_of", "check_name", "load_for_task"]

KINDS = {"seed": "classification", "mit": "classification", "msra": "classification",
         "seg": "segmentation", "sam": "SAM"}
"""Registry family -> the kind of task its models serve."""

PathLike = Union[str, os.PathLike]
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".npz")


def kind_of(name: str) -> Optional[str]:
    """The kind (``classification``, ``segmentation``, ``SAM``) of a registered name, or None."""
    bare = hub_name(name)
    return None if bare is None else KINDS.get(get_entry(bare).family)


def _names_of_kind(kind: str) -> list[str]:
    names = list_models(pretrained=True) + list_models()
    return [n for n in names if KINDS.get(get_entry(n).family) == kind]


def check_name(name: str, kind: str, error: type) -> str:
    """The registered (bare, ``timm/`` dropped) name ``name`` stands for, if it is a ``kind`` model.

    Raises ``error`` for a name of another kind, or an unknown one (with the
    close names of this kind as suggestions).
    """
    bare = hub_name(name)
    if bare is None:
        close = difflib.get_close_matches(name, _names_of_kind(kind), n=5, cutoff=0.5)
        if close:
            raise error(f"unknown model {name!r}; did you mean: {', '.join(close)}? "
                        f"(the registered {kind} models: mlx_evit.list_models())")
        if os.sep in name or os.path.splitext(name)[1].lower() in _FILE_SUFFIXES:
            raise error(f"{name}: no such file or folder")
        raise error(f"unknown model {name!r}: no registered {kind} model and no file or folder has that name "
                    "(see mlx_evit.list_models())")
    other = KINDS.get(get_entry(bare).family)
    if other != kind:
        raise error(f"{name} is a {other} model, not a {kind} model")
    return bare


def load_for_task(
    name_or_path: Optional[PathLike],
    *,
    kind: str,
    error: type,
    default: Optional[str] = None,
    weights: Optional[PathLike] = None,
    dtype: Any = None,
    fuse: bool = True,
    revision: str = "main",
    log: Optional[Callable[[str], None]] = None,
) -> tuple[Any, Optional[str]]:
    """``(model, registered name or None)`` for a task of ``kind``.

    ``name_or_path``: a registered name (``timm/`` accepted; weights from the
    Hub, cached converted), or a local checkpoint / MLX model folder.
    ``weights``: a local file or folder; ``name_or_path`` is then the
    registered name the weights must hold. Neither: ``default``. Raises
    ``error`` (wrong kind, unknown name, unreadable weights) and
    :class:`~mlx_evit.errors.HubError` (weights not available).
    """
    try:
        parse_dtype(dtype)
    except ValueError as e:
        raise error(str(e)) from None
    requested: Optional[str] = None
    source: Optional[PathLike] = weights
    if weights is None and name_or_path is None:
        name_or_path = default
    if weights is None and name_or_path is not None and (
            not isinstance(name_or_path, str) or os.path.exists(name_or_path)):
        source = name_or_path  # a local file or folder
    elif name_or_path is not None:
        if not isinstance(name_or_path, str):
            raise error(f"the model name must be a string, got {type(name_or_path).__name__}")
        requested = check_name(name_or_path, kind, error)
    if source is None:
        if requested is None:
            raise error("give a registered model name or a weights file or folder")
        # The name itself: mlx_evit.load resolves it on the Hub. A revision or a log needs the explicit step.
        source = requested if revision == "main" and log is None else pretrained_weights(
            requested, revision=revision, log=log)
    try:
        net = load(source, dtype=dtype, model=requested, fuse=fuse)
    except HubError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        message = one_line(e)
        if os.fspath(source) not in message:
            message = f"{os.fspath(source)}: {message}"
        raise error(f"cannot load weights: {message}") from None
    arch = getattr(net, "arch_name", None)
    held = kind_of(arch) if isinstance(arch, str) else None
    if held != kind:
        what = f"{arch}, a {held} model" if held else (arch or "a model of no registered kind")
        raise error(f"{os.fspath(source)} holds {what}, not a {kind} model")
    return net, requested
