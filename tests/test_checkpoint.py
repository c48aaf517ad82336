"""The torch-free checkpoint reader: exact round trips, and hostile files refused.

torch writes the files here (tests only); ``mlx_evit.loading.checkpoint`` reads them
with numpy and the standard library. Malicious pickles carry live payloads
(each is shown to fire under plain ``pickle.loads``) that would create a
marker file; the reader must refuse them, name the global, and leave no
marker behind.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import collections
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import synthetic
from mlx_evit.loading.checkpoint import CheckpointError, read_checkpoint, read_state_dict

torch.set_num_threads(2)

READER_MODULES = [Path(__file__).resolve().parents[1] / "mlx_evit" / "loading" / f"{name}.py" for name in
                  ("checkpoint", "safetensors_reader", "tensor_formats", "torch_pickle", "torch_zip")]


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _assert_exact(got: dict, ref: dict) -> None:
    assert list(got) == list(ref)
    for k, t in ref.items():
        want = _numpy(t)
        assert got[k].dtype == want.dtype, k
        assert got[k].shape == want.shape, k
        np.testing.assert_array_equal(got[k], want, err_msg=k)


def _state() -> dict[str, torch.Tensor]:
    """Tensors of several dtypes, views with offsets/strides, storages shared between keys."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    half = torch.randn(5, 7, generator=g).half()
    bf = torch.randn(4, 6, generator=g).bfloat16()
    return collections.OrderedDict(
        [
            ("f32", torch.randn(3, 4, 5, generator=g)),
            ("base", base),
            ("base_t", base.t()),  # transposed view of the same storage
            ("base_slice", base[2:5, 3:7]),  # offset + non-unit stride, same storage
            ("base_row_step", base[::2, 1::3]),
            ("f16", half),
            ("f16_t", half.t()),
            ("bf16", bf),
            ("bf16_slice", bf[1:, ::2]),
            ("i64", torch.randint(-(2**40), 2**40, (9,), generator=g)),
            ("i64_idx", torch.arange(12).view(3, 4)[:, 1:]),
            ("f64", torch.randn(2, 3, generator=g, dtype=torch.float64)),
            ("i8", torch.randint(-100, 100, (7,), generator=g, dtype=torch.int8)),
            ("bool", torch.rand(5, generator=g) > 0.5),
            ("param", torch.nn.Parameter(torch.randn(4, generator=g))),
            ("scalar", torch.tensor(3.5)),
            ("empty", torch.zeros(0, 3)),
            ("expanded", torch.randn(3, 1, generator=g).expand(3, 4)),  # stride 0
        ]
    )


# ------------------------------------------------------------ round trips


def test_torch_zip_round_trip(tmp_path):
    ref = _state()
    path = tmp_path / "weights.some_extension"  # detected by content, not by name
    torch.save(ref, path)
    got, info = read_checkpoint(path)
    _assert_exact(got, ref)
    assert got["bf16"].dtype == np.float32 and info.source_dtypes["bf16"] == "bfloat16"
    assert got["f16"].dtype == np.float16 and got["i64"].dtype == np.int64
    assert info.format == "torch-zip" and info.wrapper is None and info.stripped_prefix is None
    assert info.path == str(path) and info.sha256 is None and info.config is None  # hashed only on request
    assert read_checkpoint(path, sha256=True)[1].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # Views of one storage share its bytes, read once, as torch shares them; they are read-only.
    assert np.shares_memory(got["base"], got["base_t"])
    with pytest.raises(ValueError, match="read-only"):
        got["base"][0, 0] = 1e6


