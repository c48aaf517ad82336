"""Fuzz inputs: the valid seeds, byte mutations, hand-assembled pickles and zip-bomb writers of :mod:`fuzz`.

Kept apart from the case families (:mod:`fuzz_cases`) and the runner
(:mod:`fuzz`) so each stays readable; nothing here runs mlx_evit on an input.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One input: ``kind`` says which API call runs it (see :func:`run_case`)."""

    family: str
    kind: str  # read | load | convert | image | load_dir
    path: str
    note: str
    size: int = 0  # bytes of the input files (the memory bound's base)


# ------------------------------------------------------------------ seeds


def _save_zip(state: dict, path: Path) -> None:
    import torch

    torch.save(state, path)


def make_seeds(root: Path) -> dict[str, Path]:
    """The small valid inputs every family mutates (torch needed for the zip seeds)."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, Path] = {}
    base = torch.arange(48, dtype=torch.float32).view(6, 8)
    small = {
        "w": base, "w_t": base.t(), "w_slice": base[1:4, 2:6], "h": torch.linspace(-1, 1, 10).half(),
        "b": torch.linspace(-2, 2, 7).bfloat16(), "i": torch.arange(5), "flag": torch.tensor([True, False]),
    }
    seeds["small_zip"] = root / "small.pt"
    _save_zip(small, seeds["small_zip"])
    seeds["wrapped_zip"] = root / "wrapped.pth"
    _save_zip({"model": small, "epoch": 3, "args": argparse.Namespace(lr=0.1)}, seeds["wrapped_zip"])

    sys.path.insert(0, str(ROOT / "tests"))
    import synthetic

    keys = dict(synthetic.keys_file("mit_b0_cls_keys.json"))
    for k, (shape, dtype) in list(keys.items()):  # a 10-class head keeps the seed small
        if shape and shape[0] == 1000:
            keys[k] = [[10, *shape[1:]], dtype]
    b0 = {k: torch.from_numpy(v) for k, v in synthetic.state_dict(keys).items()}
    seeds["b0_zip"] = root / "b0_orig.pt"
    _save_zip({"state_dict": b0}, seeds["b0_zip"])

    from safetensors.numpy import save_file

    seeds["small_st"] = root / "small.safetensors"
    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int64),
               "c": np.zeros(3, np.float16)}, str(seeds["small_st"]), metadata={"format": "pt"})

    from mlx_evit.loading.model_dir import save_model
    from mlx_evit.models.registry import build_model

    seeds["b0_dir"] = root / "b0_dir"
    save_model(build_model("efficientvit_b0", num_classes=10), seeds["b0_dir"])
    seeds["m0_dir"] = root / "m0_dir"
    save_model(build_model("efficientvit_m0", num_classes=10), seeds["m0_dir"])

    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    for name, fmt in (("img.png", "PNG"), ("img.jpg", "JPEG"), ("img.gif", "GIF"), ("img.bmp", "BMP")):
        seeds[name] = root / name
        Image.fromarray(pixels).save(seeds[name], fmt)
    seeds["img16.png"] = root / "img16.png"
    Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)).save(seeds["img16.png"])
    return seeds


# ------------------------------------------------------------- mutations


def _mutate_bytes(data: bytes, rng: random.Random, region: Optional[tuple[int, int]] = None) -> tuple[bytes, str]:
    lo, hi = region or (0, len(data))
    hi = min(hi, len(data))
    buf = bytearray(data)
    how = rng.choice(["flip", "flip", "truncate", "duplicate", "zero", "random"])
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(lo, hi)
            buf[i] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        buf = buf[: rng.randrange(0, len(buf))]
    elif how == "duplicate":
        i = rng.randrange(lo, hi)
        n = rng.randint(1, 4096)
        buf[i:i] = buf[i : i + n]
    elif how == "zero":
        i = rng.randrange(lo, hi)
        n = rng.randint(1, 512)
        buf[i : i + n] = bytes(len(buf[i : i + n]))
    else:
        i = rng.randrange(lo, hi)
        n = rng.randint(1, 64)
        buf[i : i + n] = bytes(rng.randrange(256) for _ in range(len(buf[i : i + n])))
    return bytes(buf), how


def _zip_region(path: Path) -> tuple[int, int]:
    """Byte range of data.pkl in a torch zip (mutations there reach the pickle reader)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    return info.header_offset, info.header_offset + 30 + len(info.filename) + info.compress_size + 64


