"""Fuzz campaign: hostile and broken inputs through mlx_evit's public API, each case bounded and judged.

Cases are generated from small valid seeds (a torch zip state dict, a timm-layout
EfficientViT-B0 checkpoint, safetensors files, an MLX model folder, images) by
families: byte mutations (bit flips, truncation, chunk duplication, zeroed
ranges), zip-level attacks (bombs, size lies, unsupported methods/versions,
corrupt deflate/lzma/bz2 streams, odd names), hand-written pickles (code
execution payloads through GLOBAL, STACK_GLOBAL with memo tricks, INST, OBJ,
NEWOBJ(_EX), REDUCE, BUILD, EXT1, PERSID, protocols 0-5; aliasing and stride-0
views), broken safetensors, hostile model folders and odd images (extreme
aspect ratios, declared sizes, FIFOs).

Each case runs in a long-lived worker process; the parent judges it:

* **code executed**: a payload's side effect (a marker file) or an audit event
  (``os.system``, ``subprocess.Popen``, ``os.exec``, ``os.posix_spawn``) seen;
* **crash**: the worker died; **timeout**: over ``--timeout`` seconds;
* **memory**: the worker's peak RSS during the case (``VmHWM`` reset per case
  through ``/proc/self/clear_refs``) grew by more than the case's bound:
  ``4 x`` the bytes of the input files (an upper bound on their largest real
  tensor: stored bytes, or inflated within the readers' limits for the small
  compressed seeds used here) ``+ 384 MiB`` (imports warm; a model build);
* **foreign error**: an exception not raised by mlx_evit's own types
  (``mlx_evit.*`` classes), a message over 1000 characters or on several
  lines, or one not naming the input (path or file name).

Run the whole campaign::

    python -m tests.fuzz --cases 2000

It prints a summary (cases, accepted, clean errors, code executed, crashes,
timeouts, peak memory over bound, foreign errors) and exits non-zero on any
failure. ``tests/test_fuzz.py`` runs a few hundred cases in CI.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MEMORY_SLACK = 384 * 2**20
MEMORY_FACTOR = 4
HARD_MEMORY = 3 * 2**30  # the parent kills a worker beyond this (a case over its bound anyway)


@dataclass
class Case:
    """One input: ``kind`` says which API call runs it (see :func:`run_case`)."""

    family: str
    kind: str  # read | load | convert | image | load_dir
    path: str
    note: str
    size: int = 0  # bytes of the input files (the memory bound's base)


@dataclass
class Result:
    case: Case
    outcome: str  # accepted | clean | foreign | crash | timeout | memory | executed
    detail: str = ""
    seconds: float = 0.0
    peak: int = 0
    bound: int = 0


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


# ---------------------------------------------------------------- families


class Generator:
    """Writes the input files of each case under ``work``; ``marker_dir`` collects payload side effects."""

    def __init__(self, seeds: dict[str, Path], work: Path, marker_dir: Path, rng: random.Random):
        self.seeds, self.work, self.marker_dir, self.rng = seeds, work, marker_dir, rng
        self.count = 0

    def _path(self, suffix: str) -> Path:
        self.count += 1
        return self.work / f"case{self.count:05d}{suffix}"

    def _marker(self) -> str:
        return str(self.marker_dir / f"m{self.count:05d}")

    def _size(self, path: Path) -> int:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        return path.stat().st_size if path.is_file() else 0

    def _case(self, family: str, kind: str, path: Path, note: str) -> Case:
        return Case(family, kind, str(path), note, self._size(path))

    # -- byte mutations of checkpoints

    def bytes_case(self) -> Case:
        rng = self.rng
        seed = rng.choice(["small_zip", "wrapped_zip", "small_st", "b0_zip", "b0_zip"])
        src = self.seeds[seed]
        data = src.read_bytes()
        region = _zip_region(src) if seed == "b0_zip" else None
        mutated, how = _mutate_bytes(data, rng, region)
        path = self._path(src.suffix)
        path.write_bytes(mutated)
        kind = "load" if seed == "b0_zip" else rng.choice(["read", "load"])
        return self._case("bytes", kind, path, f"{seed} {how}")

    # -- zip-level attacks

    def zip_case(self) -> Case:
        rng = self.rng
        path = self._path(".pt")
        attack = rng.choice([
            "pickle_bomb", "storage_bomb", "size_lie", "method", "version", "encrypted", "corrupt_deflate",
            "corrupt_lzma", "corrupt_bz2", "names", "aliases", "stride0", "no_pkl", "torchscript", "byteorder",
            "cd_truncated", "huge_numel", "long_key", "nested",
        ])
        w = _tensor("0", "FloatStorage", 4, 0, (4,), (1,))
        ok_pickle = _state_pickle([("w", w)])
        ok_storage = {"0": np.arange(4, dtype="<f4").tobytes()}
        if attack == "pickle_bomb":
            _pickle_bomb(path, rng.choice([8, 12, 40, 200, 1000]) * 2**20)
        elif attack == "storage_bomb":
            numel = rng.choice([2**22, 2**26, 2**28, 2**30 - 2**20])
            pkl = _state_pickle([("w", _tensor("0", "FloatStorage", numel, 0, (numel,), (1,)))])
            _deflated_zeros_zip(path, pkl, "0", numel * 4)
        elif attack == "size_lie":
            _torch_zip(path, ok_pickle, {"0": bytes(2**20)}, compress=zipfile.ZIP_DEFLATED)
            data = bytearray(path.read_bytes())
            # central directory: set data/0's uncompressed size to 16 bytes
            i = data.find(b"PK\x01\x02" , data.find(b"archive/data/0") - 100)
            while i >= 0 and b"archive/data/0" not in data[i + 46 : i + 46 + 20]:
                i = data.find(b"PK\x01\x02", i + 4)
            if i >= 0:
                struct.pack_into("<I", data, i + 24, 16)
            path.write_bytes(bytes(data))
        elif attack in ("method", "version", "encrypted"):
            _torch_zip(path, ok_pickle, ok_storage)
            data = bytearray(path.read_bytes())
            for sig, off in ((b"PK\x03\x04", 0), (b"PK\x01\x02", 2)):
                i = data.find(sig)
                while i >= 0:
                    if attack == "method":
                        struct.pack_into("<H", data, i + 8 + off, rng.choice([1, 6, 9, 97, 99]))
                    elif attack == "version":
                        struct.pack_into("<H", data, i + 4 + off, 90)
                    else:
                        flags = struct.unpack_from("<H", data, i + 6 + off)[0]
                        struct.pack_into("<H", data, i + 6 + off, flags | 1)
                    i = data.find(sig, i + 4)
            path.write_bytes(bytes(data))
        elif attack.startswith("corrupt_"):
            method = {"corrupt_deflate": zipfile.ZIP_DEFLATED, "corrupt_lzma": zipfile.ZIP_LZMA,
                      "corrupt_bz2": zipfile.ZIP_BZIP2}[attack]
            _torch_zip(path, ok_pickle, {"0": np.arange(4096, dtype="<f4").tobytes()}, compress=method)
            data = bytearray(path.read_bytes())
            with zipfile.ZipFile(path) as z:
                info = z.getinfo(rng.choice(["archive/data.pkl", "archive/data/0"]))
            start = info.header_offset + 30 + len(info.filename)
            for _ in range(rng.randint(1, 6)):
                data[start + rng.randrange(max(1, info.compress_size))] ^= 0xFF
            path.write_bytes(bytes(data))
        elif attack == "names":
            name = rng.choice(["../evil", "/abs/data.pkl", "a\\b", "archive/\ndata", "C:/x", "archive/../../x",
                               "archive/data.pkl"])
            _torch_zip(path, ok_pickle, ok_storage, extra={name: b"x"})
        elif attack == "aliases":
            numel = 4 * 2**20  # 16 MiB, deflated to a few KB
            views = [(f"k{i}", _tensor("0", "FloatStorage", numel, 0, (numel,), (1,))) for i in range(1000)]
            _torch_zip(path, _state_pickle(views), {"0": bytes(numel * 4)}, compress=zipfile.ZIP_DEFLATED)
        elif attack == "stride0":
            views = [(f"s{i}", _tensor("0", "DoubleStorage", 1, 0, (2**26,), (0,))) for i in range(12)]
            _torch_zip(path, _state_pickle(views), {"0": bytes(8)})
        elif attack == "no_pkl":
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("archive/data/0", b"1234")
        elif attack == "torchscript":
            _torch_zip(path, ok_pickle, ok_storage, extra={"archive/code/x.py": b"x", "archive/constants.pkl": b"."})
        elif attack == "byteorder":
            _torch_zip(path, ok_pickle, ok_storage, extra={})
            data = path.read_bytes().replace(b"little", rng.choice([b"middle", b"big\x00\x00\x00", b"LITTLE"]))
            path.write_bytes(data)
        elif attack == "cd_truncated":
            _torch_zip(path, ok_pickle, ok_storage)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) - rng.randint(1, 60)])
        elif attack == "huge_numel":
            pkl = _state_pickle([("w", _tensor("0", "FloatStorage", 2**62, 0, (4,), (1,)))])
            _torch_zip(path, pkl, ok_storage)
        elif attack == "long_key":
            key = rng.choice(["x" * 20_000_000, "a\nb\rc\x00d", "\u202eevil"])
            _torch_zip(path, _state_pickle([(key, w)]), ok_storage)
        else:  # nested: deep list in the pickle
            depth = rng.choice([1000, 5000, 100000])
            body = b"\x80\x02}" + _p_str("w") + b"]" * depth + b"a" * (depth - 1) + b"s."
            _torch_zip(path, body, {})
        return self._case("zip", rng.choice(["read", "load"]), path, attack)

    # -- pickles with payloads

    def pickle_case(self) -> Case:
        rng = self.rng
        target = rng.choice(_PAYLOAD_TARGETS)
        style = rng.choice(["global_reduce", "stack_global", "stack_global_memo", "inst", "obj", "newobj",
                            "newobj_ex", "build", "ext1", "persid", "beside"])
        marker = self._marker()
        data = _payload_pickle(target, marker, style, rng)
        container = rng.choice(["zip", "zip", "plain"])
        path = self._path(".pth")
        if container == "zip":
            _torch_zip(path, data, {"0": np.arange(4, dtype="<f4").tobytes()})
        else:
            path.write_bytes(data)
        return self._case("pickle", rng.choice(["read", "load", "convert"]), path,
                          f"{'.'.join(target)} via {style} in {container} [marker {Path(marker).name}]")

    # -- broken safetensors

    def safetensors_case(self) -> Case:
        rng = self.rng
        path = self._path(".safetensors")
        attack = rng.choice(["header_len", "deep", "dup", "dtype", "shape", "overlap", "gap", "long_key", "newline",
                             "metadata", "not_object", "huge_header", "bytes"])
        good = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}
        data = bytes(12)
        header: object = good
        raw_header: Optional[bytes] = None
        if attack == "header_len":
            blob = json.dumps(good).encode()
            path.write_bytes(struct.pack("<Q", rng.choice([2**63, 2**40, len(blob) + 1000, 0])) + blob + data)
            return self._case("safetensors", "read", path, attack)
        if attack == "deep":
            raw_header = b"{\"a\":" + b"[" * 100000 + b"]" * 100000 + b"}"
        elif attack == "dup":
            raw_header = b'{"a": {"dtype":"F32","shape":[3],"data_offsets":[0,12]}, "a": {"dtype":"F32","shape":[3],' \
                         b'"data_offsets":[0,12]}}'
        elif attack == "dtype":
            header = {"a": {"dtype": rng.choice(["F8_E4M3", "Q8", "", 5, None]), "shape": [3], "data_offsets": [0, 12]}}
        elif attack == "shape":
            header = {"a": {"dtype": "F32", "shape": rng.choice([[2**62, 2**62], [-1], [3.0], "3", [1] * 100]),
                            "data_offsets": [0, 12]}}
        elif attack == "overlap":
            header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
        elif attack == "gap":
            header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
        elif attack in ("long_key", "newline"):
            key = "k" * 20_000_000 if attack == "long_key" else "bad\nkey\x1b[31m"
            header = {key: {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
        elif attack == "metadata":
            header = dict(good, __metadata__=rng.choice([{"a": 1}, [1], "x", {"k": None}]))
        elif attack == "not_object":
            header = rng.choice([[1, 2], "x", 3, None])
        elif attack == "huge_header":
            header = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(300_000)}
            data = b""
        else:
            src = self.seeds["small_st"].read_bytes()
            mutated, how = _mutate_bytes(src, rng)
            path.write_bytes(mutated)
            return self._case("safetensors", rng.choice(["read", "load"]), path, f"bytes {how}")
        blob = raw_header if raw_header is not None else json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
        return self._case("safetensors", rng.choice(["read", "load"]), path, attack)

    # -- hostile model folders

    def folder_case(self) -> Case:
        rng = self.rng
        seed_name = rng.choice(["b0_dir", "b0_dir", "m0_dir"])
        seed = self.seeds[seed_name]
        folder = self._path("_dir")
        folder.mkdir()
        os.link(seed / "model.safetensors", folder / "model.safetensors")
        config = json.loads((seed / "config.json").read_text())
        args = config["arch_args"]
        attack = rng.choice(["value", "value", "value", "named", "pretrained", "deep", "unknown_key", "bytes",
                             "fifo_config", "fifo_weights", "not_dict", "weights_bytes"])
        note = attack
        if attack == "value":
            key = rng.choice(sorted(args))
            value = rng.choice([0, -1, 10**9, 10**12, 1e300, float("nan") if False else 1.5, "x", None, [], True,
                                [10**6] * 5, [[1, 2]], [0] * 5, {"a": 1}, "\n" * 3, list(range(100))])
            if isinstance(args[key], list) and isinstance(value, int) and rng.random() < 0.5:
                value = [value] * len(args[key])
            args[key] = value
            note = f"arch_args.{key} = {json.dumps(value)[:40]}"
        elif attack == "named":
            if seed_name == "m0_dir":
                args.update(rng.choice([{"window_size": [150, 150, 150], "img_size": 2400}, {"key_dim": [0, 0, 0]},
                                        {"depth": [1000000, 1, 1]}, {"kernels": [0, 0, 0, 0]}]))
            else:
                args.update(rng.choice([{"depths": [1000000, 1, 1, 1, 1]}, {"head_dim": 0}, {"num_classes": 10**12},
                                        {"widths": [10**9] * 5}, {"head_widths": [0, 0]}, {"expand_ratio": 0}]))
            note = f"named {json.dumps(args)[:60]}"
        elif attack == "pretrained":
            cfg = config.get("pretrained_cfg") or {}
            cfg.update(rng.choice([{"input_size": [3, 100000, 100000]}, {"input_size": 0}, {"crop_pct": 0},
                                   {"crop_pct": 1e-9}, {"std": [0, 0, 0]}, {"mean": "x"}, {"interpolation": "evil"},
                                   {"crop_mode": ["x"]}, {"input_size": [3, 1, 2**31]}]))
            config["pretrained_cfg"] = cfg
            note = f"pretrained_cfg {json.dumps(cfg)[:60]}"
        elif attack == "deep":
            args[rng.choice(sorted(args))] = "NEST"  # replaced by 980 nested lists when written
        elif attack == "unknown_key":
            args[rng.choice(["evil", "__class__", "a\nb", "k" * 100000])] = 1
        elif attack == "not_dict":
            config["arch_args"] = rng.choice([[1], "x", None, 3])
        if attack == "bytes":
            data, how = _mutate_bytes((seed / "config.json").read_bytes(), rng)
            (folder / "config.json").write_bytes(data)
            note = f"config bytes {how}"
        elif attack == "fifo_config":
            os.mkfifo(folder / "config.json")
        elif attack == "fifo_weights":
            (folder / "config.json").write_text(json.dumps(config))
            (folder / "model.safetensors").unlink()
            os.mkfifo(folder / "model.safetensors")
        elif attack == "weights_bytes":
            (folder / "config.json").write_text(json.dumps(config))
            data, how = _mutate_bytes((seed / "model.safetensors").read_bytes(), rng, (0, 4096))
            (folder / "model.safetensors").unlink()
            (folder / "model.safetensors").write_bytes(data)
            note = f"weights header {how}"
        else:
            (folder / "config.json").write_text(json.dumps(config).replace('"NEST"', "[" * 980 + "1" + "]" * 980))
        return self._case("folder", rng.choice(["load_dir", "load_dir", "convert"]), folder, note)

    # -- odd images

    def image_case(self) -> Case:
        rng = self.rng
        from PIL import Image

        attack = rng.choice(["aspect", "aspect", "declared", "fifo", "bytes", "bytes", "bytes", "empty", "dir",
                             "modes", "tiny"])
        path = self._path(".png")
        if attack == "aspect":
            size = rng.choice([(1, 100000), (100000, 1), (3, 60000), (60000, 3), (1, 5000), (200, 1)])
            Image.new("L", size).save(path, optimize=True)
            note = f"{size[0]}x{size[1]}"
        elif attack == "declared":  # a PNG whose header declares a huge size
            data = bytearray(self.seeds["img.png"].read_bytes())
            w, h = rng.choice([(100000, 100000), (2**31 - 1, 1), (1, 2**31 - 1), (0, 10), (70000, 70000),
                               (9000, 9000)])
            struct.pack_into(">II", data, 16, w, h)
            struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
            path.write_bytes(bytes(data))
            note = f"declared {w}x{h}"
        elif attack == "fifo":
            os.mkfifo(path)
            note = "fifo"
        elif attack == "empty":
            path.write_bytes(b"")
            note = "empty"
        elif attack == "dir":
            path.mkdir()
            note = "directory"
        elif attack == "modes":
            mode = rng.choice(["1", "L", "P", "RGBA", "LA", "I", "F", "CMYK", "I;16"])
            img = Image.new(mode if mode != "I;16" else "I;16", (17, 13))
            path = path.with_suffix(".tiff")
            img.save(path)
            note = f"mode {mode}"
        elif attack == "tiny":
            Image.new("RGB", rng.choice([(1, 1), (1, 2), (2, 1)])).save(path)
            note = "tiny"
        else:
            seed = rng.choice(["img.png", "img.jpg", "img.gif", "img.bmp", "img16.png"])
            data, how = _mutate_bytes(self.seeds[seed].read_bytes(), rng)
            path = path.with_suffix(Path(seed).suffix)
            path.write_bytes(data)
            note = f"{seed} {how}"
        return self._case("image", "image", path, note)

    def cases(self, n: int) -> list[Case]:
        """``n`` cases, the families in fixed proportions (payload pickles and folders weighted up)."""
        makers: list[Callable[[], Case]] = (
            [self.bytes_case] * 5 + [self.zip_case] * 3 + [self.pickle_case] * 3 + [self.safetensors_case] * 2
            + [self.folder_case] * 3 + [self.image_case] * 3
        )
        return [self.rng.choice(makers)() for _ in range(n)]


# ---------------------------------------------------------- issue defects


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


def defect_cases(work: Path, seeds: Optional[dict[str, Path]] = None) -> dict[str, tuple[Case, str]]:
    """One input per defect of issue 20, with a text its clean error must contain.

    ``seeds``: from :func:`make_seeds` (needed by the model-folder cases; they are left out without).
    """
    from PIL import Image

    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Case, str]] = {}

    def add(name: str, family: str, kind: str, path: Path, expect: str) -> None:
        size = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size
        out[name] = (Case(family, kind, str(path), name, size), expect)

    p = work / "pickle_bomb.pt"  # data.pkl of 992 MiB of no-ops, deflated to about 1 MB
    _pickle_bomb(p, 992 * 2**20)
    add("pickle_bomb", "zip", "read", p, "data.pkl")

    numel = 3 * 2**28 + 2**27  # 3.75 GiB of float32 declared, deflated
    p = work / "storage_bomb.pt"
    _deflated_zeros_zip(p, _state_pickle([("w", _tensor("0", "FloatStorage", numel, 0, (numel,), (1,)))]), "0",
                        numel * 4)
    add("storage_bomb", "zip", "read", p, "inflate")

    p = work / "size_lie.pt"  # declares 48 bytes, its stream inflates to 1 GiB
    _deflated_zeros_zip(p, _state_pickle([("w", _tensor("0", "FloatStorage", 12, 0, (12,), (1,)))]), "0", 2**30)
    _patch_central_size(p, "archive/data/0", 48)
    add("size_lie", "zip", "read", p, "size_lie.pt")

    p = work / "aliases.pt"  # 1000 keys on one 16 MiB storage
    numel = 4 * 2**20
    _deflated_zeros_zip(p, _state_pickle([(f"k{i}", _tensor("0", "FloatStorage", numel, 0, (numel,), (1,)))
                                          for i in range(1000)]), "0", numel * 4)
    add("aliases", "zip", "read", p, "stored data")

    p = work / "stride0.pt"  # 12 stride-0 tensors of 2**26 float64 over one stored element
    _torch_zip(p, _state_pickle([(f"s{i}", _tensor("0", "DoubleStorage", 1, 0, (2**26,), (0,))) for i in range(12)]),
               {"0": bytes(8)})
    add("stride0", "zip", "read", p, "stored data")

    p = work / "newline_key.pt"  # a key with a newline and an escape sequence, named by the error
    _torch_zip(p, b"\x80\x02}" + _p_str("a\nb\x1b[31m") + _p_int(1) + b"s.", {})
    add("newline_key", "zip", "read", p, "\\n")
    p = work / "long_key.safetensors"  # a 20 MB key in an invalid entry
    blob = json.dumps({"k" * 10_000_000: {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(12))
    add("long_key", "safetensors", "read", p, "chars")

    for name, method in (("corrupt_deflate", zipfile.ZIP_DEFLATED), ("corrupt_lzma", zipfile.ZIP_LZMA)):
        p = work / f"{name}.pt"
        _torch_zip(p, _state_pickle([("w", _tensor("0", "FloatStorage", 4096, 0, (4096,), (1,)))]),
                   {"0": np.arange(4096, dtype="<f4").tobytes()}, compress=method)
        data = bytearray(p.read_bytes())
        with zipfile.ZipFile(p) as z:
            info = z.getinfo("archive/data/0")
        start = info.header_offset + 30 + len(info.filename)
        for i in range(start + 4, start + min(info.compress_size, 64)):
            data[i] = 0xFF
        p.write_bytes(bytes(data))
        add(name, "zip", "read", p, "data/0")
    p = work / "zip_version.pt"
    _torch_zip(p, _state_pickle([("w", _tensor("0", "FloatStorage", 4, 0, (4,), (1,)))]),
               {"0": bytes(16)})
    data = bytearray(p.read_bytes())
    i = data.find(b"PK\x01\x02")
    while i >= 0:
        struct.pack_into("<H", data, i + 6, 90)  # version needed to extract: 9.0
        i = data.find(b"PK\x01\x02", i + 4)
    p.write_bytes(bytes(data))
    add("zip_version", "zip", "read", p, "zip_version.pt")

    p = work / "plain.pkl"  # a 141-byte plain pickle: sniffing must not ask for 2**30 bytes
    p.write_bytes(pickle.dumps({"w": list(range(30))}, protocol=2)[:141])
    add("plain_pickle", "pickle", "read", p, "plain pickle")

    for w, h in ((1, 100000), (100000, 1), (3, 60000)):
        p = work / f"aspect_{w}x{h}.png"
        Image.new("L", (w, h)).save(p, optimize=True)
        add(f"image_{w}x{h}", "image", "image", p, f"image of {w}x{h} pixels")
    p = work / "fifo.png"
    os.mkfifo(p)
    out["image_fifo"] = (Case("image", "image", str(p), "fifo", 0), "not a regular file")

    if seeds is not None:
        for name, seed, change, expect in (
            ("depth_million", "m0_dir", {"depth": [1000000, 1, 1]}, "arch_args.depth"),
            ("window_150", "m0_dir", {"window_size": [150, 150, 150], "img_size": 2400}, "arch_args.window_size"),
            ("embed_dim_1e9", "m0_dir", {"embed_dim": [10**9, 64, 64]}, "arch_args.embed_dim"),
            ("num_classes_1e12", "b0_dir", {"num_classes": 10**12}, "arch_args.num_classes"),
            ("zeros", "b0_dir", {"head_dim": 0}, "arch_args.head_dim"),
            ("zero_widths", "b0_dir", {"widths": [0, 0, 0, 0, 0]}, "arch_args.widths"),
            ("nested_980", "b0_dir", {"depths": "NEST"}, "arch_args.depths"),
            ("input_size_1e5", "b0_dir", {"pretrained_cfg": {"input_size": [3, 100000, 100000]}},
             "pretrained_cfg.input_size"),
        ):
            folder = work / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            os.link(seeds[seed] / "model.safetensors", folder / "model.safetensors")
            config = json.loads((seeds[seed] / "config.json").read_text())
            if "pretrained_cfg" in change:
                config["pretrained_cfg"].update(change["pretrained_cfg"])
            else:
                config["arch_args"].update(change)
            text = json.dumps(config).replace('"NEST"', "[" * 980 + "1" + "]" * 980)
            (folder / "config.json").write_text(text)
            add(name, "folder", "load_dir", folder, expect)
    return out


def run_cases(cases: list[Case], timeout: float = 60.0) -> list[Result]:
    """Run ``cases`` in a worker process (restarted after a crash, timeout or memory kill)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    worker = Worker(env)
    results = []
    try:
        for case in cases:
            reply, failure = worker.run(case, timeout)
            if reply is None:
                results.append(Result(case, failure.split(" ")[0], failure))
                worker = Worker(env)
                continue
            bound = MEMORY_FACTOR * case.size + MEMORY_SLACK
            result = Result(case, reply["outcome"], reply["detail"], reply["seconds"], reply["peak"], bound)
            if result.outcome in ("accepted", "clean") and reply["peak"] > bound:
                result.outcome, result.detail = "memory", f"peak {reply['peak'] >> 20} MiB over {bound >> 20} MiB"
            results.append(result)
    finally:
        worker.close()
    return results


