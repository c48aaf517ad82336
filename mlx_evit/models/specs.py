"""What a family module declares for the registry: :class:`ModelEntry` rows and :class:`PretrainedCfg` tags.

Plain data, below the family modules and the registry: a family imports
these types, the registry collects the family's ``MODELS`` table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import mlx.nn as nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PREPROCESSING_KEYS", "PretrainedCfg", "ModelEntry"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING_KEYS = ("input_size", "crop_pct", "interpolation", "crop_mode", "mean", "std")
"""The preprocessing fields of a pretrained config (timm's names)."""


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
