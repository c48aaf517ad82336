"""Tables and small helpers shared by the checkpoint readers (dtypes, limits, element counts).

Plain data below :mod:`~mlx_evit.loading.safetensors_reader`,
:mod:`~mlx_evit.loading.torch_pickle` and :mod:`~mlx_evit.loading.torch_zip`.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Optional

import numpy as np

from mlx_evit.errors import CheckpointError

# Limits on what a file may declare (far above any real checkpoint).
MAX_NDIM = 64
MAX_DIM = 2**48
MAX_EXPANDED_ELEMENTS = 2**26  # one view larger than its storage (stride 0) beyond this is refused
VIEW_BUDGET_FACTOR = 4  # all returned tensors together: at most 4x the stored bytes ...
VIEW_BUDGET_SLACK = 64 * 2**20  # ... plus this

# dtype name (torch's canonical name) -> numpy dtype of one stored element.
# bfloat16 is read as its uint16 bit pattern and widened afterwards.
NUMPY_DTYPES = {
    "float64": "f8", "float32": "f4", "float16": "f2", "bfloat16": "u2",
    "int64": "i8", "int32": "i4", "int16": "i2", "int8": "i1",
    "uint64": "u8", "uint32": "u4", "uint16": "u2", "uint8": "u1",
    "bool": "u1", "complex64": "c8", "complex128": "c16",
}


def itemsize(dtype: str) -> int:
    """Bytes of one stored element of torch dtype name ``dtype``."""
    return np.dtype(NUMPY_DTYPES[dtype]).itemsize


def returned_itemsize(dtype: str) -> int:
    """Bytes of one element as returned (bfloat16 is widened to float32)."""
    return 4 if dtype == "bfloat16" else itemsize(dtype)


def finish(values: np.ndarray, dtype: str) -> np.ndarray:
    """Native-endian array of the returned dtype (bfloat16 bits -> float32, bytes -> bool).

    Already native arrays of a kept dtype are returned as they are (a view
    stays a view); the conversions make new arrays.
    """
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    if dtype == "bool":
        return values != 0
    native = values.dtype.newbyteorder("=")
    return values if values.dtype == native else values.astype(native)


def check_regular_file(path: str) -> int:
    """Size of ``path`` if it is a regular file (links followed); a FIFO, device or socket is refused
    here, before anything opens it (opening a FIFO blocks)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise CheckpointError(f"{path}: {kind}")
    return st.st_size


def is_int(x: Any) -> bool:
    return type(x) is int


def int_tuple(x: Any) -> Optional[tuple]:
    if type(x) not in (tuple, list) or not all(is_int(v) for v in x):
        return None
    return tuple(x)


def prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out