def _torch_zip(path: Path, pickle_bytes: bytes, storages: dict[str, bytes], *, compress: int = zipfile.ZIP_STORED,
               prefix: str = "archive", extra: Optional[dict[str, bytes]] = None) -> None:
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr(f"{prefix}/data.pkl", pickle_bytes)
        z.writestr(f"{prefix}/byteorder", b"little")
        for key, raw in storages.items():
            z.writestr(f"{prefix}/data/{key}", raw)
        z.writestr(f"{prefix}/version", b"3\n")
        for name, raw in (extra or {}).items():
            z.writestr(name, raw)


# Pickle assembly (protocol 2+ opcodes; protocol 0 text forms where noted).


def _p_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _p_int(i: int) -> bytes:
    if -2**31 <= i < 2**31:
        return b"J" + struct.pack("<i", i)
    raw = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _storage_pid(key: str, stype: str, numel: int) -> bytes:
    return (b"(" + _p_str("storage") + _p_global("torch", stype) + _p_str(key) + _p_str("cpu") + _p_int(numel)
            + b"tQ")


def _tensor(key: str, stype: str, numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
    tup = lambda xs: b"(" + b"".join(_p_int(x) for x in xs) + b"t"  # noqa: E731
    return (_p_global("torch._utils", "_rebuild_tensor_v2") + b"(" + _storage_pid(key, stype, numel) + _p_int(offset)
            + tup(size) + tup(stride) + b"\x89" + _p_global("collections", "OrderedDict") + b")R" + b"tR")


def _state_pickle(entries: list[tuple[str, bytes]]) -> bytes:
    body = b"".join(_p_str(k) + v + b"s" for k, v in entries)
    return b"\x80\x02" + _p_global("collections", "OrderedDict") + b")R" + body + b"."


_PAYLOAD_TARGETS = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"), ("subprocess", "call"),
    ("subprocess", "check_output"), ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
    ("builtins", "__import__"), ("__builtin__", "eval"), ("torch.storage", "_load_from_bytes"),
    ("pickle", "loads"), ("_pickle", "loads"), ("os", "popen"), ("pty", "spawn"), ("builtins", "open"),
    ("runpy", "_run_code"), ("code", "InteractiveInterpreter"), ("numpy.testing._private.utils", "runstring"),
]


def _payload_arg(target: tuple[str, str], marker: str) -> bytes:
    """The argument tuple a payload passes: every one would create ``marker`` if it ran."""
    module, name = target
    if name in ("system", "popen", "spawn"):
        return b"(" + _p_str(f"touch {marker}") + b"t"
    if module == "subprocess":
        return b"(]" + _p_str("touch") + b"a" + _p_str(marker) + b"at"
    if name in ("eval", "exec", "runstring", "_run_code"):
        return b"(" + _p_str(f"open({marker!r}, 'w').close()") + b"t"
    if name == "open":
        return b"(" + _p_str(marker) + _p_str("w") + b"t"
    if name in ("loads", "_load_from_bytes"):
        evil = b"\x80\x02" + _p_global("os", "system") + b"(" + _p_str(f"touch {marker}") + b"tR."
        return b"(B" + struct.pack("<I", len(evil)) + evil + b"t"
    if name == "__import__":
        return b"(" + _p_str("os") + b"t"
    if name == "getattr":
        return b"(" + _p_global("os", "path") + _p_str("exists") + b"t"
    return b"(" + _p_str(marker) + b"t"


def _payload_pickle(target: tuple[str, str], marker: str, style: str, rng: random.Random) -> bytes:
    """A pickle calling ``target`` in one of several spellings; as the whole stream or beside weights."""
    module, name = target
    arg = _payload_arg(target, marker)
    proto = b"\x80" + bytes([rng.choice([2, 3, 4, 5])])
    if style == "global_reduce":
        call = _p_global(module, name) + arg + b"R"
    elif style == "stack_global":
        call = b"\x8c" + bytes([len(module)]) + module.encode() + b"\x94" + b"\x8c" + bytes([len(name)]) + \
            name.encode() + b"\x94\x93" + arg + b"R"
    elif style == "stack_global_memo":  # names fetched back from the memo
        call = (b"\x8c" + bytes([len(module)]) + module.encode() + b"q\x00" + b"\x8c" + bytes([len(name)])
                + name.encode() + b"q\x01" + b"0" + b"0" + b"h\x00h\x01\x93" + arg + b"R")
    elif style == "inst":
        proto = b""
        call = b"(" + arg[1:-1] + b"i" + module.encode() + b"\n" + name.encode() + b"\n"
    elif style == "obj":
        call = b"(" + _p_global(module, name) + arg[1:-1] + b"o"
    elif style == "newobj":
        call = _p_global(module, name) + arg + b"\x81"
    elif style == "newobj_ex":
        call = _p_global(module, name) + arg + b"}" + b"\x92"
    elif style == "build":
        call = _p_global("argparse", "Namespace") + b")\x81" + b"}" + _p_str("__reduce__") + _p_global(module, name) + \
            b"sb"
    elif style == "ext1":
        call = b"\x82\x01" + arg + b"R"
    elif style == "persid":
        call = b"P" + f"{module} {name}".encode() + b"\n"
    else:  # "beside": a payload next to real weights
        call = _p_global(module, name) + arg + b"R"
    if style == "beside":
        return (proto + b"}" + _p_str("w") + _tensor("0", "FloatStorage", 4, 0, (4,), (1,)) + _p_str("extra") + call
                + b"u.")
    return proto + call + b"."



