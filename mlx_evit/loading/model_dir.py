"""The MLX model directory format: writing (:func:`save_model`) and reading its config (:func:`read_config`).

A directory holds two files (documented in ``convert/README.md``):

* ``model.safetensors``: every model parameter by its MLX path, BatchNorms
  not folded (so the model can be fine-tuned), safetensors metadata
  ``{"format": "mlx"}``;
* ``config.json``: ``{"format": "mlx_evit", "format_version": 1,
  "architecture", "arch_args", "model", "pretrained_cfg", "dtype", ...}``,
  enough to rebuild the model without the source checkpoint.

Directories are written through :mod:`mlx_evit.outputs` (checked before
any long work, built beside the target and swapped in whole).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_evit.loading.arch_schema import check_model_config
from mlx_evit.errors import ConversionError, one_line
from mlx_evit.models.keymap import param_shapes
from mlx_evit.models.registry import build_model, get_entry, registry_name
from mlx_evit.ops.dtypes import DTYPES, dtype_name, model_dtype
from mlx_evit.outputs import OutputDir, OutputError, atomic_directory, check_output_dir
from mlx_evit.version import __version__

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "is_model_dir",
    "mlx_config_path",
    "check_target",
    "save_model",
    "ModelDirConfig",
    "read_config",
]

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mlx_evit"
FORMAT_VERSION = 1
_MAX_CONFIG_BYTES = 16 * 2**20


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
        if path.exists() and not path.is_file():  # a FIFO would block in read_bytes
            raise ConversionError(f"{path}: not a regular file")
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ConversionError(f"{path}: larger than {_MAX_CONFIG_BYTES} bytes, not a model config")
        config = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConversionError(f"{path}: not valid JSON ({one_line(e, 200)})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def mlx_config_path(path: PathLike) -> Optional[Path]:
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
    return p.is_dir() and (p / WEIGHTS_NAME).is_file() and mlx_config_path(p) is not None


def check_target(out: PathLike, force: bool, inputs: Sequence[PathLike] = ()) -> OutputDir:
    """The checked output directory: an existing ``out`` is refused unless ``force`` and it is an MLX
    model directory (or empty), or when it is or holds an input; a symbolic link is followed."""
    try:
        return check_output_dir(out, inputs, force, marker=lambda p: mlx_config_path(p) is not None,
                                describe="an MLX model directory", option="", allow_empty=False)
    except OutputError as e:
        raise ConversionError(str(e)) from None


def save_model(
    model: nn.Module,
    out_dir: Union[PathLike, OutputDir],
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
    arch, arch_args = getattr(model, "arch_name", None), getattr(model, "arch_args", None)
    if arch is None or arch_args is None:
        raise ConversionError("save_model needs a model built by mlx_evit (create_model or load): "
                              "it has no arch_name/arch_args")
    reference = param_shapes(build_model(arch, **arch_args))
    actual = param_shapes(model)
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
        "model": registry_name(arch, pretrained_cfg),
        "architecture": arch,
        "arch_args": _jsonable(arch_args, "arch_args"),
        "num_classes": num_classes,
        "pretrained_cfg": _jsonable(pretrained_cfg, "pretrained_cfg"),
        "dtype": dtype_name(model_dtype(model)),
        "attention_eps": arch_args.get("attention_eps"),
        "labels": labels,
        "source": _jsonable(dict(source), "source") if source is not None else None,
    }
    text = json.dumps(config, indent=2) + "\n"
    params = dict(tree_flatten(model.parameters()))
    target = out_dir if isinstance(out_dir, OutputDir) else check_target(out_dir, force)
    try:
        with atomic_directory(target) as tmp:
            mx.save_safetensors(str(tmp / WEIGHTS_NAME), params, metadata={"format": "mlx"})
            (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
    except OutputError as e:
        raise ConversionError(str(e)) from None
    return Path(target.given)


@dataclass(frozen=True)
class ModelDirConfig:
    """A model folder's ``config.json``, validated: what to build and what to attach to the model."""

    path: Path
    architecture: str
    arch_args: Mapping[str, Any]
    dtype: str
    pretrained_cfg: Optional[dict]
    labels: Optional[list[str]]


def read_config(config_path: PathLike) -> ModelDirConfig:
    """Read and check an MLX model folder's ``config.json`` (nothing is built here).

    One-line :class:`ConversionError` naming the file (and key) for a
    config that is not ours, of a newer format, or names an unknown
    architecture or dtype.
    """
    config_path = Path(config_path)
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
    check_model_config(config_path, config, config_path.parent / WEIGHTS_NAME)  # before anything is built
    dtype = config.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConversionError(f"{config_path}: unsupported dtype {dtype!r}")
    pretrained_cfg = config.get("pretrained_cfg")
    labels = config.get("labels")
    return ModelDirConfig(
        path=config_path,
        architecture=arch,
        arch_args=_tuplify(arch_args),
        dtype=dtype,
        pretrained_cfg=pretrained_cfg if isinstance(pretrained_cfg, dict) else None,
        labels=list(labels) if isinstance(labels, list) and all(isinstance(s, str) for s in labels) else None,
    )