@pytest.mark.parametrize("layout", ["state_dict", "model_training", "module_prefix", "nested"])
def test_wrappers_are_unwrapped(tmp_path, layout):
    ref = collections.OrderedDict(
        (k, v) for k, v in _state().items() if k in ("f32", "base_slice", "bf16", "i64")
    )
    prefixed = collections.OrderedDict((f"module.{k}", v) for k, v in ref.items())
    # What AdamW.state_dict() holds (built by hand: creating torch.optim costs seconds).
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3), "exp_avg_sq": torch.rand(3)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05,
                          "amsgrad": False, "foreach": None, "params": [0]}],
    }
    if layout == "state_dict":
        obj, wrapper = {"state_dict": ref, "state_dict_ema": prefixed, "epoch": 7}, "state_dict"
    elif layout == "model_training":  # Microsoft / DeiT-style training checkpoint
        obj = {
            "model": ref,
            "optimizer": optimizer,
            "lr_scheduler": {"base_lrs": [0.1], "last_epoch": 3},
            "epoch": 3,
            "model_ema": prefixed,
            "scaler": {"scale": 65536.0, "_growth_tracker": 0},
            "max_accuracy": np.float64(71.5),
            "args": argparse.Namespace(model="EfficientViT_M0", lr=1e-3, input_size=224,
                                       tags={"a", "b"}, blob=b"\x00\x01", window=slice(1, 4)),
        }
        wrapper = "model"
    elif layout == "module_prefix":
        obj, wrapper = {"model": prefixed}, "model"
    else:
        obj, wrapper = {"checkpoint": 1, "state_dict": {"model": prefixed, "step": 5}}, "state_dict.model"
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    got, info = read_checkpoint(path)
    _assert_exact(got, ref)
    assert info.wrapper == wrapper
    assert info.stripped_prefix == ("module." if layout in ("module_prefix", "nested") else None)
    if layout == "model_training":
        assert {"optimizer", "epoch", "args", "model_ema", "max_accuracy"} <= set(info.ignored)


def test_rarer_tensor_encodings(tmp_path):
    """uint16 (UntypedStorage + _rebuild_tensor_v3), tensors with Python attributes, neg/conj views."""
    with_attr = torch.randn(3)
    with_attr.note = "x"  # pickled through _rebuild_from_type_v2
    param = torch.nn.Parameter(torch.randn(2))
    param.tag = 1  # _rebuild_parameter_with_state
    ref = {
        "u16": torch.tensor([7, 2, 65535], dtype=torch.int32).to(torch.uint16)[1:],
        "with_attr": with_attr,
        "param": param,
        "neg_view": torch._neg_view(torch.arange(4.0)),
        "conj_view": torch.randn(3, dtype=torch.complex64).conj(),
    }
    torch.save(ref, tmp_path / "r.pt")
    _assert_exact(read_state_dict(tmp_path / "r.pt"),
                  {k: v.resolve_neg().resolve_conj() for k, v in ref.items()})
    torch.save({"f8": torch.zeros(3, dtype=torch.float8_e4m3fn)}, tmp_path / "f8.pt")
    with pytest.raises(CheckpointError, match="torch.float8_e4m3fn have no numpy equivalent"):
        read_state_dict(tmp_path / "f8.pt")


def test_partial_module_prefix_is_kept(tmp_path):
    ref = {"module.a": torch.ones(2), "b": torch.zeros(2)}
    torch.save(ref, tmp_path / "p.pt")
    got, info = read_checkpoint(tmp_path / "p.pt")
    assert list(got) == ["module.a", "b"] and info.stripped_prefix is None


def test_safetensors_round_trip(tmp_path):
    ref = {k: v.detach().contiguous() for k, v in _state().items()
           if k not in ("base_t",)}  # safetensors refuses shared storages; copy views
    ref = {k: v.clone() for k, v in ref.items()}
    path = tmp_path / "w.bin"  # misleading name on purpose
    save_file(ref, str(path), metadata={"format": "pt", "note": "x"})
    got, info = read_checkpoint(path)
    assert set(got) == set(ref)
    _assert_exact({k: got[k] for k in ref}, ref)
    assert info.format == "safetensors" and info.metadata == {"format": "pt", "note": "x"}
    assert info.source_dtypes["bf16"] == "bfloat16"


