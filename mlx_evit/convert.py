"""Checkpoint conversion and loading: the library side of ``mlx-evit-convert``.

Sources (see :func:`mlx_evit.checkpoint.read_checkpoint`, which reads them
without torch and without running anything a file contains): a PyTorch zip
checkpoint (``.pt``/``.pth``/``.bin``), a ``.safetensors`` file, a folder in
timm's Hub layout, or an MLX model directory written here.

An **MLX model directory** holds two files (the format is documented in
``convert/README.md``):

* ``model.safetensors``: every model parameter by its MLX path, BatchNorms
  not folded (so the model can be fine-tuned), safetensors metadata
  ``{"format": "mlx"}``;
* ``config.json``: ``{"format": "mlx_evit", "format_version": 1,
  "architecture", "arch_args", "model", "pretrained_cfg", "dtype", ...}``,
  enough to rebuild the model without the source checkpoint.

Public API: :func:`convert` (what the CLI does), :func:`load` (a ready
model from a directory or a checkpoint), :func:`save_model`,
:func:`detect_model`, :func:`load_into` (``create_model(pretrained=...)``)
and :func:`main` (the CLI).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .checkpoint import CheckpointError, CheckpointInfo, read_checkpoint
from .registry import build_model, get_entry, list_models, split_name
from .weights import CheckpointMismatchError, KeyMap, load_state_dict, map_state_dict, select_layout

__all__ = [
    "ConversionError",
    "ConversionResult",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "DTYPES",
    "parse_dtype",
    "cast_model",
    "model_dtype",
    "convert",
    "load",
    "load_into",
    "save_model",
    "detect_model",
    "is_model_dir",
    "main",
]

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mlx_evit"
FORMAT_VERSION = 1

DTYPES: Mapping[str, mx.Dtype] = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
"""Parameter dtypes a converted model may have (``--dtype``)."""

# BatchNorm statistics stay float32 whatever the model dtype: float16 cannot
# hold variances above 65504 and flushes the tiny ones of the L series
# (eps 1e-7) to subnormals; they are folded in float32 by fuse().
_FLOAT32_LEAVES = ("running_mean", "running_var")
_MAX_CONFIG_BYTES = 16 * 2**20


class ConversionError(ValueError):
    """A checkpoint cannot be converted or loaded; the message is one line naming the problem."""


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert` did.

    ``model``: registry name written to ``config.json`` (with its tag when
    known); ``layout``: source layout (``timm``, ``mit-han-lab (B series)``,
    ``mlx``, ...); ``num_params``: learnable parameters (BatchNorm running
    statistics excluded, as timm counts); ``size_bytes``: both files on disk.
    """

    out_dir: Path
    model: str
    architecture: str
    layout: str
    source_format: str
    sha256: str
    dtype: str
    num_classes: Optional[int]
    num_params: int
    size_bytes: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Fit:
    """How well a checkpoint fits one registered architecture."""

    arch: str
    layout: KeyMap
    num_classes: Optional[int]
    expected: int  # number of model parameters
    matched: int  # checkpoint entries with the right key and shape
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    state: Optional[Mapping[str, np.ndarray]] = field(default=None, compare=False, repr=False)  # renamed

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = [f"{self.layout.name} layout", *_mismatch_parts(self.missing, self.unexpected, self.mismatched)]
        return f"{self.arch} ({', '.join(parts)}; {self.matched}/{self.expected} parameters match)"


@dataclass(frozen=True)
class _Source:
    """A checkpoint turned into an unfused float32 model, plus what went into config.json."""

    model: nn.Module
    layout: str
    info: CheckpointInfo
    labels: Optional[list[str]] = None
    warnings: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape (no evaluation: MLX initialisation is lazy)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def _one_line(text: str, limit: int = 1200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _mismatch_parts(missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]) -> list[str]:
    """``["2 missing (e.g. key)", ...]``: counts with the first example of each kind."""
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {items[0]})")
    return parts


def _describe_error(e: BaseException) -> str:
    """One-line message for any error (a CheckpointMismatchError's key lists become counts)."""
    lines = str(e).splitlines()
    if isinstance(e, CheckpointMismatchError) and len(lines) > 1 and (e.missing or e.unexpected or e.mismatched):
        head = lines[0].rstrip(":")  # load_state_dict's multi-line key listing, summarised
        return _one_line(f"{head}: {'; '.join(_mismatch_parts(e.missing, e.unexpected, e.mismatched))}")
    return _one_line(str(e) or type(e).__name__)


