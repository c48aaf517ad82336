"""Checkpoint conversion and loading (library side of ``mlx-evit-convert``).

PLACEHOLDER (foundation): :func:`load_into` only. The converter issue adds
family/variant detection, ``convert()``, ``load()`` and the CLI.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.nn as nn

from .checkpoint import read_state_dict
from .registry import build_model
from .weights import load_state_dict, select_layout


def load_into(name: str, path, num_classes: Optional[int] = None, **overrides: Any) -> nn.Module:
    """Build ``name`` and load the checkpoint at ``path`` into it (eval mode).

    Architecture defaults implied by the checkpoint's layout (e.g. the
    original MIT code's attention eps) apply unless overridden.
    """
    state = read_state_dict(path)
    model = build_model(name, num_classes=num_classes, **overrides)
    layout = select_layout(state.keys(), model.checkpoint_layouts)
    implied = {k: v for k, v in layout.defaults.items() if k not in overrides}
    if implied:
        model = build_model(name, num_classes=num_classes, **implied, **overrides)
    load_state_dict(model, state, layout=layout, source=str(path))
    model.eval()
    return model
