"""Which registered architecture and key layout a state dict is: a pure function of key names and shapes.

Nothing is built to guess. Each convertible architecture has a parameter
table (``mlx_evit/models/data/param_tables.json``, written by
``tools/make_param_tables.py`` and checked against fresh builds by the
tests): the element count of every MLX parameter at the architecture's
default arguments, with the classifier's count as a linear function of the
class count. A checkpoint's keys are renamed under each layout its family
declares (:class:`~mlx_evit.models.keymap.KeyMap`, regex rules only) and
compared with the table by name and element count (a transpose between
PyTorch and MLX keeps the count). Families whose ``adapt_checkpoint`` hook
fits some tensors declare them as data on the model class:
``adapted_keys`` (extra keys the hook consumes, e.g. a distillation head)
and ``resized_keys`` (tensors whose size the hook changes, e.g. attention-bias
tables of another resolution).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable, Mapping, Optional, Sequence

from mlx_evit.errors import ConversionError, mismatch_parts, short_name
from mlx_evit.models.keymap import KeyMap
from mlx_evit.models.registry import get_entry, list_models, registry_name, split_name

__all__ = ["Match", "candidates", "layouts_of", "match", "identify_checkpoint", "verify", "config_tag", "detect_model"]

Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class Match:
    """How a checkpoint's keys and shapes fit one architecture under one of its layouts.

    ``num_classes``: the classifier width the checkpoint implies (0: no
    classifier; None: the family has none). ``matched``/``expected``:
    parameters present with the right element count / parameters the model has.
    """

    arch: str
    layout: KeyMap
    num_classes: Optional[int]
    expected: int
    matched: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = [f"{self.layout.name} layout", *mismatch_parts(self.missing, self.unexpected, self.mismatched)]
        return f"{self.arch} ({', '.join(parts)}; {self.matched}/{self.expected} parameters match)"


@functools.lru_cache(maxsize=1)
def _tables() -> Mapping[str, Any]:
    text = resources.files("mlx_evit.models").joinpath("data", "param_tables.json").read_text(encoding="utf-8")
    return json.loads(text)


def layouts_of(arch: str) -> tuple[KeyMap, ...]:
    """Checkpoint layouts the family of ``arch`` declares (empty: not convertible)."""
    return tuple(getattr(get_entry(arch).builder, "checkpoint_layouts", None) or ())


def candidates() -> list[str]:
    """Architectures a checkpoint can be identified as (those with layouts and a parameter table)."""
    tables = _tables()
    return [name for name in list_models() if name in tables and layouts_of(name)]


def _patterns(arch: str, attr: str) -> tuple[str, ...]:
    return tuple(getattr(get_entry(arch).builder, attr, ()) or ())


def _rename(keys: Iterable[str], layout: KeyMap) -> Optional[dict[str, str]]:
    """MLX path -> source key under ``layout`` (dropped keys left out); None if two keys collide."""
    origin: dict[str, str] = {}
    for src in keys:
        dst = layout.target(src)
        if dst is None:
            continue
        if dst in origin:
            return None
        origin[dst] = src
    return origin


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def match(arch: str, shapes: Shapes, layout: Optional[KeyMap] = None) -> Optional[Match]:
    """Compare a state dict's ``{key: shape}`` with ``arch`` (default arguments); None if no layout applies.

    ``layout``: the layout to use (default: the one whose marker most keys match).
    """
    table = _tables()[arch]
    if layout is None:
        layouts = layouts_of(arch)
        scores = [lay.matches(shapes) for lay in layouts]
        if not scores or max(scores) == 0:
            return None
        layout = layouts[scores.index(max(scores))]
    origin = _rename(shapes, layout)
    if origin is None:
        return None
    params, head = table["params"], table["head"]
    default = table["num_classes"]
    num_classes = default
    if head:
        present = [k for k in head if k in origin]
        if not present and table["headless"] is not None:
            num_classes = 0
        else:
            widths = {int(shapes[origin[k]][0]) for k in present if len(shapes[origin[k]]) >= 1}
            num_classes = widths.pop() if len(widths) == 1 else default
    expected = dict(params)
    if num_classes == 0:
        for k in table["headless"] or ():
            expected.pop(k, None)
    else:
        expected.update({k: a * num_classes + b for k, (a, b) in head.items()})
    adapted, resized = _patterns(arch, "adapted_keys"), _patterns(arch, "resized_keys")

    def named(k: str) -> str:
        return short_name(origin[k], 120, bare=True) + (f" (-> {k})" if origin[k] != k else "")

    missing = tuple(k for k in expected if k not in origin)
    unexpected = tuple(sorted(named(k) for k in origin
                              if k not in expected and not any(re.search(p, k) for p in adapted)))
    mismatched = []
    matched = 0
    for k, want in expected.items():
        if k not in origin:
            continue
        got = _numel(shapes[origin[k]])
        if got == want:
            matched += 1
        elif not any(re.search(p, k) for p in resized):
            mismatched.append(f"{short_name(origin[k], 120, bare=True)}: checkpoint {tuple(int(d) for d in shapes[origin[k]])} "
                              f"({got} values) vs model ({want} values)")
        else:
            matched += 1
    return Match(arch, layout, num_classes if head else None, len(expected), matched, missing, unexpected,
                 tuple(mismatched))


def _config_architecture(config: Optional[Mapping[str, Any]]) -> Optional[str]:
    arch = (config or {}).get("architecture")
    return arch if isinstance(arch, str) and arch else None


def identify_checkpoint(shapes: Shapes, config: Optional[Mapping[str, Any]] = None, *, source: str = "checkpoint",
             config_path: Optional[str] = None, among: Optional[Iterable[str]] = None) -> Match:
    """The one exact :class:`Match` among the candidates, else a one-line :class:`ConversionError`.

    ``shapes``: ``{key: shape}`` of the state dict; ``config``: timm's
    ``config.json`` beside it, whose ``architecture`` is then only verified.
    ``among``: architectures to consider (default :func:`candidates`).
    """
    supported = list(among) if among is not None else candidates()
    named = _config_architecture(config)
    if named is not None:
        arch = split_name(named)[0]
        if arch not in supported:
            raise ConversionError(
                f"unknown network: {config_path or 'config.json'} names architecture {named!r}, which is not a "
                f"supported model; candidates: {', '.join(supported)}"
            )
        found = match(arch, shapes)
        if found is None or not found.exact:
            detail = found.describe() if found is not None else "no known key layout"
            raise ConversionError(f"{source}: weights do not fit {arch} named by {config_path}: {detail}")
        return found
    fits = [f for arch in supported if (f := match(arch, shapes)) is not None]
    if not fits:
        sample = ", ".join(short_name(k, 60, bare=True) for k in list(shapes)[:4]) or "none"
        raise ConversionError(
            f"unknown network: {source}: its keys (first: {sample}) match no supported EfficientViT layout; "
            f"candidates: {', '.join(supported)}"
        )
    exact = [f for f in fits if f.exact]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        names = ", ".join(f.arch for f in exact)
        raise ConversionError(f"ambiguous checkpoint {source}: it fits {names}; choose one with --model NAME")
    score = {id(f): f.matched / max(f.expected, len(shapes)) for f in fits}
    fits.sort(key=lambda f: score[id(f)], reverse=True)
    closest = "; ".join(f.describe() for f in fits[:2])
    # Most parameters in place: a damaged or modified checkpoint of a known model, not another network.
    prefix = "" if score[id(fits[0])] >= 0.5 else "unknown network: "
    raise ConversionError(
        f"{prefix}{source} fits no supported model exactly; closest: {closest}; candidates: {', '.join(supported)}"
    )


def verify(name: str, shapes: Shapes, *, source: str = "checkpoint") -> KeyMap:
    """The layout under which the checkpoint is ``name``; a one-line error naming what it looks like otherwise.

    Only the key names are checked here (the shapes are checked exactly by
    the strict load, which knows the requested arguments); a checkpoint whose
    keys follow none of the family's layouts is refused at once.
    """
    arch = split_name(name)[0]
    try:
        get_entry(name)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    layouts = layouts_of(arch)
    scores = [lay.matches(shapes) for lay in layouts]
    if scores and max(scores) > 0:
        return layouts[scores.index(max(scores))]
    sample = ", ".join(short_name(k, 60, bare=True) for k in list(shapes)[:4]) or "none"
    raise ConversionError(
        f"{source} is not a {arch} checkpoint: its keys (first: {sample}) match none of its layouts"
        f"{looks_like(shapes, arch)}"
    )


def looks_like(shapes: Shapes, not_arch: str) -> str:
    """``"; it looks like X"`` when the checkpoint is exactly another architecture X, else ``""``."""
    try:
        other = identify_checkpoint(shapes)
    except ConversionError:
        return ""
    return f"; it looks like {other.arch}" if other.arch != split_name(not_arch)[0] else ""


def config_tag(config: Optional[Mapping[str, Any]], arch: str) -> Optional[str]:
    """timm config's pretrained tag if the registry knows it for ``arch``."""
    cfg = (config or {}).get("pretrained_cfg")
    return registry_name(arch, cfg if isinstance(cfg, dict) else None).partition(".")[2] or None


def detect_model(tensors: Mapping[str, Any], info: Any = None, *, candidates: Optional[Iterable[str]] = None) -> str:
    """Registry name of the model a state dict belongs to, from its keys and shapes.

    ``tensors``/``info`` as returned by
    :func:`~mlx_evit.loading.checkpoint.read_checkpoint`; timm's
    ``config.json`` (``info.config``) names the architecture and tag when
    present and is then only verified. Returns ``"efficientvit_b1"`` or, with
    a known tag, ``"efficientvit_b1.r288_in1k"``. Raises
    :class:`ConversionError` naming the candidates when the network is
    unknown or several variants fit.
    """
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    config = getattr(info, "config", None)
    found = identify_checkpoint(shapes, config, source=str(getattr(info, "path", "checkpoint")),
                     config_path=getattr(info, "config_path", None), among=candidates)
    tag = config_tag(config, found.arch)
    return f"{found.arch}.{tag}" if tag else found.arch
