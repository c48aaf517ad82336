"""Mapping PyTorch state dicts onto MLX models, by name.

Each family module describes its checkpoint layouts declaratively as
:class:`KeyMap` tables (ordered regex rewrites from a source key to the MLX
parameter path, plus keys to drop). :func:`load_state_dict` applies one,
converts each tensor according to the type of the module that receives it
(see :func:`mlx_evit.ops.layers.torch_to_mlx`), and refuses partial or
mismatched loads with an error that names every offending key.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_evit.errors import CheckpointMismatchError
from mlx_evit.ops.layers import torch_to_mlx

__all__ = [
    "KeyMap",
    "IDENTITY",
    "CheckpointMismatchError",
    "load_state_dict",
    "load_params",
    "adapt_params",
    "fit_report",
    "map_state_dict",
    "rename_state_dict",
    "param_shapes",
    "select_layout",
]


@dataclass(frozen=True)
class KeyMap:
    """One checkpoint layout of a family.

    ``rules``: ``(pattern, replacement)`` pairs for ``re.sub``, applied in
    order to every kept source key; the result must be an MLX parameter path.
    ``drop``: patterns of source keys that carry nothing the MLX model needs
    (``num_batches_tracked``, recomputed index buffers, ...).
    ``marker``: pattern that only keys of this layout match; used to tell
    layouts apart. ``defaults``: architecture arguments implied by the origin
    of such checkpoints (e.g. the attention eps of the original code).
    """

    name: str
    marker: str
    rules: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = (r"(^|\.)num_batches_tracked$",)
    defaults: Mapping[str, object] = field(default_factory=dict)

    def target(self, key: str) -> Optional[str]:
        """MLX parameter path for source ``key``, or ``None`` if the key is dropped."""
        if any(re.search(p, key) for p in self.drop):
            return None
        for pattern, repl in self.rules:
            key = re.sub(pattern, repl, key)
        return key

    def matches(self, keys: Iterable[str]) -> int:
        return sum(1 for k in keys if re.search(self.marker, k))


def _listing(title: str, items: Sequence[str], limit: int = 12) -> str:
    shown = "\n".join(f"    {s}" for s in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def select_layout(keys: Iterable[str], layouts: Sequence[KeyMap]) -> KeyMap:
    """The layout whose marker matches most keys (ties go to the first listed)."""
    keys = list(keys)
    scores = [layout.matches(keys) for layout in layouts]
    best = max(range(len(layouts)), key=lambda i: scores[i])
    if scores[best] == 0:
        names = ", ".join(layout.name for layout in layouts)
        sample = ", ".join(keys[:5])
        raise CheckpointMismatchError(
            f"checkpoint keys match none of the known layouts ({names}); first keys: {sample}"
        )
    return layouts[best]


IDENTITY = KeyMap(name="renamed", marker="", drop=())
"""Keys already renamed to MLX paths pass through unchanged."""


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape, in model order (no evaluation: MLX initialisation is lazy)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def rename_state_dict(
    state: Mapping[str, np.ndarray], layout: KeyMap
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(state keyed by MLX path, MLX path -> source key)`` under ``layout``; dropped keys left out."""
    renamed: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for src, value in state.items():
        dst = layout.target(src)
        if dst is None:
            continue
        if dst in origin:
            raise CheckpointMismatchError(
                f"checkpoint keys {origin[dst]!r} and {src!r} both map to parameter {dst!r}"
            )
        renamed[dst] = value
        origin[dst] = src
    return renamed, origin


