"""The model registry shared by all families: names, pretrained tags, preprocessing.

Names follow timm: an architecture (``efficientvit_b1``) optionally followed by
a pretrained tag (``efficientvit_b1.r288_in1k``). Each family module declares
its architectures in a module-level ``MODELS`` tuple of :class:`ModelEntry`;
the registry collects them the first time it is asked.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
from typing import Any, Optional

import mlx.nn as nn

from mlx_evit.models.metadata import set_model_info
from mlx_evit.models.specs import IMAGENET_MEAN, IMAGENET_STD, PREPROCESSING_KEYS, ModelEntry, PretrainedCfg  # noqa: F401 (re-exported)

# Family modules that contribute MODELS tables, imported on first use.
FAMILY_MODULES = ("mlx_evit.models.seed", "mlx_evit.models.mit", "mlx_evit.models.msra", "mlx_evit.models.seg_model",
                  "mlx_evit.models.sam_model")


@functools.cache
def _entries() -> dict[str, ModelEntry]:
    entries: dict[str, ModelEntry] = {}
    for module_name in FAMILY_MODULES:
        module = importlib.import_module(module_name)
        for entry in getattr(module, "MODELS", ()):
            if entry.name in entries:
                raise RuntimeError(f"model {entry.name!r} registered twice")
            entries[entry.name] = entry
    return entries


def split_name(name: str) -> tuple[str, Optional[str]]:
    """``"efficientvit_b1.r288_in1k"`` -> ``("efficientvit_b1", "r288_in1k")``."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def get_entry(name: str) -> ModelEntry:
    """Registry entry for an architecture or tagged name; unknown names list close matches."""
    arch, _ = split_name(name)
    entries = _entries()
    if arch in entries:
        return entries[arch]
    candidates = list_models(pretrained=True) + list(entries)
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} (see mlx_evit.list_models())")


def get_pretrained_cfg(name: str) -> Optional[PretrainedCfg]:
    """Preprocessing config of a tagged name (the default tag for a bare architecture)."""
    arch, tag = split_name(name)
    return get_entry(arch).cfg(tag)


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered names matching a shell-style ``pattern``.

    With ``pretrained=True``, the tagged names (``efficientvit_b1.r224_in1k``)
    instead of the architectures.
    """
    names = []
    for entry in _entries().values():
        if pretrained:
            names.extend(f"{entry.name}.{cfg.tag}" for cfg in entry.tags)
        else:
            names.append(entry.name)
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def build_model(name: str, num_classes: Optional[int] = None, **overrides: Any) -> nn.Module:
    """Build an architecture with random weights (``mlx_evit.create_model`` without weights).

    The model's :class:`~mlx_evit.models.metadata.ModelInfo` records the
    architecture, the arguments and the tag's preprocessing config.
    """
    entry = get_entry(name)
    arch, tag = split_name(name)
    cfg = entry.cfg(tag)
    args = dict(entry.defaults)
    args.update(overrides)
    if num_classes is not None:
        args["num_classes"] = num_classes
    model = entry.builder(**args)
    set_model_info(model, architecture=entry.name, args=args, pretrained_cfg=cfg.to_dict() if cfg is not None else None)
    return model


def registry_name(arch: str, pretrained_cfg: Optional[dict] = None) -> str:
    """``arch.tag`` when the registry knows the model's tag (``pretrained_cfg["tag"]``), else ``arch``."""
    tag = (pretrained_cfg or {}).get("tag")
    if not isinstance(tag, str):
        return arch
    try:
        get_entry(arch).cfg(tag)
    except ValueError:
        return arch
    return f"{arch}.{tag}"
