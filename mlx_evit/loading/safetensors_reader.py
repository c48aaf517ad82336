"""Reading a safetensors file into ``{key: numpy array}``, the header validated before any tensor.

Format: an 8-byte little-endian header length, a JSON header, then the raw
tensor bytes. The header is validated completely (its length, dtypes,
shapes against byte counts, offsets inside the data section, tensors
neither overlapping nor leaving gaps) before any tensor is read, so memory
is bounded by the file's own data section plus the header (at most
:data:`MAX_HEADER` bytes, far above a real model's).
"""

from __future__ import annotations

import json

import numpy as np

from mlx_evit.errors import CheckpointError, one_line, short_name
from mlx_evit.loading.tensor_formats import MAX_DIM, MAX_NDIM, NUMPY_DTYPES, check_regular_file, finish, is_int, prod

__all__ = ["read_safetensors", "SAFETENSORS_DTYPES", "MAX_HEADER"]

MAX_HEADER = 16 * 2**20
"""Largest accepted JSON header (about 150 000 tensors; the format itself allows 100 MiB)."""

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "C64": "complex64",
}


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """(tensors, source dtypes, __metadata__) of a safetensors file, validated first."""
    size = check_regular_file(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER:
            raise CheckpointError(f"{path}: safetensors header length {n} is over the {MAX_HEADER >> 20} MiB limit")
        if n > size - 8:
            raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file size ({size} bytes)")
        raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({one_line(e, 120)})") from None
        del raw
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is not a JSON object")
        data_start = 8 + n
        data_len = size - data_start
        metadata = header.pop("__metadata__", None) or {}  # MLX writes null when there is none
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
        entries = _entries(path, header, data_len)
        tensors, dtypes = {}, {}
        for begin, end, name, dtype, shape in entries:
            buf = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{path}: tensor {short_name(name)} is truncated")
            storage = np.frombuffer(buf, dtype=np.dtype(NUMPY_DTYPES[dtype]).newbyteorder("<"))
            tensors[name] = finish(storage.reshape(shape), dtype)
            dtypes[name] = dtype
    order = list(header)  # keep the header's key order
    return {k: tensors[k] for k in order}, {k: dtypes[k] for k in order}, dict(metadata)


def _entries(path: str, header: dict, data_len: int) -> list[tuple]:
    """Validated ``(begin, end, name, dtype name, shape)`` of every tensor, sorted by offset."""
    entries = []
    for name, spec in header.items():
        where = f"{path}: tensor {short_name(name)}"
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        code = spec["dtype"]
        if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: dtype {short_name(code)} is not supported (no numpy equivalent)")
        dtype = SAFETENSORS_DTYPES[code]
        shape = spec["shape"]
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
            raise CheckpointError(f"{where}: shape {short_name(shape)} is not a list of non-negative integers")
        offsets = spec["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets {short_name(offsets)} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}] outside the data section ({data_len} bytes)"
            )
        nbytes = prod(shape) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{where}: data_offsets span {end - begin} bytes but {code} {shape} needs {nbytes}")
        entries.append((begin, end, name, dtype, tuple(shape)))

    entries.sort(key=lambda e: (e[0], e[1]))
    expected, previous = 0, None
    for begin, end, name, _, _ in entries:
        if begin < expected:
            raise CheckpointError(
                f"{path}: tensors {short_name(previous)} and {short_name(name)} overlap in the data section"
            )
        if begin > expected:
            raise CheckpointError(f"{path}: {begin - expected} unaccounted bytes before tensor {short_name(name)}")
        expected, previous = end, name
    if expected != data_len:
        raise CheckpointError(f"{path}: {data_len - expected} bytes after the last tensor are unaccounted for")
    return entries


def _no_duplicates(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {short_name(key)}")
        seen[key] = value
    return seen
