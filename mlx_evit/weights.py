"""Mapping PyTorch state dicts onto MLX models, by name.

Each family module describes its checkpoint layouts declaratively as
:class:`KeyMap` tables (ordered regex rewrites from a source key to the MLX
parameter path, plus keys to drop). :func:`load_state_dict` applies one,
converts each tensor according to the type of the module that receives it
(see :func:`mlx_evit.layers.torch_to_mlx`), and refuses partial or
mismatched loads with an error that names every offending key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .layers import torch_to_mlx

__all__ = ["KeyMap", "CheckpointMismatchError", "load_state_dict", "map_state_dict", "select_layout"]


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


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists the keys."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


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


def map_state_dict(
    model: nn.Module, state: Mapping[str, np.ndarray], layout: KeyMap
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Rename and convert ``state`` for ``model``; returns (params, mlx_key -> source_key).

    Keys that map to no module of the model are kept under their mapped name
    so that :func:`load_state_dict` can report them.
    """
    modules = dict(model.named_modules())
    params: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for src, value in state.items():
        dst = layout.target(src)
        if dst is None:
            continue
        if dst in origin:
            raise CheckpointMismatchError(
                f"checkpoint keys {origin[dst]!r} and {src!r} both map to parameter {dst!r}"
            )
        mod_path, _, leaf = dst.rpartition(".")
        module = modules.get(mod_path)
        value = np.asarray(value)
        params[dst] = torch_to_mlx(module, leaf, value) if module is not None else value
        origin[dst] = src
    return params, origin


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
    adapt = getattr(model, "adapt_checkpoint", None)
    if adapt is not None:
        params = adapt(params)

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(k for k in expected if k not in params)
    unexpected = sorted(f"{origin.get(k, k)}" + (f" (-> {k})" if origin.get(k, k) != k else "")
                        for k in params if k not in expected)
    mismatched = []
    for k, v in params.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            src = origin.get(k, k)
            mismatched.append(
                f"{src}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                + (f" (parameter {k})" if src != k else "")
            )
    if missing or unexpected or mismatched:
        parts = [f"{source} ({layout.name} layout) does not fit {getattr(model, 'arch_name', type(model).__name__)}:"]
        if missing:
            parts.append(_listing("missing keys (model parameters not in the checkpoint)", missing))
        if unexpected:
            parts.append(_listing("unexpected keys (checkpoint entries the model does not have)", unexpected))
        if mismatched:
            parts.append(_listing("wrong shapes", mismatched))
        raise CheckpointMismatchError("\n".join(parts), missing, unexpected, mismatched)

    arrays = []
    for k, v in params.items():
        ref = expected[k]
        arr = mx.array(np.ascontiguousarray(v))
        if mx.issubdtype(ref.dtype, mx.floating):
            arr = arr.astype(ref.dtype)
        arrays.append((k, arr))
    model.update(tree_unflatten(arrays))
    mx.eval(model.parameters())
    return layout
