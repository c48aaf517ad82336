"""Fuzz case families of :mod:`fuzz`: generated cases (:class:`Generator`) and one case per defect of issue 20.

Each maker writes its input files and returns a :class:`~fuzz_inputs.Case`
saying which public API call runs it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import warnings
import shutil
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from fuzz_inputs import (
    Case, _deflated_zeros_zip, _mutate_bytes, _p_int, _p_str, _patch_central_size, _payload_pickle,
    _PAYLOAD_TARGETS, _pickle_bomb, _state_pickle, _tensor, _torch_zip, _zip_region,
)


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile's duplicate-name warning: duplicates are one of the attacks
            return [self.rng.choice(makers)() for _ in range(n)]


# ---------------------------------------------------------- issue defects


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

    p = work / "pickle_noops.pt"  # 8 MiB of no-ops: under the byte limit, over the opcode limit
    _pickle_bomb(p, 8 * 2**20)
    add("pickle_noops", "zip", "read", p, "opcodes")

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