def _deflate_pieces(pieces: list[tuple[bytes, int]]) -> tuple[bytes, int]:
    """(raw deflate stream, inflated size) of ``data * reps`` for each piece, compressed once per piece:
    every piece ends in a full flush, so its compressed bytes can be repeated. Makes GiB bombs in a second."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    out, total = [], 0
    for data, reps in pieces:
        out.append((co.compress(data) + co.flush(zlib.Z_FULL_FLUSH)) * reps)
        total += len(data) * reps
    out.append(co.flush(zlib.Z_FINISH))
    return b"".join(out), total


def _write_deflated(z: zipfile.ZipFile, name: str, pieces: list[tuple[bytes, int]]) -> None:
    """Add member ``name`` holding ``pieces`` deflated (sizes in the headers patched after closing)."""
    stream, total = _deflate_pieces(pieces)
    crc = 0
    if total <= 2**28:  # a right CRC for what should otherwise be valid; bombs are refused before it matters
        for data, reps in pieces:
            for _ in range(reps):
                crc = zlib.crc32(data, crc)
    z.writestr(name, stream, compress_type=zipfile.ZIP_STORED)
    z.comment = z.comment + f"{name}={total}:{crc};".encode()  # read back by _patch_deflated


def _patch_deflated(path: Path) -> None:
    """Mark the members listed in the zip comment as deflated with their inflated sizes."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        todo = dict(item.split("=") for item in z.comment.decode().split(";") if item)
        offsets = {z.getinfo(name).header_offset: name for name in todo}
    todo = {name: tuple(int(v) for v in value.split(":")) for name, value in todo.items()}
    for offset, name in offsets.items():  # local headers
        struct.pack_into("<H", data, offset + 8, zipfile.ZIP_DEFLATED)
        struct.pack_into("<I", data, offset + 14, todo[name][1])
        struct.pack_into("<I", data, offset + 22, todo[name][0])
    i = data.find(b"PK\x01\x02")
    while i >= 0:  # central directory
        n = struct.unpack_from("<H", data, i + 28)[0]
        name = bytes(data[i + 46 : i + 46 + n]).decode()
        if name in todo:
            struct.pack_into("<H", data, i + 10, zipfile.ZIP_DEFLATED)
            struct.pack_into("<I", data, i + 16, todo[name][1])
            struct.pack_into("<I", data, i + 24, todo[name][0])
        i = data.find(b"PK\x01\x02", i + 4)
    path.write_bytes(bytes(data))


def _deflated_zeros_zip(path: Path, pickle_bytes: bytes, key: str, nbytes: int) -> None:
    """A torch zip whose storage ``key`` is ``nbytes`` (a multiple of 4 MiB) zero bytes, deflated."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", b"little")
        chunk = min(nbytes, 2**22)
        _write_deflated(z, f"archive/data/{key}", [(bytes(chunk), nbytes // chunk)])
    _patch_deflated(path)


def _patch_central_size(path: Path, member: str, size: int) -> None:
    """Set ``member``'s uncompressed size in the central directory (the size zipfile trusts)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    i = data.find(b"PK\x01\x02")
    while i >= 0:
        n = struct.unpack_from("<H", data, i + 28)[0]
        if bytes(data[i + 46 : i + 46 + n]) == name:
            struct.pack_into("<I", data, i + 24, size)
        i = data.find(b"PK\x01\x02", i + 4)
    path.write_bytes(bytes(data))


def _pickle_bomb(path: Path, n: int) -> None:
    """A torch zip whose data.pkl is ``n`` (a multiple of 4 MiB) bytes of no-op opcodes, deflated."""
    with zipfile.ZipFile(path, "w") as z:
        _write_deflated(z, "archive/data.pkl", [(b"\x80\x02", 1), (b"N0" * 2**21, n // 2**22), (b"}.", 1)])
    _patch_deflated(path)