def _dtype_name(dtype: mx.Dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).rpartition(".")[2]


def parse_dtype(dtype: Union[str, mx.Dtype, None]) -> Optional[mx.Dtype]:
    """``"float32"``/``"float16"``/``"bfloat16"`` (or the ``mx`` dtype) -> ``mx.Dtype``; ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, mx.Dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConversionError(f"unsupported dtype {dtype!r}: dtype must be one of {', '.join(DTYPES)}")


def cast_model(model: nn.Module, dtype: Union[str, mx.Dtype]) -> nn.Module:
    """Cast floating parameters to ``dtype`` in place (BatchNorm running statistics stay float32)."""
    target = parse_dtype(dtype)
    updates = []
    for path, value in tree_flatten(model.parameters()):
        if not mx.issubdtype(value.dtype, mx.floating):
            continue
        want = mx.float32 if path.rpartition(".")[2] in _FLOAT32_LEAVES else target
        if value.dtype != want:
            updates.append((path, value.astype(want)))
    if updates:
        model.update(tree_unflatten(updates))
    return model


def model_dtype(model: nn.Module) -> mx.Dtype:
    """Dtype of most floating parameter elements (BatchNorm statistics not counted; float32 if none)."""
    counts: dict[mx.Dtype, int] = {}
    for path, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating) and path.rpartition(".")[2] not in _FLOAT32_LEAVES:
            counts[value.dtype] = counts.get(value.dtype, 0) + value.size
    return max(counts, key=counts.get) if counts else mx.float32


def _num_params(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def _jsonable(value: Any, where: str) -> Any:
    """Tuples become lists; anything JSON cannot hold is an error naming ``where``."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise ConversionError(f"{where} = {value!r} ({type(value).__name__}) cannot be written to config.json")


def _tuplify(value: Any) -> Any:
    """JSON lists back to the tuples builders were given."""
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuplify(v) for k, v in value.items()}
    return value


