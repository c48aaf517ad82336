"""A foreign checkpoint (PyTorch zip, safetensors, timm Hub folder) turned into a ready MLX model.

:func:`from_checkpoint` reads the file (:mod:`mlx_evit.loading.checkpoint`), finds or
verifies the architecture (:mod:`mlx_evit.loading.identify`), and loads the detected
fit's parameters through the one strict loader
(:func:`mlx_evit.models.keymap.load_params`). timm's ``config.json`` contributes
the pretrained tag, preprocessing and class names. The result is a
:class:`Source`: an unfused float32 model in eval mode plus what
``config.json`` of a converted directory records.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import mlx.nn as nn

from mlx_evit.loading.checkpoint import CheckpointInfo, read_checkpoint
from mlx_evit.loading.identify import config_tag, detect, verify
from mlx_evit.errors import ConversionError
from mlx_evit.models.metadata import set_model_info
from mlx_evit.models.registry import PREPROCESSING_KEYS, get_entry, split_name
from mlx_evit.models.keymap import load_params

__all__ = ["Source", "from_checkpoint", "registry_name", "replay_warnings"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Source:
    """A checkpoint turned into an unfused model (eval mode), plus what goes into config.json."""

    model: nn.Module
    layout: str
    info: CheckpointInfo
    labels: Optional[list[str]] = None
    warnings: tuple[str, ...] = field(default=())


def registry_name(arch: str, pretrained_cfg: Optional[Mapping[str, Any]]) -> str:
    """``arch.tag`` when the registry knows the model's tag, else ``arch``."""
    tag = (pretrained_cfg or {}).get("tag")
    if not isinstance(tag, str):
        return arch
    try:
        get_entry(arch).cfg(tag)
    except ValueError:
        return arch
    return f"{arch}.{tag}"


def replay_warnings(caught) -> tuple[str, ...]:
    """Re-issue recorded warnings (callers see them as usual); returns their messages."""
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return tuple(str(w.message) for w in caught)


def _timm_config(model: nn.Module, info: CheckpointInfo, tagged: bool) -> Optional[list[str]]:
    """Take preprocessing (for a tag the registry lacks) and label names from timm's config.json."""
    config = info.config or {}
    cfg = config.get("pretrained_cfg")
    own = model.pretrained_cfg
    if isinstance(cfg, dict) and not tagged and own is not None and isinstance(cfg.get("tag"), str):
        updated = dict(own, tag=cfg["tag"], hf_hub_id=None)
        for key in PREPROCESSING_KEYS:
            if key in cfg and isinstance(cfg[key], (list, float, int, str)):
                updated[key] = cfg[key]
        set_model_info(model, pretrained_cfg=updated)
    labels = config.get("label_names")  # a list, or {"0": name, ...} (timm allows both)
    n = model.num_classes or 0
    if isinstance(labels, dict) and set(labels) == {str(i) for i in range(n)}:
        labels = [labels[str(i)] for i in range(n)]
    if isinstance(labels, list) and len(labels) == n and all(isinstance(s, str) for s in labels):
        return labels
    return None


def from_checkpoint(
    path: PathLike,
    name: Optional[str] = None,
    num_classes: Optional[int] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    log: Optional[Callable[[str], None]] = None,
    sha256: bool = False,
) -> Source:
    """Read a PyTorch/safetensors checkpoint and load it into a new model (float32, unfused, eval).

    ``name``: registry name to verify against (default: detected).
    ``num_classes``/``overrides``: architecture arguments (default: the
    checkpoint's classifier width, the layout's defaults). ``sha256``: hash
    the file (``source.info.sha256``; only conversion records it).
    """
    overrides = dict(overrides or {})
    tensors, info = read_checkpoint(path, sha256=sha256)
    if info.metadata.get("format") == "mlx":
        raise ConversionError(
            f"{info.path}: MLX weights without the config.json of an MLX model directory; "
            "load the directory that save_model/convert wrote"
        )
    if log:
        log(f"read {len(tensors)} tensors ({info.format}) from {info.path}")
    fit = verify(name, tensors, info, num_classes, overrides) if name else detect(tensors, info)
    arch, tag = split_name(name) if name else (fit.arch, None)
    tag = tag or config_tag(info, arch)
    model = fit.model
    cfg = get_entry(arch).cfg(tag)
    set_model_info(model, pretrained_cfg=cfg.to_dict() if cfg is not None else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for w in fit.notices:  # what adapt_checkpoint said during the fit belongs to this load
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        load_params(model, fit.params, origin=fit.origin, source=str(path), layout=fit.layout.name, adapted=True)
    messages = replay_warnings(caught)
    labels = _timm_config(model, info, tagged=tag is not None) if info.config else None
    if model.pretrained_cfg is not None:
        set_model_info(model, pretrained_cfg=dict(model.pretrained_cfg, num_classes=model.num_classes))
    set_model_info(model, labels=labels)
    model.eval()
    if log:
        log(f"model {registry_name(arch, model.pretrained_cfg)} ({fit.layout.name} layout, "
            f"{fit.num_classes} classes)")
    return Source(model, fit.layout.name, info, labels, messages)