def map_state_dict(
    model: nn.Module, state: Mapping[str, np.ndarray], layout: KeyMap
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Rename and convert ``state`` for ``model``; returns (params, mlx_key -> source_key).

    Each tensor is converted for the module that receives it
    (:func:`mlx_evit.ops.layers.torch_to_mlx`); keys that map to no module of
    the model are kept under their mapped name so that the strict load can
    report them.
    """
    renamed, origin = rename_state_dict(state, layout)
    modules = dict(model.named_modules())
    params: dict[str, np.ndarray] = {}
    for dst, value in renamed.items():
        mod_path, _, leaf = dst.rpartition(".")
        module = modules.get(mod_path)
        value = np.asarray(value)
        params[dst] = torch_to_mlx(module, leaf, value) if module is not None else value
    return params, origin


def adapt_params(model: nn.Module, params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """``(params, notes)``: MLX-layout ``params`` after the model's own fix-up hook ``adapt_checkpoint``.

    The hook (e.g. resizing attention-bias tables, folding a distillation
    head) runs once per load. What it warns is returned as ``notes`` (one
    message each) for the caller to report, not emitted here.
    """
    adapt = getattr(model, "adapt_checkpoint", None)
    if adapt is None:
        return params, ()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = adapt(params)
    return params, tuple(str(w.message) for w in caught)


def fit_report(
    model: nn.Module, params: Mapping[str, np.ndarray], origin: Optional[Mapping[str, str]] = None
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``(missing, unexpected, mismatched)`` of (adapted) ``params`` against the model, named by source key.

    ``missing`` in model order; ``mismatched`` entries read
    ``"source_key: checkpoint (shape) vs model (shape)"``.
    """
    origin = origin or {}
    expected = param_shapes(model)
    missing = tuple(k for k in expected if k not in params)

    def named(k: str) -> str:
        src = origin.get(k, k)
        return src + (f" (-> {k})" if src != k else "")

    unexpected = tuple(sorted(named(k) for k in params if k not in expected))
    mismatched = tuple(
        f"{origin.get(k, k)}: checkpoint {tuple(params[k].shape)} vs model {shape}"
        + (f" (parameter {k})" if origin.get(k, k) != k else "")
        for k, shape in expected.items() if k in params and tuple(params[k].shape) != shape
    )
    return missing, unexpected, mismatched


def load_params(
    model: nn.Module,
    params: Mapping[str, np.ndarray],
    *,
    origin: Optional[Mapping[str, str]] = None,
    source: str = "checkpoint",
    layout: str = "mlx",
    adapted: bool = False,
) -> None:
    """Load MLX-layout ``params`` (numpy arrays) into ``model``, strictly: the one loading path.

    Applies ``adapt_checkpoint`` unless ``adapted``; every model parameter
    must be given with the right shape and nothing else, else
    :class:`CheckpointMismatchError` lists the missing, unexpected and
    wrongly-shaped keys (by their ``origin`` source names). Floating arrays
    are cast to the parameter's dtype; the arrays go in through MLX's
    ``load_weights(strict=True)`` and are evaluated.
    """
    if not adapted:
        params, notes = adapt_params(model, dict(params))
        for note in notes:
            warnings.warn(note, stacklevel=2)
    missing, unexpected, mismatched = fit_report(model, params, origin)
    if missing or unexpected or mismatched:
        missing = tuple(sorted(missing))
        name = getattr(model, "arch_name", None) or type(model).__name__
        parts = [f"{source} ({layout} layout) does not fit {name}:"]
        if missing:
            parts.append(_listing("missing keys (model parameters not in the checkpoint)", list(missing)))
        if unexpected:
            parts.append(_listing("unexpected keys (checkpoint entries the model does not have)", list(unexpected)))
        if mismatched:
            parts.append(_listing("wrong shapes", list(mismatched)))
        raise CheckpointMismatchError("\n".join(parts), missing, unexpected, mismatched)
    expected = dict(tree_flatten(model.parameters()))
    arrays = []
    for k, v in params.items():
        arr = mx.array(np.ascontiguousarray(v))
        if mx.issubdtype(expected[k].dtype, mx.floating) and arr.dtype != expected[k].dtype:
            arr = arr.astype(expected[k].dtype)
        arrays.append((k, arr))
    model.load_weights(arrays, strict=True)
    mx.eval(model.parameters())


def load_state_dict(
    model: nn.Module,
    state: Mapping[str, np.ndarray],
    layouts: Optional[Sequence[KeyMap]] = None,
    *,
    layout: Optional[KeyMap] = None,
    source: str = "checkpoint",
) -> KeyMap:
    """Load a PyTorch-layout state dict (numpy arrays) into ``model``, strictly.

    ``layouts`` defaults to ``model.checkpoint_layouts``; the matching one is
    chosen from the keys unless ``layout`` is given. Every model parameter
    must be provided with the right shape and every kept checkpoint key must
    be used, else :class:`CheckpointMismatchError` lists the missing,
    unexpected and wrongly-shaped keys. Arrays keep their dtype class
    (floating point tensors are cast to the model parameter's dtype).
    Returns the layout that was used.
    """
    if layout is None:
        layouts = layouts if layouts is not None else getattr(model, "checkpoint_layouts", ())
        if not layouts:
            raise ValueError(f"{type(model).__name__} declares no checkpoint layouts")
        layout = select_layout(state.keys(), layouts)
    params, origin = map_state_dict(model, state, layout)
    load_params(model, params, origin=origin, source=source, layout=layout.name)
    return layout
