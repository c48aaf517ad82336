"""Reading checkpoints into ``{key: numpy array}`` without torch.

PLACEHOLDER (foundation): only ``.safetensors`` through ``mx.load``. The
hardened reader (PyTorch zip-pickle with a restricted unpickler, validated
safetensors, timm Hub folders) replaces this module's internals; the public
function keeps its signature.
"""

from __future__ import annotations

import os
from typing import Union

import mlx.core as mx
import numpy as np

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file cannot be read; the message names the file and the problem."""


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Tensors of a checkpoint as numpy arrays (bfloat16 widened to float32)."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: only .safetensors files are supported for now")
    arrays = mx.load(path)
    out = {}
    for k, v in arrays.items():
        if v.dtype == mx.bfloat16:
            v = v.astype(mx.float32)
        out[k] = np.array(v)
    return out
