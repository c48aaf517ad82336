"""Which registered architecture a state dict belongs to, from its keys and shapes alone.

Generic over families: every registry entry whose builder declares
``checkpoint_layouts`` (:class:`~mlx_evit.models.keymap.KeyMap` tables) is a
candidate; a new family takes part by being listed in the registry. A fit
renames the keys under a layout of the architecture, builds the model
(memoised reference shapes), applies its ``adapt_checkpoint`` hook once and
compares names and shapes. :class:`Fit` keeps that model and the adapted
parameters, so loading the detected model does not redo any of it.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional, Sequence

import mlx.nn as nn
import numpy as np

from mlx_evit.loading.checkpoint import CheckpointInfo
from mlx_evit.errors import ConversionError, mismatch_parts, short_name
from mlx_evit.models.registry import build_model, get_entry, list_models, split_name
from mlx_evit.models.keymap import IDENTITY, KeyMap, adapt_params, fit_report, map_state_dict, param_shapes, rename_state_dict, select_layout

__all__ = ["Fit", "candidates", "detect_model", "detect", "verify", "fit", "config_tag"]


@dataclass(frozen=True)
class Fit:
    """How well a checkpoint fits one registered architecture.

    ``model``/``params``: the model built for the fit (layout defaults and
    overrides applied) and the checkpoint's parameters renamed, converted and
    adapted for it; ``notices``: what its ``adapt_checkpoint`` warned.
    """

    arch: str
    layout: KeyMap
    num_classes: Optional[int]
    expected: int  # number of model parameters
    matched: int  # checkpoint entries with the right key and shape
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    model: Optional[nn.Module] = field(default=None, compare=False, repr=False)
    params: Optional[Mapping[str, np.ndarray]] = field(default=None, compare=False, repr=False)
    origin: Optional[Mapping[str, str]] = field(default=None, compare=False, repr=False)
    notices: tuple[warnings.WarningMessage, ...] = field(default=(), compare=False, repr=False)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = [f"{self.layout.name} layout", *mismatch_parts(self.missing, self.unexpected, self.mismatched)]
        return f"{self.arch} ({', '.join(parts)}; {self.matched}/{self.expected} parameters match)"


def layouts_of(arch: str) -> tuple[KeyMap, ...]:
    """Checkpoint layouts the builder of ``arch`` declares (empty: not convertible)."""
    return tuple(getattr(get_entry(arch).builder, "checkpoint_layouts", None) or ())


def candidates() -> list[str]:
    """Architectures that declare checkpoint layouts (the ones a checkpoint can be detected as)."""
    return [name for name in list_models() if layouts_of(name)]


@functools.lru_cache(maxsize=None)
def _reference(arch: str, num_classes: Optional[int]) -> tuple[Mapping[str, tuple[int, ...]], Optional[int]]:
    """(parameter shapes, num_classes) of a registry build (memoised: building models is what
    detection costs, and a registered architecture's shapes never change)."""
    model = build_model(arch, num_classes=num_classes)
    return MappingProxyType(param_shapes(model)), getattr(model, "num_classes", None)


def _head_keys(arch: str) -> frozenset[str]:
    """Classifier parameters: those a headless build (``num_classes=0``) lacks or shapes differently."""
    full = _reference(arch, None)[0]
    try:
        headless = _reference(arch, 0)[0]
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(k for k in full if headless.get(k) != full[k])


def _layout_for(arch: str, keys: Sequence[str]) -> Optional[KeyMap]:
    """The layout of ``arch`` the keys follow, or None if they follow none of its layouts."""
    layouts = layouts_of(arch)
    if not layouts or max(layout.matches(keys) for layout in layouts) == 0:
        return None
    return select_layout(keys, layouts)


def _infer_num_classes(arch: str, renamed: Mapping[str, np.ndarray]) -> Optional[int]:
    """Classifier width implied by a renamed checkpoint (0 when it has no classifier).

    The leading axis of the classifier parameters is the class count.
    """
    full, default = _reference(arch, None)
    head = _head_keys(arch)
    if head and not any(k in renamed for k in head):
        return 0
    rows = [k for k in head if full[k] and full[k][0] == default]
    sizes = {int(renamed[k].shape[0]) for k in rows if k in renamed and renamed[k].ndim >= 1}
    return sizes.pop() if len(sizes) == 1 else default


def fit(arch: str, tensors: Mapping[str, np.ndarray], num_classes: Optional[int] = None,
        overrides: Optional[Mapping[str, Any]] = None,
        renamed: Optional[tuple[KeyMap, dict, dict]] = None) -> Optional[Fit]:
    """Compare ``tensors`` with ``arch`` by key and shape; None if no layout of it matches.

    ``num_classes`` None: taken from the checkpoint's classifier.
    ``overrides``: architecture arguments (the layout's defaults fill the
    others). ``renamed``: ``(layout, state, origin)`` if already renamed.
    """
    if renamed is None:
        layout = _layout_for(arch, list(tensors))
        if layout is None:
            return None
        renamed = (layout, *rename_state_dict(tensors, layout))
    layout, state, origin = renamed
    overrides = dict(overrides or {})
    if num_classes is None:
        num_classes = _infer_num_classes(arch, state)
    args = {k: v for k, v in layout.defaults.items() if k not in overrides}
    args.update(overrides)
    model = build_model(arch, num_classes=num_classes, **args)
    params, _ = map_state_dict(model, state, IDENTITY)
    with warnings.catch_warnings(record=True) as notices:
        warnings.simplefilter("always")
        try:
            params = adapt_params(model, params)
        except Exception:  # a malformed tensor; the strict load reports it properly
            pass
    missing, unexpected, mismatched = fit_report(model, params, origin)
    expected = param_shapes(model)
    matched = sum(1 for k, v in params.items() if expected.get(k) == tuple(v.shape))
    return Fit(arch, layout, model.num_classes, len(expected), matched, missing, unexpected, mismatched,
               model, params, origin, tuple(notices))


def _config_architecture(info: Optional[CheckpointInfo]) -> Optional[str]:
    config = (info.config if info is not None else None) or {}
    arch = config.get("architecture")
    return arch if isinstance(arch, str) and arch else None


def detect(tensors: Mapping[str, np.ndarray], info: Optional[CheckpointInfo] = None,
           among: Optional[Iterable[str]] = None) -> Fit:
    """The one exact :class:`Fit` among the candidates, else a one-line :class:`ConversionError`.

    timm's ``config.json`` (``info.config``) naming the architecture is only
    verified. ``among``: architectures to consider (default :func:`candidates`).
    """
    source = info.path if info is not None else "checkpoint"
    supported = list(among) if among is not None else candidates()
    named = _config_architecture(info)
    if named is not None:
        arch = split_name(named)[0]
        if arch not in supported:
            raise ConversionError(
                f"unknown network: {info.config_path} names architecture {named!r}, which is not a supported "
                f"model; candidates: {', '.join(supported)}"
            )
        found = fit(arch, tensors)
        if found is None or not found.exact:
            detail = found.describe() if found is not None else "no known key layout"
            raise ConversionError(f"{source}: weights do not fit {arch} named by {info.config_path}: {detail}")
        return found
    keys = list(tensors)
    family = [(arch, layout) for arch in supported if (layout := _layout_for(arch, keys)) is not None]
    if not family:
        sample = ", ".join(short_name(k, 60, bare=True) for k in keys[:4]) or "none"
        raise ConversionError(
            f"unknown network: {source}: its keys (first: {sample}) match no supported EfficientViT layout; "
            f"candidates: {', '.join(supported)}"
        )
    renamed: dict[int, tuple[KeyMap, dict, dict]] = {}  # id(layout) -> (layout, state, origin)
    for _, layout in family:
        if id(layout) not in renamed:
            renamed[id(layout)] = (layout, *rename_state_dict(tensors, layout))

    def plausible(arch: str, layout: KeyMap) -> bool:
        """Cheap pre-check: every non-classifier parameter of ``arch`` is named by the checkpoint."""
        state = renamed[id(layout)][1]
        head = _head_keys(arch)
        return all(k in state for k in _reference(arch, None)[0] if k not in head)

    fits = [fit(arch, tensors, renamed=renamed[id(layout)]) for arch, layout in family if plausible(arch, layout)]
    exact = [f for f in fits if f is not None and f.exact]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        names = ", ".join(f.arch for f in exact)
        raise ConversionError(f"ambiguous checkpoint {source}: it fits {names}; choose one with --model NAME")
    fits = [fit(arch, tensors, renamed=renamed[id(layout)]) for arch, layout in family]  # for the report
    score = {id(f): f.matched / max(f.expected, len(tensors)) for f in fits}
    fits.sort(key=lambda f: score[id(f)], reverse=True)
    closest = "; ".join(f.describe() for f in fits[:2])
    # Most parameters in place: a damaged or modified checkpoint of a known model, not another network.
    prefix = "" if score[id(fits[0])] >= 0.5 else "unknown network: "
    raise ConversionError(
        f"{prefix}{source} fits no supported model exactly; closest: {closest}; "
        f"candidates: {', '.join(supported)}"
    )


def verify(name: str, tensors: Mapping[str, np.ndarray], info: CheckpointInfo,
           num_classes: Optional[int] = None, overrides: Optional[Mapping[str, Any]] = None) -> Fit:
    """The exact fit of the requested model; a one-line error if the checkpoint is not that model."""
    arch = split_name(name)[0]
    try:
        get_entry(name)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    found = fit(arch, tensors, num_classes, overrides)
    if found is not None and found.exact:
        return found
    hint = ""
    try:
        other = detect(tensors, None)
        if other.arch != arch:
            hint = f"; it looks like {other.arch}"
    except ConversionError:
        pass
    if found is None:
        sample = ", ".join(short_name(k, 60, bare=True) for k in list(tensors)[:4]) or "none"
        raise ConversionError(
            f"{info.path} is not a {arch} checkpoint: its keys (first: {sample}) match none of its layouts{hint}"
        )
    raise ConversionError(f"{info.path} does not fit {found.describe()}{hint}")


def config_tag(info: Optional[CheckpointInfo], arch: str) -> Optional[str]:
    """timm config's pretrained tag if the registry knows it for ``arch``."""
    cfg = (info.config or {}).get("pretrained_cfg") if info is not None else None
    tag = cfg.get("tag") if isinstance(cfg, dict) else None
    if not isinstance(tag, str):
        return None
    try:
        get_entry(arch).cfg(tag)
    except ValueError:
        return None
    return tag


def detect_model(tensors: Mapping[str, np.ndarray], info: Optional[CheckpointInfo] = None, *,
                 candidates: Optional[Iterable[str]] = None) -> str:
    """Registry name of the model a state dict belongs to, from its keys and shapes.

    ``tensors``/``info`` as returned by :func:`~mlx_evit.loading.checkpoint.read_checkpoint`;
    timm's ``config.json`` (``info.config``) names the architecture and tag
    when present and is then only verified. ``candidates``: the
    architectures to choose from (default: every registered one with
    checkpoint layouts). Returns ``"efficientvit_b1"`` or, with a known tag
    from the config, ``"efficientvit_b1.r288_in1k"``. Raises
    :class:`ConversionError` naming the candidates when the network is
    unknown or several variants fit.
    """
    found = detect(tensors, info, among=candidates)
    tag = config_tag(info, found.arch)
    return f"{found.arch}.{tag}" if tag else found.arch