def test_hub_folders(tmp_path):
    ref = {"head.weight": torch.randn(4, 3), "head.bias": torch.randn(4).bfloat16()}
    other = {"head.weight": torch.zeros(4, 3), "head.bias": torch.zeros(4).bfloat16()}
    config = {"architecture": "efficientvit_m0", "num_classes": 4,
              "pretrained_cfg": {"mean": [0.485, 0.456, 0.406]}}

    both = tmp_path / "both"
    both.mkdir()
    save_file(ref, str(both / "model.safetensors"))
    torch.save(other, both / "pytorch_model.bin")  # safetensors wins
    (both / "config.json").write_text(json.dumps(config))
    got, info = read_checkpoint(both)
    _assert_exact({k: got[k] for k in ref}, ref)
    assert info.path == str(both / "model.safetensors") and info.config == config
    assert info.config_path == str(both / "config.json")
    assert read_checkpoint(both / "model.safetensors")[1].config == config  # sibling of a Hub file

    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    torch.save(ref, bin_only / "pytorch_model.bin")
    (bin_only / "config.json").write_text(json.dumps(config))
    got, info = read_checkpoint(bin_only)
    _assert_exact(got, ref)
    assert info.format == "torch-zip" and info.config == config

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        read_state_dict(empty)
    (bin_only / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        read_state_dict(bin_only)


@pytest.mark.parametrize("keys, wrapper, suffix", [("mit_b0_cls_keys.json", "state_dict", ".pt"),
                                                   ("msra_m0_cls_keys.json", "model", ".pth")])
def test_original_layout_checkpoints(keys, wrapper, suffix, tmp_path):
    """Real torch.save files in the published wrappers, rebuilt from the fixtures' key lists."""
    state = {k: torch.from_numpy(v) for k, v in synthetic.state_dict(synthetic.keys_file(keys)).items()}
    path = tmp_path / f"ckpt{suffix}"
    torch.save({wrapper: state, "epoch": 3}, path)
    got, info = read_checkpoint(path)
    assert info.wrapper == wrapper
    _assert_exact(got, state)


def test_big_endian_archive(tmp_path):
    values = np.arange(6, dtype=np.float32) * 1.5 - 2
    path = tmp_path / "be.pt"
    _write_archive(path, {"w": _T(_S("0", "FloatStorage", 6), 1, (2, 2), (1, 2))},
                   {"0": values.astype(">f4").tobytes()}, byteorder=b"big")
    got = read_state_dict(path)
    np.testing.assert_array_equal(got["w"], np.lib.stride_tricks.as_strided(
        values[1:], (2, 2), (4, 8)))


# ------------------------------------------------------- hostile or broken


def _check_refused(path, global_name, marker):
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert f"refusing to load global '{global_name}'" in message
    assert str(path) in message and "\n" not in message
    assert not marker.exists(), "payload ran"


class _Payload:
    """Pickles as a call to ``func(*args)``: the classic pickle exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    touch = f"touch {marker}"
    return {
        "posix.system": _Payload(os.system, touch),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("global_name", ["posix.system", "builtins.exec", "subprocess.Popen"])
def test_malicious_pickles_never_run(tmp_path, global_name):
    # The payload is live: plain pickle.loads runs it.
    probe = tmp_path / "probe_marker"
    result = pickle.loads(pickle.dumps(_payloads(probe)[global_name], protocol=2))
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert probe.exists()

    marker = tmp_path / "marker"
    payload = _payloads(marker)[global_name]
    weights = {"w": torch.randn(3)}
    cases = {
        "beside_weights.pth": {"model": weights, "optimizer": payload},  # real torch.save layout
        "inside_weights.pth": {"model": {"w": torch.randn(3), "x": payload}},
        "top_level.pt": payload,
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        _check_refused(tmp_path / name, global_name, marker)
    for protocol in (2, 5):  # GLOBAL and STACK_GLOBAL spellings
        plain = tmp_path / f"plain_{protocol}.pth"
        plain.write_bytes(pickle.dumps({"model": payload}, protocol=protocol))
        _check_refused(plain, global_name, marker)


def test_handwritten_globals_are_refused(tmp_path):
    marker = tmp_path / "marker"
    cmd = f"touch {marker}".encode()
    cases = {
        "os.system": b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.",
        "posix.system": b"(S'" + cmd + b"'\niposix\nsystem\n.",  # protocol 0 INST
        "torch.storage._load_from_bytes": pickle.dumps(
            _Payload(torch.storage._load_from_bytes, b"junk"), protocol=2),
    }
    for name, data in cases.items():
        _write_archive(tmp_path / "a.pt", None, {}, data_pkl=data)
        _check_refused(tmp_path / "a.pt", name, marker)


@pytest.mark.parametrize("bad", ["archive/data/../../evil", "../archive/data/0", "/abs/data/0",
                                 "archive\\data\\0"])
def test_unsafe_member_names(tmp_path, bad):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(3)}, good)
    path = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.writestr(bad, b"\x00" * 12)
    with pytest.raises(CheckpointError, match="refusing unsafe zip member name"):
        read_state_dict(path)
    assert not (tmp_path / "evil").exists()


def test_broken_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64)}, good)
    data = good.read_bytes()
    cases = {
        "truncated.pt": (data[: len(data) // 2], "corrupt or truncated zip archive"),
        "empty.pth": (b"", "empty file"),
        "text.pth": (b"these are not the weights you are looking for\n", "not a checkpoint"),
        "plain.pkl": (pickle.dumps({"w": [1.0, 2.0]}, protocol=4), "a plain pickle"),
    }
    for name, (content, problem) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=problem) as err:
            read_state_dict(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "missing.pt")


def test_legacy_format_gets_advice(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.randn(3)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy PyTorch serialization.*torch>=1\.6"):
        read_state_dict(path)


def test_archive_without_data_pkl(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/readme.txt", b"hi")
    with pytest.raises(CheckpointError, match="no archive/data.pkl"):
        read_state_dict(path)


def test_build_cannot_alter_a_validated_view(tmp_path):
    """A BUILD opcode after the rebuild call must not rewrite offset/size of the tensor."""
    path = tmp_path / "w.pt"
    torch.save({"w": torch.randn(4)}, path)
    with zipfile.ZipFile(path) as z:
        pkl = z.read("w/data.pkl")
        storage = z.read("w/data/0")
    assert pkl.endswith(b"s.")  # SETITEM, STOP
    attack = b"}X\x06\x00\x00\x00offsetJ\x00\x00\x00\x10sb"  # {'offset': 2**28}, BUILD
    _write_archive(path, None, {"0": storage}, data_pkl=pkl[:-2] + attack + b"s.")
    with pytest.raises(CheckpointError, match="malformed pickle"):
        read_state_dict(path)


# Hand-built archives: the views and storage records come from the test, not torch.

class _S:
    def __init__(self, key, storage_type, numel):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _T:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _ArchivePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _S):
            return ("storage", getattr(torch, obj.storage_type), obj.key, "cpu", obj.numel)
        return None


def _write_archive(path, root, storages, byteorder=b"little", data_pkl=None, prefix="archive"):
    if data_pkl is None:
        buf = io.BytesIO()
        _ArchivePickler(buf, protocol=2).dump(root)
        data_pkl = buf.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        z.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in storages.items():
            z.writestr(f"{prefix}/data/{key}", raw)
        z.writestr(f"{prefix}/version", b"3\n")


@pytest.mark.parametrize(
    "tensor, storages, problem",
    [
        (_T(_S("0", "FloatStorage", 6), 0, (3, 3), (3, 1)), {"0": bytes(24)},
         r"reaches element 8 of data/0, which holds 6 float32 elements"),
        (_T(_S("0", "FloatStorage", 6), 5, (2,), (1,)), {"0": bytes(24)}, "reaches element 6"),
        (_T(_S("0", "FloatStorage", 10), 0, (2,), (1,)), {"0": bytes(24)},
         "has 24 bytes but data.pkl declares 10 float32 elements"),
        (_T(_S("0", "FloatStorage", 6), 0, (2,), (1,)), {}, "storage data/0 is missing"),
        (_T(_S("0", "FloatStorage", 6), 5, (2,), (-1,)), {"0": bytes(24)}, "invalid tensor view"),
        (_T(_S("0", "FloatStorage", 6), -1, (2,), (1,)), {"0": bytes(24)}, "invalid tensor view"),
        (_T(_S("0", "FloatStorage", 6), 0, (2**62, 2**62), (1, 1)), {"0": bytes(24)}, "invalid tensor view"),
        (_T(_S("0", "FloatStorage", 6), 0, (2**40, 2**40), (0, 0)), {"0": bytes(24)},
         "elements over a storage of 6"),
        (_T(_S("0", "QInt8Storage", 6), 0, (2,), (1,)), {"0": bytes(6)},
         "tensors of type torch.QInt8Storage have no numpy equivalent"),
    ],
    ids=["extent", "offset_extent", "numel_vs_bytes", "missing_storage", "negative_stride",
         "negative_offset", "overflowing_size", "huge_expand", "quantized"],
)
def test_invalid_views_and_storages(tmp_path, tensor, storages, problem):
    path = tmp_path / "v.pt"
    _write_archive(path, {"w": tensor}, storages)
    with pytest.raises(CheckpointError, match=problem) as err:
        read_state_dict(path)
    assert "\n" not in str(err.value)


def test_hand_built_archive_control(tmp_path):
    """The builder above makes readable files when the records are honest."""
    values = np.arange(6, dtype=np.float32)
    path = tmp_path / "ok.pt"
    _write_archive(path, {"w": _T(_S("0", "FloatStorage", 6), 1, (2, 2), (3, 1))},
                   {"0": values.tobytes()})
    np.testing.assert_array_equal(read_state_dict(path)["w"], [[1, 2], [4, 5]])


def _safetensors(path, header, data: bytes, length=None):
    raw = json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, problem",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, bytes(8), "outside the data section"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "overlap"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8),
         "span 8 bytes but F32 \\[3\\] needs 12"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "unaccounted bytes before"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "after the last tensor"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "not a list of non-negative"),
        ({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), "not supported"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, bytes(8), "exactly dtype"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__ must map strings"),
    ],
    ids=["out_of_range", "overlap", "length_mismatch", "gap", "trailing", "negative_dim", "float8",
         "extra_field", "bad_metadata"],
)
def test_lying_safetensors_headers(tmp_path, header, data, problem):
    path = _safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=problem) as err:
        read_state_dict(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_safetensors_header_length_and_json(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    ok = _safetensors(tmp_path / "ok.safetensors", header, np.array([1, 2], np.float32).tobytes())
    np.testing.assert_array_equal(read_state_dict(ok)["a"], [1, 2])  # control
    absurd = _safetensors(tmp_path / "absurd.safetensors", header, bytes(8), length=2**63)
    with pytest.raises(CheckpointError, match="header length 9223372036854775808 exceeds the file size"):
        read_state_dict(absurd)
    over = tmp_path / "over.safetensors"
    with open(over, "wb") as f:
        f.write(struct.pack("<Q", 200 * 2**20) + b"{")
        f.truncate(201 * 2**20)  # sparse: large, nothing written
    with pytest.raises(CheckpointError, match="over the 16 MiB limit"):
        read_state_dict(over)
    dup = tmp_path / "dup.safetensors"
    entry = b'{"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}'
    raw = b'{"a": ' + entry + b', "a": ' + entry + b"}"
    dup.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        read_state_dict(dup)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(ok.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="outside the data section"):
        read_state_dict(cut)


# ---------------------------------------------------------- no torch inside


@pytest.mark.parametrize("module", READER_MODULES, ids=lambda p: p.stem)
def test_module_never_imports_torch_or_unpickles_directly(module):
    tree = ast.parse(module.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "torch" for a in node.names)
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "torch"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) not in {("pickle", "load"), ("pickle", "loads"), ("torch", "load")}


def test_reads_with_torch_unavailable(tmp_path):
    torch.save({"model": {"w": torch.arange(6.0).view(2, 3).t()}}, tmp_path / "w.pth")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from mlx_evit.loading.checkpoint import read_state_dict\n"
        f"w = read_state_dict({str(tmp_path / 'w.pth')!r})['w']\n"
        "print(w.tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]"


def test_safetensors_written_by_mlx_without_metadata(tmp_path):
    """``mx.save_safetensors`` without metadata writes ``"__metadata__": null``."""
    import mlx_evit  # noqa: F401  (BLAS preload before mlx.core)
    import mlx.core as mx

    path = tmp_path / "plain.safetensors"
    mx.save_safetensors(str(path), {"w": mx.arange(6, dtype=mx.float32).reshape(2, 3)})
    got, info = read_checkpoint(path)
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert info.metadata == {}