# ------------------------------------------------------------------ worker


_AUDIT_EVENTS = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork")


def _peak_reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(case: Case, scratch: Path) -> None:
    """Run one case through the public API (raises whatever the API raises)."""
    import mlx_evit
    from mlx_evit.loading.checkpoint import read_checkpoint
    from mlx_evit.tasks.preprocess import eval_transform

    if case.kind == "read":
        read_checkpoint(case.path)
    elif case.kind in ("load", "load_dir"):
        mlx_evit.load(case.path)
    elif case.kind == "convert":
        out = scratch / "out"
        shutil.rmtree(out, ignore_errors=True)
        mlx_evit.convert(case.path, out)
    elif case.kind == "image":
        for cfg in ({}, {"input_size": (3, 224, 224), "crop_pct": 0.95}, {"input_size": 256, "crop_mode": "squash"}):
            eval_transform(cfg)(case.path)
    else:
        raise AssertionError(case.kind)


def _is_library_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("mlx_evit")


def _names_input(message: str, case: Case) -> bool:
    p = Path(case.path)
    return any(s in message for s in (case.path, p.name, str(p.parent / p.name)))


def worker_main() -> None:
    """Read cases (JSON lines) on stdin, answer results (JSON lines) on stdout."""
    import warnings

    warnings.simplefilter("ignore")
    audit: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event.startswith(_AUDIT_EVENTS):
            audit.append(event)

    sys.addaudithook(hook)
    import mlx_evit  # noqa: F401 (warm imports before the first measurement)
    from mlx_evit.loading import checkpoint  # noqa: F401
    from mlx_evit.tasks import preprocess  # noqa: F401

    scratch = Path(tempfile.mkdtemp(prefix="fuzzw"))
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    for line in sys.stdin:
        case = Case(**json.loads(line))
        audit.clear()
        base = _peak_reset()
        start = time.perf_counter()
        outcome, detail = "accepted", ""
        try:
            run_case(case, scratch)
        except Exception as e:  # judged below; BaseExceptions (SystemExit...) end the worker: a crash
            message = str(e)
            if type(e).__name__ == "CheckpointMismatchError":  # a key listing by design; commands print this
                from mlx_evit.errors import describe_error

                message = describe_error(e)
            if not _is_library_error(e):
                outcome, detail = "foreign", f"{type(e).__module__}.{type(e).__name__}: {message[:300]!r}"
            elif "\n" in message or len(message) > 1000:
                outcome, detail = "foreign", f"{type(e).__name__}: message of {len(message)} chars / lines"
            elif not _names_input(message, case):
                outcome, detail = "foreign", f"{type(e).__name__} not naming the input: {message[:300]!r}"
            else:
                outcome, detail = "clean", f"{type(e).__name__}: {message[:200]}"
        seconds = time.perf_counter() - start
        peak = max(0, _status("VmHWM") - base)
        if audit:
            outcome, detail = "executed", f"audit events {sorted(set(audit))}"
        out.write(json.dumps({"outcome": outcome, "detail": detail, "seconds": seconds, "peak": peak}) + "\n")
        out.flush()
        import gc

        gc.collect()