def _read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ConversionError(f"{path}: larger than {_MAX_CONFIG_BYTES} bytes, not a model config")
        config = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConversionError(f"{path}: not valid JSON ({_one_line(str(e), 200)})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _mlx_config_path(path: PathLike) -> Optional[Path]:
    """``config.json`` of the MLX model directory ``path`` points into, else None.

    ``path`` may be the directory or its ``model.safetensors``. A folder
    whose ``config.json`` is not ours (timm's, or unreadable) is not one.
    """
    p = Path(path)
    folder = p if p.is_dir() else (p.parent if p.name == WEIGHTS_NAME else None)
    if folder is None or not (folder / CONFIG_NAME).is_file():
        return None
    try:
        config = _read_json(folder / CONFIG_NAME)
    except ConversionError:
        return None
    return folder / CONFIG_NAME if config.get("format") == FORMAT else None


def is_model_dir(path: PathLike) -> bool:
    """Whether ``path`` is an MLX model directory written by :func:`save_model`."""
    p = Path(path)
    return p.is_dir() and (p / WEIGHTS_NAME).is_file() and _mlx_config_path(p) is not None


def _candidates() -> list[str]:
    """Architectures that declare checkpoint layouts (the ones a checkpoint can be detected as)."""
    return [name for name in list_models() if _layouts(name)]


def _layouts(arch: str) -> tuple[KeyMap, ...]:
    return tuple(getattr(get_entry(arch).builder, "checkpoint_layouts", None) or ())


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------

# Keys already renamed to MLX paths pass through unchanged.
_RENAMED = KeyMap(name="renamed", marker="", drop=())


@functools.lru_cache(maxsize=None)
def _reference(arch: str, num_classes: Optional[int]) -> tuple[Mapping[str, tuple[int, ...]], Optional[int]]:
    """(parameter shapes, num_classes) of a registry build (memoised: building models is what
    detection costs, and a registered architecture's shapes never change)."""
    model = build_model(arch, num_classes=num_classes)
    return MappingProxyType(_shapes(model)), getattr(model, "num_classes", None)


def _reference_shapes(arch: str, num_classes: Optional[int]) -> Mapping[str, tuple[int, ...]]:
    return _reference(arch, num_classes)[0]


def _head_keys(arch: str) -> frozenset[str]:
    """Classifier parameters: those a headless build (``num_classes=0``) lacks or shapes differently."""
    full = _reference_shapes(arch, None)
    try:
        headless = _reference_shapes(arch, 0)
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(k for k in full if headless.get(k) != full[k])


def _layout_for(arch: str, keys: Sequence[str]) -> Optional[KeyMap]:
    """The layout of ``arch`` the keys follow, or None if they follow none of its layouts."""
    layouts = _layouts(arch)
    if not layouts or max(layout.matches(keys) for layout in layouts) == 0:
        return None
    return select_layout(keys, layouts)


def _rename(tensors: Mapping[str, np.ndarray], layout: KeyMap) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state keyed by MLX path, MLX path -> source key) under ``layout``."""
    state: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for src, value in tensors.items():
        dst = layout.target(src)
        if dst is None:
            continue
        if dst in origin:
            raise CheckpointMismatchError(f"checkpoint keys {origin[dst]!r} and {src!r} both map to parameter {dst!r}")
        state[dst] = value
        origin[dst] = src
    return state, origin


def _infer_num_classes(arch: str, params: Mapping[str, np.ndarray]) -> Optional[int]:
    """Classifier width implied by a renamed checkpoint (0 when it has no classifier).

    The leading axis of the classifier parameters is the class count.
    """
    full, default = _reference(arch, None)
    head = _head_keys(arch)
    if head and not any(k in params for k in head):
        return 0
    rows = [k for k in head if full[k] and full[k][0] == default]
    sizes = {int(params[k].shape[0]) for k in rows if k in params and params[k].ndim >= 1}
    return sizes.pop() if len(sizes) == 1 else default


def _fit(arch: str, tensors: Mapping[str, np.ndarray], num_classes: Optional[int] = None,
         overrides: Optional[Mapping[str, Any]] = None,
         renamed: Optional[tuple[KeyMap, dict, dict]] = None) -> Optional[_Fit]:
    """Compare ``tensors`` with ``arch`` by key and shape; None if no layout of it matches.

    ``num_classes`` None: taken from the checkpoint's classifier.
    ``renamed``: ``(layout, state, origin)`` from :func:`_rename`, if known.
    """
    if renamed is None:
        layout = _layout_for(arch, list(tensors))
        if layout is None:
            return None
        renamed = (layout, *_rename(tensors, layout))
    layout, state, origin = renamed
    overrides = dict(overrides or {})
    if num_classes is None:
        num_classes = _infer_num_classes(arch, state)
    model = build_model(arch, num_classes=num_classes, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # adapt_checkpoint's notices belong to the real load
        params, _ = map_state_dict(model, state, _RENAMED)
        adapt = getattr(model, "adapt_checkpoint", None)
        if adapt is not None:
            try:
                params = adapt(params)
            except Exception:  # a malformed tensor; the strict load reports it properly
                pass
    expected = _shapes(model)
    missing = tuple(k for k in expected if k not in params)  # in model order
    unexpected = tuple(sorted(origin.get(k, k) for k in params if k not in expected))
    mismatched = tuple(
        f"{origin.get(k, k)} {tuple(params[k].shape)} vs {shape}"
        for k, shape in expected.items() if k in params and tuple(params[k].shape) != shape
    )
    matched = sum(1 for k, v in params.items() if expected.get(k) == tuple(v.shape))
    return _Fit(arch, layout, model.num_classes, len(expected), matched, missing, unexpected, mismatched, state)


def _config_architecture(info: Optional[CheckpointInfo]) -> Optional[str]:
    config = (info.config if info is not None else None) or {}
    arch = config.get("architecture")
    return arch if isinstance(arch, str) and arch else None


def _detect(tensors: Mapping[str, np.ndarray], info: Optional[CheckpointInfo]) -> _Fit:
    source = info.path if info is not None else "checkpoint"
    supported = _candidates()
    named = _config_architecture(info)
    if named is not None:
        arch = split_name(named)[0]
        if arch not in supported:
            raise ConversionError(
                f"unknown network: {info.config_path} names architecture {named!r}, which is not a supported "
                f"model; candidates: {', '.join(supported)}"
            )
        fit = _fit(arch, tensors)
        if fit is None or not fit.exact:
            detail = fit.describe() if fit is not None else "no known key layout"
            raise ConversionError(f"{source}: weights do not fit {arch} named by {info.config_path}: {detail}")
        return fit
    keys = list(tensors)
    family = [(arch, layout) for arch in supported if (layout := _layout_for(arch, keys)) is not None]
    if not family:
        sample = ", ".join(keys[:4]) or "none"
        raise ConversionError(
            f"unknown network: {source}: its keys (first: {sample}) match no supported EfficientViT layout; "
            f"candidates: {', '.join(supported)}"
        )
    renamed: dict[int, tuple[KeyMap, dict, dict]] = {}  # id(layout) -> (layout, state, origin)
    for _, layout in family:
        if id(layout) not in renamed:
            renamed[id(layout)] = (layout, *_rename(tensors, layout))

    def plausible(arch: str, layout: KeyMap) -> bool:
        """Cheap pre-check: every non-classifier parameter of ``arch`` is named by the checkpoint."""
        state = renamed[id(layout)][1]
        head = _head_keys(arch)
        return all(k in state for k in _reference_shapes(arch, None) if k not in head)

    fits = [_fit(arch, tensors, renamed=renamed[id(layout)]) for arch, layout in family if plausible(arch, layout)]
    exact = [f for f in fits if f is not None and f.exact]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        names = ", ".join(f.arch for f in exact)
        raise ConversionError(f"ambiguous checkpoint {source}: it fits {names}; choose one with --model NAME")
    fits = [_fit(arch, tensors, renamed=renamed[id(layout)]) for arch, layout in family]  # for the report
    score = {id(f): f.matched / max(f.expected, len(tensors)) for f in fits}
    fits.sort(key=lambda f: score[id(f)], reverse=True)
    closest = "; ".join(f.describe() for f in fits[:2])
    # Most parameters in place: a damaged or modified checkpoint of a known model, not another network.
    prefix = "" if score[id(fits[0])] >= 0.5 else "unknown network: "
    raise ConversionError(
        f"{prefix}{source} fits no supported model exactly; closest: {closest}; "
        f"candidates: {', '.join(supported)}"
    )


def _verify(name: str, tensors: Mapping[str, np.ndarray], info: CheckpointInfo,
            num_classes: Optional[int] = None, overrides: Optional[Mapping[str, Any]] = None) -> _Fit:
    """The fit of the requested model; a one-line error if the checkpoint is not that model."""
    arch = split_name(name)[0]
    try:
        get_entry(name)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    fit = _fit(arch, tensors, num_classes, overrides)
    if fit is not None and fit.exact:
        return fit
    hint = ""
    try:
        other = _detect(tensors, None)
        if other.arch != arch:
            hint = f"; it looks like {other.arch}"
    except ConversionError:
        pass
    if fit is None:
        sample = ", ".join(list(tensors)[:4]) or "none"
        raise ConversionError(
            f"{info.path} is not a {arch} checkpoint: its keys (first: {sample}) match none of its layouts{hint}"
        )
    raise ConversionError(f"{info.path} does not fit {fit.describe()}{hint}")


def detect_model(tensors: Mapping[str, np.ndarray], info: Optional[CheckpointInfo] = None) -> str:
    """Registry name of the model a state dict belongs to, from its keys and shapes.

    ``tensors``/``info`` as returned by :func:`~mlx_evit.checkpoint.read_checkpoint`;
    timm's ``config.json`` (``info.config``) names the architecture and tag
    when present and is then only verified. Returns ``"efficientvit_b1"`` or,
    with a known tag from the config, ``"efficientvit_b1.r288_in1k"``.
    Raises :class:`ConversionError` naming the candidates when the network
    is unknown or several variants fit.
    """
    fit = _detect(tensors, info)
    tag = _config_tag(info, fit.arch)
    return f"{fit.arch}.{tag}" if tag else fit.arch


def _config_tag(info: Optional[CheckpointInfo], arch: str) -> Optional[str]:
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


# ---------------------------------------------------------------------------
# Checkpoint -> model
# ---------------------------------------------------------------------------

_PREPROCESSING_KEYS = ("input_size", "crop_pct", "interpolation", "crop_mode", "mean", "std")


def _apply_timm_config(model: nn.Module, info: CheckpointInfo, tagged: bool) -> Optional[list[str]]:
    """Take preprocessing (for a tag the registry lacks) and label names from timm's config.json."""
    config = info.config or {}
    cfg = config.get("pretrained_cfg")
    if isinstance(cfg, dict) and not tagged and model.pretrained_cfg is not None and isinstance(cfg.get("tag"), str):
        updated = dict(model.pretrained_cfg, tag=cfg["tag"], hf_hub_id=None)
        for key in _PREPROCESSING_KEYS:
            if key in cfg and isinstance(cfg[key], (list, float, int, str)):
                updated[key] = cfg[key]
        model.pretrained_cfg = updated
    labels = config.get("label_names")  # a list, or {"0": name, ...} (timm allows both)
    n = model.num_classes or 0
    if isinstance(labels, dict) and set(labels) == {str(i) for i in range(n)}:
        labels = [labels[str(i)] for i in range(n)]
    if isinstance(labels, list) and len(labels) == n and all(isinstance(s, str) for s in labels):
        return labels
    return None


