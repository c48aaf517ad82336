"""What a model is, kept outside MLX's parameter tree: one frozen :class:`ModelInfo` per model.

MLX stores every ``dict``/``list``/``tuple`` attribute of a module in the
module itself, so metadata set as plain attributes would show up in
``model.keys()``, ``model.parameters()`` walks and ``model.update``. Models
built by the registry inherit :class:`Described`, which keeps one frozen
:class:`ModelInfo` as an ordinary attribute and exposes its fields under the
documented names: ``model.arch_name``, ``model.arch_args``,
``model.pretrained_cfg`` (a dict, the preprocessing), ``model.labels`` and
``model.feature_info``. Reading one returns a copy; assigning one replaces
the frozen object.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

__all__ = ["ModelInfo", "Described", "model_info", "set_model_info"]


@dataclass(frozen=True)
class ModelInfo:
    """Architecture name, its build arguments, preprocessing config, class names and feature maps.

    ``pretrained_cfg``: timm-style preprocessing dict (``input_size``,
    ``crop_pct``, ``mean``, ...) or None; ``labels``: one class name per
    output or None; ``feature_info``: per feature map ``{"num_chs",
    "reduction"}`` (timm's), or None.
    """

    architecture: Optional[str] = None
    args: Optional[Mapping[str, Any]] = None
    pretrained_cfg: Optional[Mapping[str, Any]] = None
    labels: Optional[tuple[str, ...]] = None
    feature_info: Optional[tuple[Mapping[str, Any], ...]] = None

    def replace(self, **changes: Any) -> "ModelInfo":
        return dataclasses.replace(self, **{k: _freeze(k, v) for k, v in changes.items()})


# attribute name on the model -> ModelInfo field
_ATTRIBUTES = {
    "arch_name": "architecture",
    "arch_args": "args",
    "pretrained_cfg": "pretrained_cfg",
    "labels": "labels",
    "feature_info": "feature_info",
}


def _freeze(field: str, value: Any) -> Any:
    if value is None or field == "architecture":
        return value
    if field in ("args", "pretrained_cfg"):
        return copy.deepcopy(dict(value))
    if field == "labels":
        return tuple(value)
    return tuple(copy.deepcopy(dict(v)) for v in value)  # feature_info


def _thaw(field: str, value: Any) -> Any:
    if value is None or field == "architecture":
        return value
    if field == "labels":
        return list(value)
    if field == "feature_info":
        return [copy.deepcopy(dict(v)) for v in value]
    return copy.deepcopy(dict(value))


def _info_property(attribute: str, field: str) -> property:
    def get(self) -> Any:
        return _thaw(field, getattr(self._model_info, field))

    return property(get, doc=f"``{attribute}``: a copy of ``model.info.{field}``")


class Described:
    """Mixin for a model's root module (before ``nn.Module`` in the bases): metadata outside the tree."""

    _model_info: ModelInfo = ModelInfo()
    PLAIN_ATTRIBUTES: tuple[str, ...] = ()
    """Tuple-valued settings of the subclass kept as plain attributes (out of MLX's tree)."""

    @property
    def info(self) -> ModelInfo:
        """The model's frozen :class:`ModelInfo`."""
        return self._model_info

    def __setattr__(self, key: str, value: Any) -> None:
        field = _ATTRIBUTES.get(key)
        if field is not None:
            object.__setattr__(self, "_model_info", self._model_info.replace(**{field: value}))
        elif key == "_model_info" or key in self.PLAIN_ATTRIBUTES:
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    arch_name = _info_property("arch_name", "architecture")
    arch_args = _info_property("arch_args", "args")
    pretrained_cfg = _info_property("pretrained_cfg", "pretrained_cfg")
    labels = _info_property("labels", "labels")
    feature_info = _info_property("feature_info", "feature_info")


def model_info(model: Any) -> ModelInfo:
    """The :class:`ModelInfo` of any model (read from plain attributes for a module without :class:`Described`)."""
    if isinstance(model, Described):
        return model.info
    return ModelInfo().replace(**{f: getattr(model, a, None) for a, f in _ATTRIBUTES.items()})


def set_model_info(model: Any, **fields: Any) -> None:
    """Update metadata fields (``architecture=``, ``args=``, ``pretrained_cfg=``, ``labels=``, ``feature_info=``)."""
    if isinstance(model, Described):
        object.__setattr__(model, "_model_info", model.info.replace(**fields))
        return
    names = {f: a for a, f in _ATTRIBUTES.items()}
    for field, value in fields.items():
        setattr(model, names[field], value)