# ------------------------------------------------------------------ parent


class Worker:
    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz", "--worker"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1)

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def run(self, case: Case, timeout: float) -> tuple[Optional[dict], str]:
        assert self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(json.dumps(asdict(case)) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None, "crash"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                return None, "timeout"
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.05))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    return None, f"crash (exit {self.proc.wait()})"
                return json.loads(line), ""
            if self.rss() > HARD_MEMORY:
                self.kill()
                return None, "memory"
            if self.proc.poll() is not None:
                return None, f"crash (exit {self.proc.returncode})"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def campaign(n: int, seed: int = 0, timeout: float = 60.0, work: Optional[Path] = None,
             log: Optional[Callable[[str], None]] = None, verbose: bool = False,
             seeds: Optional[dict[str, Path]] = None) -> list[Result]:
    """Generate ``n`` cases (deterministic for ``seed``) and run them one by one in a worker.

    ``seeds``: from :func:`make_seeds` (made under ``work`` when not given).
    """
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="mlx_evit_fuzz")) if own else work
    try:
        marker_dir = work / "markers"
        marker_dir.mkdir(parents=True, exist_ok=True)
        seeds = seeds or make_seeds(work / "seeds")
        cases_dir = work / "cases"
        cases_dir.mkdir(exist_ok=True)
        gen = Generator(seeds, cases_dir, marker_dir, random.Random(seed))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        worker = Worker(env)
        results = []
        for i in range(n):
            case = gen.cases(1)[0]
            reply, failure = worker.run(case, timeout)
            if reply is None:
                result = Result(case, failure.split(" ")[0], failure)
                worker = Worker(env)
            else:
                bound = MEMORY_FACTOR * case.size + MEMORY_SLACK
                result = Result(case, reply["outcome"], reply["detail"], reply["seconds"], reply["peak"], bound)
                if result.outcome in ("accepted", "clean") and reply["peak"] > bound:
                    result.outcome, result.detail = "memory", f"peak {reply['peak'] >> 20} MiB over {bound >> 20} MiB"
            if any(marker_dir.iterdir()):
                result.outcome, result.detail = "executed", f"marker files {sorted(p.name for p in marker_dir.iterdir())}"
                for p in marker_dir.iterdir():
                    p.unlink()
            results.append(result)
            if log and (verbose or result.outcome not in ("accepted", "clean")):
                log(f"[{i}] {result.outcome}: {case.family}/{case.kind} {case.note}: {result.detail} "
                    f"({result.seconds:.2f} s, {result.peak >> 20} MiB)")
            _remove(Path(case.path))
        worker.close()
        return results
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def summary(results: list[Result]) -> dict:
    counts = {k: 0 for k in ("accepted", "clean", "executed", "crash", "timeout", "memory", "foreign")}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    families: dict[str, int] = {}
    for r in results:
        families[r.case.family] = families.get(r.case.family, 0) + 1
    peaks = [r.peak for r in results if r.bound]
    return dict(cases=len(results), **counts, families=families,
                max_peak_mib=round(max(peaks, default=0) / 2**20, 1),
                max_peak_over_bound=round(max((r.peak / r.bound for r in results if r.bound), default=0), 3),
                max_seconds=round(max((r.seconds for r in results), default=0), 2),
                total_seconds=round(sum(r.seconds for r in results), 1))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--verbose", action="store_true", help="print every case, not only failures")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    start = time.monotonic()
    results = campaign(args.cases, args.seed, args.timeout, log=lambda s: print(s, flush=True),
                       verbose=args.verbose)
    report = summary(results)
    report["wall_seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(report, indent=2))
    bad = sum(report[k] for k in ("executed", "crash", "timeout", "memory", "foreign"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
