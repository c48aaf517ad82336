"""The model registry shared by all families: names, pretrained tags, preprocessing.

Names follow timm: an architecture (``efficientvit_b1``) optionally followed by
a pretrained tag (``efficientvit_b1.r288_in1k``). Each family module declares
its architectures in a module-level ``MODELS`` tuple of :class:`ModelEntry`;
the registry collects them the first time it is asked.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import mlx.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Family modules that contribute MODELS tables, imported on first use.
FAMILY_MODULES = ("mlx_evit.seed", "mlx_evit.mit", "mlx_evit.msra", "mlx_evit.seg", "mlx_evit.sam")


@dataclass(frozen=True)
class PretrainedCfg:
    """Evaluation preprocessing and provenance of one pretrained tag (as in timm)."""

    tag: str
    input_size: tuple[int, int, int] = (3, 224, 224)  # (C, H, W), timm order
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    crop_mode: str = "center"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000
    hf_hub_id: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d


@dataclass(frozen=True)
class ModelEntry:
    """One architecture: its builder, default arguments and pretrained tags.

    ``builder(**args)`` returns the model; ``args`` are ``defaults`` updated
    with the caller's overrides. ``tags`` are in timm's order; the first is
    the default tag.
    """

    name: str
    family: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    tags: tuple[PretrainedCfg, ...] = ()

    def cfg(self, tag: Optional[str] = None) -> Optional[PretrainedCfg]:
        if not self.tags:
            if tag:
                raise ValueError(f"model {self.name!r} has no pretrained tags (asked for {tag!r})")
            return None
        if tag is None:
            return self.tags[0]
        for cfg in self.tags:
            if cfg.tag == tag:
                return cfg
        known = ", ".join(f"{self.name}.{c.tag}" for c in self.tags)
        raise ValueError(f"unknown pretrained tag {tag!r} for {self.name}; known: {known}")


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
    import fnmatch

    names = []
    for entry in _entries().values():
        if pretrained:
            names.extend(f"{entry.name}.{cfg.tag}" for cfg in entry.tags)
        else:
            names.append(entry.name)
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def build_model(name: str, num_classes: Optional[int] = None, **overrides: Any) -> nn.Module:
    """Build an architecture with random weights (see :func:`create_model`)."""
    entry = get_entry(name)
    arch, tag = split_name(name)
    cfg = entry.cfg(tag)
    args = dict(entry.defaults)
    args.update(overrides)
    if num_classes is not None:
        args["num_classes"] = num_classes
    model = entry.builder(**args)
    model.arch_name = entry.name
    model.arch_args = args
    model.pretrained_cfg = cfg.to_dict() if cfg is not None else None
    return model


def create_model(
    name: str,
    num_classes: Optional[int] = None,
    pretrained: Optional[str] = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally loading a checkpoint file.

    ``name``: architecture or tagged name (``efficientvit_b1.r288_in1k``; the
    tag selects ``model.pretrained_cfg``, the preprocessing). ``num_classes``
    and ``overrides`` change the architecture arguments. ``pretrained``: path
    of a checkpoint in any supported layout (MLX directory, timm
    safetensors, PyTorch pickle); the model is returned in eval mode, taking
    NHWC float32 normalized images and returning logits.
    """
    if pretrained is None:
        return build_model(name, num_classes=num_classes, **overrides)
    from .convert import load_into  # checkpoints need the reader; imported lazily

    return load_into(name, pretrained, num_classes=num_classes, **overrides)
