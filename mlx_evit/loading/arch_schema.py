"""Checking a model folder's ``config.json`` before anything is built from it.

A folder written by :func:`~mlx_evit.loading.model_dir.save_model` names an
architecture and the arguments its builder gets (``arch_args``) plus the
preprocessing of the weights (``pretrained_cfg``). Built blindly, an absurd
value costs memory and time out of all proportion to the folder
(``depths`` of a million blocks, a window of 150 making a 22500^2 index,
``num_classes`` 1e12) or a raw ``ZeroDivisionError``/``RecursionError``.
:func:`check_model_config` refuses such a config with one line naming the
file and the key, before anything is built:

* ``arch_args`` keys must be arguments of that architecture's builder;
* values are JSON scalars or flat lists (nesting at most 2 deep), of the
  type the family's registry entries use, within the family's ranges
  (:data:`RULES`), and the lists must have lengths that one of the family's
  registered architectures has (``widths`` and ``depths`` of 5 stages, ...);
* sizes must be ones the weights file can hold: no width/class count larger
  than every dimension of the file's tensors, no more blocks than it has
  tensors, no more blocks than half its tensor count (read from the
  safetensors header, no tensor is read);
* ``pretrained_cfg``: ``input_size`` sides and their resize within
  :data:`MAX_INPUT_SIDE`, known ``crop_mode``/``interpolation`` names,
  3 finite ``mean``/``std`` values (``std`` non-zero).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from mlx_evit.errors import ModelConfigError, short_name
from mlx_evit.loading.safetensors_reader import MAX_HEADER
from mlx_evit.loading.tensor_formats import check_regular_file

__all__ = ["RULES", "MAX_INPUT_SIDE", "check_model_config", "check_arch_args", "check_pretrained_cfg"]

MAX_INPUT_SIDE = 8192
"""Largest side of a preprocessing ``input_size`` and of its resize target (as in tasks.transforms)."""
_MAX_NESTING = 2
_MAX_LIST = 64


@dataclass(frozen=True)
class Rule:
    """What one argument may be: ``kind`` int/num/bool/str/size; ``seq``: a list of such;
    ``lo``/``hi`` inclusive bounds (``lo_open``: lower bound excluded); ``optional``: null allowed;
    ``sized``: a channel or class count the weights file must be able to hold."""

    kind: str
    lo: float = -math.inf
    hi: float = math.inf
    seq: bool = False
    optional: bool = False
    lo_open: bool = False
    sized: bool = False


def _ints(lo, hi, **kw) -> Rule:
    return Rule("int", lo, hi, seq=True, **kw)


RULES: dict[str, Rule] = {
    # channel and class counts
    "widths": _ints(1, 4096, sized=True),
    "head_widths": _ints(1, 16384, sized=True),
    "head_width": Rule("int", 1, 4096, sized=True),
    "embed_dim": Rule("int", 1, 4096, sized=True),  # seed: one int; msra: a list (accepted below)
    "num_classes": Rule("int", 0, 1_000_000, optional=True, sized=True),
    "in_chans": Rule("int", 1, 16),
    "in_channels": Rule("int", 1, 16),
    "head_dim": Rule("int", 1, 1024),
    "key_dim": _ints(1, 1024),
    "num_heads": _ints(1, 256),
    # depths: blocks per stage
    "depths": _ints(0, 64),
    "depth": _ints(0, 64),
    "head_depth": Rule("int", 0, 64),
    "neck_depth": Rule("int", 0, 64),
    "neck_stages": _ints(0, 16),
    # spatial sizes
    "img_size": Rule("size", 16, 4096),
    "image_size": Rule("int", 16, 4096),
    "patch_size": Rule("int", 1, 64),
    "window_size": _ints(1, 32),
    "kernels": _ints(1, 15),
    "kernel": Rule("int", 1, 15),
    # ratios and constants
    "expand_ratio": Rule("num", 0, 16, lo_open=True),
    "final_expand": Rule("num", 0, 16, lo_open=True, optional=True),
    "expands": Rule("num", 0, 16, seq=True, lo_open=True),
    "neck_expand": Rule("num", 0, 16, lo_open=True),
    "mlp_ratio": Rule("num", 0, 16, lo_open=True),
    "norm_eps": Rule("num", 0, 1, lo_open=True, optional=True),
    "head_norm_eps": Rule("num", 0, 1, lo_open=True, optional=True),
    "attention_eps": Rule("num", 0, 1, lo_open=True),
    "drop_rate": Rule("num", 0, 1),
    "large": Rule("bool"),
    "fewer_norm": Rule("bool", seq=True),
    # names: one of the values the family's registry entries use
    "act": Rule("str", optional=True),
    "middle": Rule("str"),
    "dataset": Rule("str", optional=True),
    "blocks": Rule("str", seq=True),
}
"""Per argument name: the type and the range any family allows."""

_SEQ_OR_INT = {"embed_dim"}  # msra gives one width per stage, the seed model one width


def check_model_config(config_path: os.PathLike, config: Mapping[str, Any], weights: Optional[os.PathLike]) -> None:
    """Refuse ``config`` (read from ``config_path``) unless its ``arch_args`` and ``pretrained_cfg`` fit the
    registry entry of its ``architecture`` and the tensors of ``weights`` (a safetensors file, if present).

    Raises :class:`~mlx_evit.errors.ModelConfigError` naming the file and the key.
    """
    where = os.fspath(config_path)
    dims = _weight_dims(weights) if weights is not None else None
    check_arch_args(config.get("architecture"), config.get("arch_args"), where, dims)
    cfg = config.get("pretrained_cfg")
    if cfg is not None:
        check_pretrained_cfg(config.get("architecture"), cfg, where)


def check_arch_args(arch: Any, args: Any, where: str, dims: Optional[tuple[int, int]] = None) -> None:
    """Check ``arch_args`` of architecture ``arch``; ``dims``: (largest tensor dimension, tensor count)
    of the weights file, when known."""
    from mlx_evit.models.registry import _entries, get_entry

    if not isinstance(arch, str) or not isinstance(args, dict):
        raise ModelConfigError(f"{where}: 'architecture' (string) and 'arch_args' (object) are required")
    try:
        entry = get_entry(arch)
    except ValueError as e:
        raise ModelConfigError(f"{where}: architecture: {e}") from None
    family = [e for e in _entries().values() if e.family == entry.family]
    known = _builder_args(entry)
    for key, value in args.items():
        name = f"arch_args.{short_name(key, 40, bare=True)}"
        _check_nesting(value, where, name)
        if key not in known:
            raise ModelConfigError(f"{where}: {name} is not an argument of {arch} "
                                   f"(known: {', '.join(sorted(known))})")
        rule = RULES.get(key)
        if rule is None:  # an argument no rule covers: only the values registered for the family
            seen = [e.defaults[key] for e in family if key in e.defaults] + [known[key]]
            if not any(_same(value, s) for s in seen):
                raise ModelConfigError(f"{where}: {name} = {_show(value)} is not a value {entry.family} models use")
            continue
        choices = _seen_strings(family, key) if rule.kind == "str" else None
        if key in _SEQ_OR_INT and isinstance(value, list):
            rule = Rule(rule.kind, rule.lo, rule.hi, seq=True, sized=rule.sized)
        _check_value(value, rule, where, name, choices)
        if rule.sized and dims is not None:
            biggest = max((v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)),
                          default=0)
            if biggest > dims[0]:
                raise ModelConfigError(f"{where}: {name} = {_show(value)} is larger than every dimension of the "
                                       f"weights file's tensors (at most {dims[0]})")
    _check_lengths(args, family, entry.name, where)
    if dims is not None:
        blocks = sum(sum(v) for k, v in args.items() if k in ("depths", "depth") and isinstance(v, list))
        blocks += sum(v for k, v in args.items() if k in ("head_depth", "neck_depth") and isinstance(v, int))
        if 2 * blocks > dims[1]:  # every block has a weight and a norm at least
            raise ModelConfigError(f"{where}: arch_args ask for {blocks} blocks but the weights file holds only "
                                   f"{dims[1]} tensors (at least 2 per block)")


def check_pretrained_cfg(arch: Any, cfg: Any, where: str) -> None:
    """Check a folder's preprocessing config: sizes, names and values its eval transform will use."""
    from mlx_evit.models.registry import _entries

    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{where}: pretrained_cfg must be an object or null")
    tags = [c for e in _entries().values() for c in e.tags]
    for key, value in cfg.items():
        _check_nesting(value, where, f"pretrained_cfg.{short_name(key, 40, bare=True)}")
    size = cfg.get("input_size")
    if size is not None:
        sides = [size] if _is_int(size) else size if isinstance(size, list) else None
        if sides is not None and len(sides) == 3 and sides[0] == 3:
            sides = sides[1:]
        if (sides is None or len(sides) not in (1, 2)
                or not all(_is_int(s) and 1 <= s <= MAX_INPUT_SIDE for s in sides)):
            raise ModelConfigError(f"{where}: pretrained_cfg.input_size = {_show(size)} must be an int, [H, W] or "
                                   f"[3, H, W] with sides 1..{MAX_INPUT_SIDE}")
        crop = cfg.get("crop_pct")
        if crop is not None:
            if not _is_num(crop) or not 0.05 <= crop <= 10:
                raise ModelConfigError(f"{where}: pretrained_cfg.crop_pct = {_show(crop)} must be in 0.05..10")
            if max(sides) / crop > MAX_INPUT_SIDE:
                raise ModelConfigError(f"{where}: pretrained_cfg.input_size {_show(size)} with crop_pct {crop} "
                                       f"resizes to over {MAX_INPUT_SIDE} pixels a side")
    for key, names in (("crop_mode", {"center", "squash", "border"}),
                       ("interpolation", {"nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"})):
        value = cfg.get(key)
        allowed = names | {getattr(c, key) for c in tags}
        if value is not None and (not isinstance(value, str) or value not in allowed):
            raise ModelConfigError(f"{where}: pretrained_cfg.{key} = {_show(value)} is not one of "
                                   f"{', '.join(sorted(allowed))}")
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is None:
            continue
        if (not isinstance(value, list) or len(value) != 3 or not all(_is_num(v) and abs(v) <= 1e6 for v in value)
                or (key == "std" and not all(abs(v) >= 1e-6 for v in value))):
            raise ModelConfigError(f"{where}: pretrained_cfg.{key} = {_show(value)} must be 3 finite numbers"
                                   + (" (non-zero)" if key == "std" else ""))
    classes = cfg.get("num_classes")
    if classes is not None and not (_is_int(classes) and 0 <= classes <= 1_000_000):
        raise ModelConfigError(f"{where}: pretrained_cfg.num_classes = {_show(classes)} must be 0..1000000")


