"""Parameter dtypes: the names accepted everywhere (``--dtype``), casting and measuring a model's dtype.

BatchNorm statistics stay float32 whatever the model dtype: float16 cannot
hold variances above 65504 and flushes the tiny ones of the L series (eps
1e-7) to subnormals; they are folded in float32 by ``fuse()``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_evit.errors import ConversionError

__all__ = ["DTYPES", "DTYPE_NAMES", "FLOAT32_LEAVES", "parse_dtype", "dtype_name", "cast_model", "model_dtype"]

DTYPES: Mapping[str, mx.Dtype] = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
"""Parameter dtypes a model may have (``--dtype``)."""
DTYPE_NAMES = tuple(DTYPES)

FLOAT32_LEAVES = ("running_mean", "running_var")


def parse_dtype(dtype: Union[str, mx.Dtype, None]) -> Optional[mx.Dtype]:
    """``"float32"``/``"float16"``/``"bfloat16"`` (or the ``mx`` dtype) -> ``mx.Dtype``; ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, mx.Dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConversionError(f"unsupported dtype {dtype!r}: dtype must be one of {', '.join(DTYPES)}")


def dtype_name(dtype: mx.Dtype) -> str:
    """``mx.float16`` -> ``"float16"``."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).rpartition(".")[2]


def cast_model(model: nn.Module, dtype: Union[str, mx.Dtype]) -> nn.Module:
    """Cast floating parameters to ``dtype`` in place (BatchNorm running statistics stay float32)."""
    target = parse_dtype(dtype)
    updates = []
    for path, value in tree_flatten(model.parameters()):
        if not mx.issubdtype(value.dtype, mx.floating):
            continue
        want = mx.float32 if path.rpartition(".")[2] in FLOAT32_LEAVES else target
        if value.dtype != want:
            updates.append((path, value.astype(want)))
    if updates:
        model.update(tree_unflatten(updates))
    return model


def model_dtype(model: nn.Module) -> mx.Dtype:
    """Dtype of most floating parameter elements (BatchNorm statistics not counted; float32 if none)."""
    counts: dict[mx.Dtype, int] = {}
    for path, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating) and path.rpartition(".")[2] not in FLOAT32_LEAVES:
            counts[value.dtype] = counts.get(value.dtype, 0) + value.size
    return max(counts, key=counts.get) if counts else mx.float32