def _from_checkpoint(
    path: PathLike,
    name: Optional[str] = None,
    num_classes: Optional[int] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> _Source:
    """Read a PyTorch/safetensors checkpoint and load it into a new model (float32, unfused, eval)."""
    overrides = dict(overrides or {})
    tensors, info = read_checkpoint(path)
    if info.metadata.get("format") == "mlx":
        raise ConversionError(
            f"{info.path}: MLX weights without the config.json of an MLX model directory; "
            "load the directory that save_model/convert wrote"
        )
    if log:
        log(f"read {len(tensors)} tensors ({info.format}) from {info.path}")
    fit = (_verify(name, tensors, info, num_classes, overrides) if name
           else _detect(tensors, info))
    arch, tag = split_name(name) if name else (fit.arch, None)
    tag = tag or _config_tag(info, arch)
    full_name = f"{arch}.{tag}" if tag else arch
    args = {k: v for k, v in fit.layout.defaults.items() if k not in overrides}
    args.update(overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(full_name, num_classes=fit.num_classes, **args)
        try:  # keys already renamed by the fit
            load_state_dict(model, fit.state, layout=_RENAMED, source=str(path))
        except CheckpointMismatchError:  # overrides that change shapes: report with the file's keys
            load_state_dict(model, tensors, layout=fit.layout, source=str(path))
    for w in caught:  # pass them on (create_model callers see them as usual)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    labels = _apply_timm_config(model, info, tagged=tag is not None) if info.config else None
    if model.pretrained_cfg is not None:
        model.pretrained_cfg = dict(model.pretrained_cfg, num_classes=model.num_classes)
    model.labels = labels
    model.eval()
    if log:
        log(f"model {_registry_name(arch, model.pretrained_cfg)} ({fit.layout.name} layout, "
            f"{fit.num_classes} classes)")
    return _Source(model, fit.layout.name, info, labels, tuple(str(w.message) for w in caught))


def _assign(model: nn.Module, params: dict[str, np.ndarray], source: str) -> None:
    """Load MLX-layout ``params`` into ``model`` strictly (names and shapes must match)."""
    adapt = getattr(model, "adapt_checkpoint", None)
    if adapt is not None:
        params = adapt(params)
    expected = _shapes(model)
    missing = [k for k in expected if k not in params]
    unexpected = sorted(k for k in params if k not in expected)
    mismatched = [f"{k} {tuple(params[k].shape)} vs {shape}"
                  for k, shape in expected.items() if k in params and tuple(params[k].shape) != shape]
    if missing or unexpected or mismatched:
        details = "; ".join(_mismatch_parts(missing, unexpected, mismatched))
        raise CheckpointMismatchError(
            f"{source} does not fit {model.arch_name} built from its config.json: {details}",
            missing, unexpected, mismatched,
        )
    model.update(tree_unflatten([(k, mx.array(np.ascontiguousarray(v))) for k, v in params.items()]))


def _from_model_dir(
    folder: Path,
    name: Optional[str] = None,
    num_classes: Optional[int] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> _Source:
    """Rebuild the model of an MLX model directory (unfused, in its stored dtype, eval)."""
    config_path = folder / CONFIG_NAME
    config = _read_json(config_path)
    if config.get("format") != FORMAT:
        raise ConversionError(f"{config_path}: not an mlx_evit model config (format {config.get('format')!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ConversionError(
            f"{config_path}: format_version {version!r} is not supported by this mlx_evit "
            f"(reads up to {FORMAT_VERSION}); upgrade mlx_evit"
        )
    arch, arch_args = config.get("architecture"), config.get("arch_args")
    if not isinstance(arch, str) or not isinstance(arch_args, dict):
        raise ConversionError(f"{config_path}: 'architecture' (string) and 'arch_args' (object) are required")
    try:
        get_entry(arch)
    except ValueError as e:
        raise ConversionError(f"{config_path}: {e}") from None
    if name is not None and split_name(name)[0] != arch:
        raise ConversionError(f"{folder} holds {arch}, not {split_name(name)[0]}")
    dtype = config.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConversionError(f"{config_path}: unsupported dtype {dtype!r}")
    args = _tuplify(arch_args)
    args.update(overrides or {})
    if num_classes is not None:
        args["num_classes"] = num_classes
    try:
        model = build_model(arch, **args)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{config_path}: arch_args do not build {arch}: {_one_line(str(e), 200)}") from None
    tensors, info = read_checkpoint(folder / WEIGHTS_NAME)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _assign(model, dict(tensors), str(folder / WEIGHTS_NAME))
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    cast_model(model, dtype)
    pretrained_cfg = config.get("pretrained_cfg")
    model.pretrained_cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else None
    labels = config.get("labels")
    model.labels = list(labels) if isinstance(labels, list) and all(isinstance(s, str) for s in labels) else None
    model.eval()
    return _Source(model, "mlx", info, model.labels, tuple(str(w.message) for w in caught))


def _open(path: PathLike, name: Optional[str] = None, num_classes: Optional[int] = None,
          overrides: Optional[Mapping[str, Any]] = None, log: Optional[Callable[[str], None]] = None) -> _Source:
    config = _mlx_config_path(path)
    if config is not None:
        return _from_model_dir(config.parent, name, num_classes, overrides)
    return _from_checkpoint(path, name, num_classes, overrides, log)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def load(
    path: PathLike,
    *,
    dtype: Union[str, mx.Dtype, None] = None,
    fuse: bool = True,
    model: Optional[str] = None,
) -> nn.Module:
    """A ready-to-run model (eval mode, parameters evaluated) from ``path``.

    ``path``: an MLX model directory (written by :func:`convert` or
    :func:`save_model`), any checkpoint :func:`convert` accepts, which is
    then detected and converted in memory, or a registered pretrained name
    (``"efficientvit_b1.r224_in1k"``) that is not a local path: its timm
    weights are fetched from the Hugging Face Hub and cached converted
    (:func:`mlx_evit.hub.pretrained_dir`). ``dtype``: ``"float32"``,
    ``"float16"`` or ``"bfloat16"`` (default: the directory's dtype, float32
    for checkpoints); attention cores run in float32 regardless. ``fuse``:
    fold every BatchNorm into its convolution, which makes inference faster
    and is exact up to rounding; pass ``fuse=False`` to fine-tune (the
    unfused model is trainable). ``model``: expected registry name, checked
    against the file. The model takes NHWC float32 normalized images and
    carries ``.arch_name``, ``.pretrained_cfg`` (preprocessing; dict or
    None) and ``.labels`` (class names or None).
    """
    target = parse_dtype(dtype)
    net = _open(_resolve_pretrained(path), model).model
    if target is not None:
        cast_model(net, target)
    net.eval()
    if fuse:
        net.fuse()
    mx.eval(net.parameters())
    return net


def _resolve_pretrained(path: PathLike) -> PathLike:
    """``path`` itself, or the cached Hub weights when it is a registered name and no such file exists."""
    if not isinstance(path, str) or os.path.exists(path):
        return path
    try:
        get_entry(path)
    except ValueError:
        return path  # not a model name either: the reader reports the missing file
    from .hub import pretrained_dir

    return pretrained_dir(path)


def load_into(name: str, path: PathLike, num_classes: Optional[int] = None, **overrides: Any) -> nn.Module:
    """Build ``name`` and load the checkpoint or MLX model directory at ``path`` (eval, unfused).

    Used by ``create_model(name, pretrained=path)``. Architecture defaults
    implied by the checkpoint's layout (e.g. the original MIT code's
    attention eps) apply unless overridden; ``num_classes`` defaults to the
    checkpoint's classifier width.
    """
    net = _open(path, name, num_classes, overrides).model
    mx.eval(net.parameters())
    return net


def save_model(
    model: nn.Module,
    out_dir: PathLike,
    *,
    labels: Optional[Sequence[str]] = None,
    source: Optional[Mapping[str, Any]] = None,
    force: bool = False,
) -> Path:
    """Write ``model`` as an MLX model directory (``model.safetensors`` + ``config.json``).

    ``model``: built by the registry (``create_model``/``load``), unfused
    (load with ``fuse=False`` to fine-tune and save). ``labels``: class
    names, one per output (default: ``model.labels`` if set). ``source``:
    provenance recorded in ``config.json``. The directory is written next to
    ``out_dir`` under a temporary name and renamed at the end, so a failure
    leaves nothing behind; an existing ``out_dir`` is an error unless
    ``force`` (which replaces only an empty folder or an MLX model directory).
    Returns the directory.
    """
    from . import __version__

    arch, arch_args = getattr(model, "arch_name", None), getattr(model, "arch_args", None)
    if arch is None or arch_args is None:
        raise ConversionError("save_model needs a model built by mlx_evit (create_model or load): "
                              "it has no arch_name/arch_args")
    reference = _shapes(build_model(arch, **arch_args))
    actual = _shapes(model)
    if reference != actual:
        diff = sorted(set(reference) ^ set(actual)) or [k for k in actual if reference[k] != actual[k]]
        raise ConversionError(
            f"the model's parameters differ from a fresh {arch} built with its arch_args (e.g. {diff[0]}); "
            "BatchNorms folded by fuse() cannot be saved: save the unfused model (load(..., fuse=False))"
        )
    num_classes = getattr(model, "num_classes", None)
    if labels is None:
        labels = getattr(model, "labels", None)
    if labels is not None:
        labels = list(labels)
        if not all(isinstance(s, str) for s in labels) or len(labels) != (num_classes or 0):
            raise ConversionError(f"labels must be {num_classes or 0} strings (one per class), got {len(labels)}")
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if pretrained_cfg is not None:
        pretrained_cfg = dict(pretrained_cfg, num_classes=num_classes or 0)
    arch_args = dict(arch_args)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "converter_version": __version__,
        "model": _registry_name(arch, pretrained_cfg),
        "architecture": arch,
        "arch_args": _jsonable(arch_args, "arch_args"),
        "num_classes": num_classes,
        "pretrained_cfg": _jsonable(pretrained_cfg, "pretrained_cfg"),
        "dtype": _dtype_name(model_dtype(model)),
        "attention_eps": arch_args.get("attention_eps"),
        "labels": labels,
        "source": _jsonable(dict(source), "source") if source is not None else None,
    }
    text = json.dumps(config, indent=2) + "\n"
    params = dict(tree_flatten(model.parameters()))

    def write(folder: Path) -> None:
        mx.save_safetensors(str(folder / WEIGHTS_NAME), params, metadata={"format": "mlx"})
        _write_text(folder / CONFIG_NAME, text)

    from .outputs import OutputDir

    return _write_atomically(out_dir if isinstance(out_dir, OutputDir) else Path(out_dir), write, force)


def _registry_name(arch: str, pretrained_cfg: Optional[Mapping[str, Any]]) -> str:
    """``arch.tag`` when the registry knows the model's tag, else ``arch``."""
    tag = (pretrained_cfg or {}).get("tag")
    try:
        get_entry(arch).cfg(tag) if isinstance(tag, str) else None
    except ValueError:
        return arch
    return f"{arch}.{tag}" if isinstance(tag, str) else arch


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _check_target(out: Path, force: bool, inputs: Sequence[PathLike] = ()) -> "OutputDir":
    """Refuse an existing ``out`` unless ``force`` and it is an MLX model directory (or empty), or when
    it is or holds an input; a symbolic link is followed (its target is replaced)."""
    from .outputs import OutputError, check_output_dir

    try:
        return check_output_dir(out, inputs, force, marker=lambda p: _mlx_config_path(p) is not None,
                                describe="an MLX model directory", option="", allow_empty=False)
    except OutputError as e:
        raise ConversionError(str(e)) from None


def _write_atomically(out: Union[Path, "OutputDir"], write: Callable[[Path], None], force: bool) -> Path:
    """Run ``write(tmp)`` on a fresh folder beside ``out``, then swap it in (:func:`mlx_evit.outputs.atomic_directory`)."""
    from .outputs import OutputError, atomic_directory

    target = out if not isinstance(out, Path) else _check_target(out, force)
    try:
        with atomic_directory(target) as tmp:
            write(tmp)
    except OutputError as e:
        raise ConversionError(str(e)) from None
    return Path(target.given)


def convert(
    src: PathLike,
    out_dir: PathLike,
    *,
    model: Optional[str] = None,
    dtype: str = "float32",
    force: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> ConversionResult:
    """Convert the checkpoint ``src`` into the MLX model directory ``out_dir``.

    ``src``: PyTorch zip checkpoint (``.pt``/``.pth``/``.bin``),
    ``.safetensors`` file, timm Hub-layout folder, or an MLX model directory
    (re-saved, e.g. in another dtype). ``model``: registry name to verify
    against (default: detected from keys, shapes and timm's config.json; a
    tag selects the preprocessing). ``dtype``: parameter dtype of the output
    (BatchNorm statistics stay float32). ``force``: replace an existing
    ``out_dir``. ``log``: receives progress lines. Raises
    :class:`ConversionError`, :class:`~mlx_evit.checkpoint.CheckpointError`
    or :class:`~mlx_evit.weights.CheckpointMismatchError` with a message
    naming the problem; nothing is written then.
    """
    target = parse_dtype(dtype)
    out = Path(out_dir)
    checked = _check_target(out, force, inputs=[src])  # fail before the expensive part; never over SRC
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        source = _open(src, model, log=log)
    net = source.model
    cast_model(net, target)
    info = source.info
    record = {
        "file": os.path.basename(info.path),
        "sha256": info.sha256,
        "format": "mlx" if source.layout == "mlx" else info.format,
        "layout": source.layout,
    }
    if info.wrapper:
        record["wrapper"] = info.wrapper
    if log:
        log(f"writing {out} ({_dtype_name(target)})")
    save_model(net, checked, labels=source.labels, source=record, force=force)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return ConversionResult(
        out_dir=out,
        model=_registry_name(net.arch_name, net.pretrained_cfg),
        architecture=net.arch_name,
        layout=source.layout,
        source_format=info.format,
        sha256=info.sha256,
        dtype=_dtype_name(target),
        num_classes=net.num_classes,
        num_params=_num_params(net),
        size_bytes=size,
        warnings=source.warnings,
    )


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

_PROG = "mlx-evit-convert"

_EPILOG = """\
examples:
  mlx-evit-convert efficientvit_b1.r224_in1k/ out/          # timm Hub folder
  mlx-evit-convert efficientvit_b0_r224.pt b0/ --dtype float16
  mlx-evit-convert efficientvit_m4.pth m4/ --model efficientvit_m4 --force

then, in Python:  model = mlx_evit.load("out")

exit status: 0 converted; 1 the input cannot be converted (message says why);
2 wrong command-line usage.
"""


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{n} B"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description=(
            "Convert an EfficientViT checkpoint (MIT B0-B3/L1-L3, Microsoft M0-M5; timm or\n"
            "original layout) to an MLX model directory (model.safetensors + config.json),\n"
            "without torch. The model is detected from the keys and shapes. Pickled\n"
            "checkpoints are read with a restricted unpickler: nothing in the file is run."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC",
                        help="a .pt/.pth/.bin PyTorch checkpoint, a .safetensors file, or a timm Hub folder "
                             "(model.safetensors or pytorch_model.bin, with config.json)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (must not exist unless --force)")
    parser.add_argument("--model", metavar="NAME",
                        help="registry name to check the checkpoint against, e.g. efficientvit_b1.r288_in1k "
                             "(default: detected from the keys and shapes)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="parameter dtype of the converted model (default: float32; BatchNorm "
                             "statistics and attention stay float32)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 conversion error, 2 usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return int(e.code or 0)

    def log(message: str) -> None:
        if not args.quiet:
            print(f"{_PROG}: {message}", file=sys.stderr, flush=True)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = convert(args.src, args.out_dir, model=args.model, dtype=args.dtype, force=args.force,
                             log=log)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ConversionError, CheckpointError, CheckpointMismatchError, OSError, ValueError) as e:
        print(f"{_PROG}: error: {_describe_error(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # never a traceback; say it is ours
        print(f"{_PROG}: error: unexpected {type(e).__name__} while converting {args.src}: "
              f"{_describe_error(e)} (please report this)", file=sys.stderr)
        return 1
    seen = set()
    for message in (*result.warnings, *(str(w.message) for w in caught)):
        if message not in seen:
            seen.add(message)
            print(f"{_PROG}: warning: {_one_line(message)}", file=sys.stderr)
    if not args.quiet:
        classes = "features only" if not result.num_classes else f"{result.num_classes} classes"
        print(
            f"converted {args.src} -> {result.out_dir}\n"
            f"  model:      {result.model} ({result.layout} layout, {result.source_format}, {classes})\n"
            f"  parameters: {result.num_params:,}\n"
            f"  dtype:      {result.dtype}\n"
            f"  size:       {_human_bytes(result.size_bytes)} on disk\n"
            f"  sha256:     {result.sha256} (source)"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