# ------------------------------------------------------------------ helpers


def _builder_args(entry) -> dict[str, Any]:
    """Argument name -> default of the entry's builder (its registered defaults when it takes ``**``)."""
    known = dict(entry.defaults)
    try:
        params = inspect.signature(entry.builder).parameters.values()
    except (TypeError, ValueError):
        params = ()
    for p in params:
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            known.setdefault(p.name, None if p.default is p.empty else p.default)
    return known


def _seen_strings(family: Iterable, key: str) -> set:
    seen = set()
    for e in family:
        value = e.defaults.get(key)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str):
                seen.add(v)
    if key == "act":
        from mlx_evit.ops.layers import ACTIVATIONS

        seen |= set(ACTIVATIONS)
    return seen


def _check_nesting(value: Any, where: str, name: str) -> None:
    """Refuse values nested deeper than ``_MAX_NESTING`` or lists longer than ``_MAX_LIST`` (no recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth >= _MAX_NESTING:
                raise ModelConfigError(f"{where}: {name} is nested more than {_MAX_NESTING} levels deep")
            if len(item) > _MAX_LIST:
                raise ModelConfigError(f"{where}: {name} has {len(item)} entries, more than {_MAX_LIST}")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
        elif isinstance(item, str) and len(item) > 256:
            raise ModelConfigError(f"{where}: {name} holds a string of {len(item)} characters")


def _check_value(value: Any, rule: Rule, where: str, name: str, choices: Optional[set]) -> None:
    if value is None:
        if rule.optional:
            return
        raise ModelConfigError(f"{where}: {name} must not be null")
    if rule.kind == "size" and isinstance(value, list):
        rule = Rule("int", rule.lo, rule.hi, seq=True)
        if len(value) != 2:
            raise ModelConfigError(f"{where}: {name} = {_show(value)} must be an int or [H, W]")
    items = value if rule.seq else [value]
    if rule.seq and not isinstance(value, list):
        raise ModelConfigError(f"{where}: {name} = {_show(value)} must be a list")
    for i, item in enumerate(items):
        label = f"{name}[{i}]" if rule.seq else name
        ok = {"int": _is_int, "size": _is_int, "num": _is_num, "bool": lambda v: type(v) is bool,
              "str": lambda v: isinstance(v, str)}[rule.kind](item)
        if not ok:
            raise ModelConfigError(f"{where}: {label} = {_show(item)} must be {_KIND_NAMES[rule.kind]}")
        if rule.kind in ("int", "size", "num"):
            low_ok = item > rule.lo if rule.lo_open else item >= rule.lo
            if not (low_ok and item <= rule.hi):
                low = f"over {rule.lo:g}" if rule.lo_open else f"{rule.lo:g}"
                raise ModelConfigError(f"{where}: {label} = {_show(item)} is out of range ({low}..{rule.hi:g})")
        if choices is not None and item not in choices:
            raise ModelConfigError(f"{where}: {label} = {_show(item)} is not one of {', '.join(sorted(choices))}")


_KIND_NAMES = {"int": "an integer", "size": "an integer", "num": "a finite number", "bool": "true or false",
               "str": "a string"}


def _check_lengths(args: Mapping[str, Any], family: list, arch: str, where: str) -> None:
    """List arguments must have the lengths of one registered architecture of the family."""
    keys = sorted(k for k, v in args.items() if isinstance(v, list) and k in RULES and k != "img_size")
    if not keys:
        return
    patterns = []
    for e in family:
        merged = dict(e.defaults)
        if all(isinstance(merged.get(k), (list, tuple)) for k in keys):
            patterns.append(tuple(len(merged[k]) for k in keys))
    got = tuple(len(args[k]) for k in keys)
    if family and family[0].family == "seed":  # the seed model is built to be configured: any stage count,
        if len(set(got)) > 1:                    # as long as every per-stage list has one entry per stage
            raise ModelConfigError(f"{where}: arch_args {', '.join(f'{k} ({n})' for k, n in zip(keys, got))} "
                                   "must have one entry per stage each")
        return
    if patterns and got not in patterns:
        expected = dict(zip(keys, patterns[0]))
        bad = next((k for k, n in zip(keys, got) if n != expected[k]), keys[0])
        raise ModelConfigError(f"{where}: arch_args.{bad} has {len(args[bad])} entries; {arch}'s family uses "
                               f"{expected[bad]} (with {', '.join(f'{k}: {n}' for k, n in expected.items())})")


def _weight_dims(path: os.PathLike) -> Optional[tuple[int, int]]:
    """(largest dimension of any tensor, number of tensors) from a safetensors header; None when unreadable
    (the weights reader reports that file's own problems)."""
    try:
        size = check_regular_file(os.fspath(path))
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER or n > size - 8:
                return None
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    dims, count = [0], 0
    for key, spec in header.items():
        if key == "__metadata__" or not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
            continue
        count += 1
        dims.extend(d for d in spec["shape"] if _is_int(d))
    return max(dims), count


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_num(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) or isinstance(b, (list, tuple)):
        return isinstance(a, list) and isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            _same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _show(value: Any) -> str:
    """A value as a short one-line JSON-like text (strings quoted and escaped)."""
    if isinstance(value, str):
        return short_name(value, 60)
    text = json.dumps(value)
    return text if len(text) <= 60 and text.isascii() and text.isprintable() else short_name(text, 60)
