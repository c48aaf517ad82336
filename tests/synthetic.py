"""Deterministic synthetic checkpoints and inputs, as defined by the fixtures' README (section 1).

Each tensor is a pure function of its state-dict key and shape, so a checkpoint is rebuilt from a
key list ``{key: [shape, dtype]}``; the reference outputs in ``tests/data/fixtures`` were computed by
the upstream code on exactly these tensors. ``test_synthetic.py`` checks this implementation
against the README's checksum table (``checksums.json``).
"""
from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "data" / "fixtures"
IMAGES = Path(__file__).resolve().parent / "data" / "images"

_EMBEDDINGS = re.compile(r"(point_embeddings\.\d+|not_a_point_embed|no_mask_embed|iou_token|mask_tokens)\.weight$")
_RESIDUAL_END_NORMS = re.compile(r"\.(dw0\.m|dw1\.m|pw2|proj\.1)\.bn\.weight$")

# role -> (offset, scale); a scale of None is derived from the shape (fan-in)
_AFFINE = {
    "var": (1.0, 0.5), "mean": (0.0, 0.1), "pe": (0.0, 1.7), "attn_bias": (0.0, 0.5),
    "bias": (0.0, 0.1), "embed": (0.0, 0.5), "res_norm_w": (0.2, 0.05), "norm_w": (1.0, 0.25),
    "conv_t": (0.0, None), "w": (0.0, None),
}


def words(key: str, n: int) -> np.ndarray:
    """n raw uint64 outputs of PCG64 seeded (through SeedSequence) with crc32(key)."""
    return np.random.PCG64(zlib.crc32(key.encode("utf-8"))).random_raw(n)


def role_of(key: str, shape: Sequence[int]) -> str:
    """The generator role of a key (first matching rule of the README's table)."""
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {"num_batches_tracked": "count", "attention_bias_idxs": "bias_idxs", "running_var": "var",
               "running_mean": "mean", "positional_encoding_gaussian_matrix": "pe",
               "attention_biases": "attn_bias", "bias": "bias"}
    if leaf in by_leaf:
        return by_leaf[leaf]
    if _EMBEDDINGS.search(key):
        return "embed"
    if len(shape) == 1 and _RESIDUAL_END_NORMS.search(key):
        return "res_norm_w"
    if leaf == "weight" and len(shape) == 1:
        return "norm_w"
    if leaf == "weight" and len(shape) == 4 and ".output_upscaling." in "." + key:
        return "conv_t"
    if leaf == "weight" and len(shape) >= 2:
        return "w"
    raise ValueError(f"no synthetic rule for {key} {tuple(shape)}")


def tensor(key: str, shape: Sequence[int]) -> np.ndarray:
    """The synthetic value of one state-dict entry (float32, or int64 for the two buffer roles)."""
    shape = tuple(int(s) for s in shape)
    role = role_of(key, shape)
    if role == "count":
        return np.zeros(shape, np.int64)
    if role == "bias_idxs":
        side = math.isqrt(shape[0])
        y, x = np.divmod(np.arange(shape[0]), side)
        return (np.abs(y[:, None] - y) * side + np.abs(x[:, None] - x)).astype(np.int64)
    n = math.prod(shape)
    u = ((words(key, n) >> np.uint64(60)).astype(np.float64) - 7.5) / 7.5
    offset, scale = _AFFINE[role]
    if role == "w":
        scale = math.sqrt(3.0 / math.prod(shape[1:]))
    elif role == "conv_t":
        scale = math.sqrt(3.0 / shape[0])
    return (offset + scale * u).astype(np.float32).reshape(shape)


def state_dict(keys: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
    """{key: [shape, dtype]} -> {key: array}, in the keys' order; the stated dtype is checked."""
    out = {}
    for key, (shape, dtype) in keys.items():
        value = tensor(key, shape)
        if np.dtype(dtype.replace("torch.", "")) != value.dtype:
            raise ValueError(f"{key}: keys file says {dtype}, generator gives {value.dtype}")
        out[key] = value
    return out


def keys_file(name: str) -> dict:
    """A fixture key list: ``mit_b0_cls_keys.json``-style files, or a variant of shapes_all.json.gz."""
    if name.endswith(".json"):
        data = json.loads((FIXTURES / name).read_text())
        return data.get("state_dict", data) if isinstance(data.get("state_dict"), dict) else data
    return all_shapes()[name]


def all_shapes() -> dict[str, dict]:
    """{upstream variant name: {key: [shape, dtype]}} for the 11 seg and 5 SAM zoo variants."""
    with gzip.open(FIXTURES / "shapes_all.json.gz", "rt") as f:
        return json.load(f)


def synthetic_normal(key: str, shape: Sequence[int]) -> np.ndarray:
    """Approximately N(0, 1) float32 (sum of 12 20-bit uniforms), exact on every platform."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    uniforms = (words(key, 12 * n) >> np.uint64(44)).astype(np.int64).reshape(n, 12)
    k = 2 * uniforms.sum(axis=1) - 12 * (2**20 - 1)
    return (k.astype(np.float32) * np.float32(2.0**-21)).reshape(shape)


def synthetic_image(key: str, h: int, w: int) -> np.ndarray:
    """uint8 (h, w, 3): 16 noise levels times 8 plus a diagonal ramp (0..240)."""
    noise = (words(key, h * w * 3) >> np.uint64(60)).astype(np.int64).reshape(h, w, 3)
    ramp_y = (60 * np.arange(h)) // max(h - 1, 1)
    ramp_x = (60 * np.arange(w)) // max(w - 1, 1)
    return (8 * noise + ramp_y[:, None, None] + ramp_x[None, :, None]).astype(np.uint8)


def crc32(a: np.ndarray) -> int:
    """zlib CRC-32 of an array's little-endian C-order bytes (the fixtures' input checksums)."""
    a = np.ascontiguousarray(a)
    return zlib.crc32(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def fixture(name: str) -> dict[str, np.ndarray]:
    """The reference arrays of one fixture npz (``seg_b0_city_128x128`` etc.)."""
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW reference layout -> NHWC."""
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))
