"""Reading checkpoints into ``{key: numpy array}`` safely, without torch.

Three inputs are understood, recognised from the file's bytes (never its name):

* **safetensors**: an 8-byte little-endian header length, a JSON header,
  then the raw tensor bytes. The header is validated completely (length,
  dtypes, shapes against byte counts, offsets inside the data section,
  tensors neither overlapping nor leaving gaps) before any tensor is read.
* **PyTorch zip archives** (``torch.save`` since torch 1.6; ``.pt``,
  ``.pth``, ``.bin``, ...): ``<name>/data.pkl`` holds the object tree and
  ``<name>/data/<key>`` the raw bytes of each storage. ``data.pkl`` is read
  with a restricted unpickler (see *Security* below); storages are read
  straight from the archive into numpy, nothing is extracted to disk.
* **a directory in the Hugging Face Hub layout** timm uses:
  ``model.safetensors`` (preferred) or ``pytorch_model.bin``, with
  ``config.json`` beside it.

The usual wrappers are unwrapped: a state dict found under ``"state_dict"``,
``"model"`` or ``"model_state_dict"`` (e.g. Microsoft's
``{"model": ..., "optimizer": ..., "epoch": ..., "args": ...}``) is used and
its siblings are ignored; a ``module.`` prefix (DistributedDataParallel) on
every key is stripped. Only tensors are returned. numpy has no bfloat16, so
bfloat16 tensors are widened (exactly) to float32; every other dtype is kept
(float16 stays float16, int64 stays int64).

Security
--------
A pickle is a program: unpickling can call any importable function. Here
nothing named by the file is ever imported or called:

1. Before unpickling, ``data.pkl`` is scanned opcode by opcode. Only the
   opcodes of plain data, references to the allow-listed globals and
   persistent ids (torch's storage records) are accepted; every global the
   pickle names (``GLOBAL``, and ``STACK_GLOBAL`` whose names are pushed as
   literal strings) must be on the allow list, memo indices must be
   plausible. A refused global is reported by name (``refusing to load
   global 'posix.system'``) and nothing has run.
2. The unpickler itself (``find_class``) resolves names to our own objects
   only: ``collections.OrderedDict``; torch's tensor rebuild functions
   (``torch._utils._rebuild_tensor``/``_v2``/``_v3``, ``_rebuild_parameter``,
   ``_rebuild_parameter_with_state``, ``torch._tensor._rebuild_from_type_v2``)
   are replaced by functions of this module that validate their arguments
   and return an immutable reference; torch storage classes and dtypes
   become markers carrying a dtype. ``torch.storage._load_from_bytes`` (it
   would call ``torch.load``) and everything else is refused.
3. A few harmless data classes that training scripts store *beside* the
   weights (``argparse.Namespace`` for ``args``, numpy scalars for metrics,
   ``torch.Size``/``torch.device``, sets, ...) become inert placeholders:
   they record their arguments and never import or run the named class. A
   pickle stream cannot be skipped in part, so this is what lets a
   Microsoft-style training checkpoint load; such entries are never
   returned. Anything not on either list makes the whole file unreadable,
   with a message naming the global, even when it sits beside the weights.

Storage records are checked against the archive (member present, byte count
equal to ``numel * itemsize``), each tensor view (offset, sizes, strides)
against its storage before numpy's ``as_strided`` sees it, and zip member
names must be relative, without ``..`` or backslashes. Every problem is a
:class:`CheckpointError` with a one-line message naming the file.

The legacy (pre-1.6) torch format, TorchScript archives, plain pickles and
dtypes numpy cannot hold (float8, quantized) are recognised and refused
with advice on what to do instead.

Why about 940 lines in one module: the checks above (opcode scan, allow
lists, restricted unpickler, storage and view validation, safetensors
header validation) only make sense read together; split across files, a
reviewer could miss the one path that skips a check.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional, Union

import numpy as np
from numpy.lib.stride_tricks import as_strided

from mlx_evit.errors import CheckpointError, one_line

__all__ = ["CheckpointError", "CheckpointInfo", "read_checkpoint", "read_state_dict"]

PathLike = Union[str, os.PathLike]

# Limits on what a file may declare (far above any real checkpoint).
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors format's own limit
_MAX_PICKLE_BYTES = 2**30
_MAX_CONFIG_BYTES = 16 * 2**20
_MAX_NDIM = 64
_MAX_DIM = 2**48
_MAX_EXPANDED_ELEMENTS = 2**26  # views larger than their storage (stride 0) beyond this are refused

HUB_FILES = ("model.safetensors", "pytorch_model.bin")
"""Weight files of a Hub-layout folder, in order of preference."""

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
"""Keys under which training scripts nest the state dict, in order of preference."""

# dtype name (torch's canonical name) -> numpy dtype of one stored element.
# bfloat16 is read as its uint16 bit pattern and widened afterwards.
_NUMPY_DTYPES = {
    "float64": "f8", "float32": "f4", "float16": "f2", "bfloat16": "u2",
    "int64": "i8", "int32": "i4", "int16": "i2", "int8": "i1",
    "uint64": "u8", "uint32": "u4", "uint16": "u2", "uint8": "u1",
    "bool": "u1", "complex64": "c8", "complex128": "c16",
}

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "C64": "complex64",
}

# torch.<Name>Storage -> element dtype. UntypedStorage holds bytes; the
# tensor's dtype then comes from _rebuild_tensor_v3.
_TORCH_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}

# torch.<name> dtype globals (a pickled torch.dtype is the global torch.<name>).
_TORCH_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "int16": "int16", "short": "int16", "int8": "int8", "uint8": "uint8",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "bool": "bool",
    "complex64": "complex64", "cfloat": "complex64", "complex128": "complex128",
    "cdouble": "complex128",
}

_UNTYPED_STORAGE = ("torch.storage", "UntypedStorage")  # spelling used with _rebuild_tensor_v3

# torch dtypes (and their storages) that numpy cannot represent.
_UNSUPPORTED_DTYPE_PREFIXES = ("float8", "float4", "qint", "quint", "bits", "complex32", "chalf", "bcomplex")

_TENSOR_TYPES = {("torch", "Tensor"), ("torch._tensor", "Tensor"), ("torch.nn.parameter", "Parameter"),
                 ("torch.nn", "Parameter")}

# Harmless data classes that may sit beside the weights; represented inertly.
_INERT_GLOBALS = {
    ("argparse", "Namespace"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("_codecs", "encode"),  # how protocol 2 spells a bytes object
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("torch", "Size"), ("torch", "device"),
}

_REBUILD_NAMES = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2"),
}

# Opcodes a state-dict pickle may use: plain data, memo, globals (checked),
# calls (only reach allow-listed objects), persistent ids (storages).
_ALLOWED_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP
    NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8
    BINBYTES SHORT_BINBYTES BINBYTES8
    EMPTY_LIST APPEND APPENDS LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3
    EMPTY_DICT DICT SETITEM SETITEMS EMPTY_SET ADDITEMS FROZENSET
    GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE
    GLOBAL STACK_GLOBAL REDUCE BUILD NEWOBJ NEWOBJ_EX BINPERSID
""".split())
_STRING_OPCODES = frozenset(
    "STRING BINSTRING SHORT_BINSTRING UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8".split()
)

_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`read_checkpoint` found besides the tensors.

    ``path``: the file actually read (a Hub folder resolves to its weight
    file). ``format``: ``"safetensors"`` or ``"torch-zip"``. ``sha256``: hex
    digest of that file when asked for (``read_checkpoint(..., sha256=True)``,
    as conversion does), else ``None``. ``wrapper``: dotted key path the state dict was
    found under (``"model"``, ``"state_dict"``), ``None`` at the top level.
    ``stripped_prefix``: ``"module."`` when it was removed from every key.
    ``config`` / ``config_path``: timm's ``config.json`` (a Hub folder's, or
    the one beside a Hub-named weight file), else ``None``. ``metadata``:
    the safetensors ``__metadata__`` strings (empty for torch files).
    ``source_dtypes``: returned key -> dtype in the file (``"bfloat16"``
    marks tensors that were widened to float32). ``ignored``: entries that
    were not returned (wrapper siblings such as ``optimizer``, ``epoch``,
    ``args``; non-tensor entries of the state dict).
    """

    path: str
    format: str
    sha256: Optional[str] = None
    wrapper: Optional[str] = None
    stripped_prefix: Optional[str] = None
    config: Optional[dict] = None
    config_path: Optional[str] = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    source_dtypes: Mapping[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Tensors of the checkpoint at ``path`` as ``{key: numpy array}``.

    ``path``: a safetensors file, a PyTorch zip checkpoint or a Hub-layout
    folder. bfloat16 is widened to float32; other dtypes are kept.
    Raises :class:`CheckpointError`.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(path: PathLike, *, sha256: bool = False) -> tuple[dict[str, np.ndarray], CheckpointInfo]:
    """Tensors of the checkpoint at ``path`` plus a :class:`CheckpointInfo`.

    Same inputs and errors as :func:`read_state_dict`. ``sha256``: also hash
    the weight file (``info.sha256``; a full extra read of the file).
    """
    path = os.fspath(path)
    try:
        return _read(path, sha256)
    except OSError as e:  # permissions, I/O errors, a file vanishing mid-read
        raise CheckpointError(f"{path}: cannot read ({e.strerror or one_line(e, 200)})") from None


def _read(path: str, sha256: bool) -> tuple[dict[str, np.ndarray], CheckpointInfo]:
    weights, config_path = _resolve(path)
    config = _read_config(config_path) if config_path else None
    fmt = _sniff(weights)
    if fmt == "safetensors":
        tensors, dtypes, metadata = _read_safetensors(weights)
        wrapper = prefix = None
        ignored: tuple[str, ...] = ()
    else:
        with _TorchArchive(weights) as archive:
            root = archive.load()
            state, wrapper, ignored = _select_state_dict(root, weights)
            state, prefix = _strip_prefix(state)
            tensors, dtypes = {}, {}
            users = collections.Counter(ref.storage.key for ref in state.values())
            for key, ref in state.items():
                tensors[key] = archive.array(ref)
                dtypes[key] = ref.dtype
                users[ref.storage.key] -= 1
                if not users[ref.storage.key]:
                    archive.release(ref.storage.key)  # keep at most the storages still needed
        metadata = {}
    info = CheckpointInfo(
        path=weights, format=fmt, sha256=_sha256(weights) if sha256 else None, wrapper=wrapper,
        stripped_prefix=prefix, config=config, config_path=config_path,
        metadata=metadata, source_dtypes=dtypes, ignored=ignored,
    )
    return tensors, info


# ---------------------------------------------------------------- locating


def _resolve(path: str) -> tuple[str, Optional[str]]:
    """(weight file, config.json or None) for a file or a Hub-layout folder."""
    if os.path.isdir(path):
        for name in HUB_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                break
        else:
            raise CheckpointError(f"{path}: folder holds neither {' nor '.join(HUB_FILES)}")
        weights = candidate
    elif os.path.isfile(path):
        weights = path
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    config = os.path.join(os.path.dirname(weights), "config.json")
    hub_named = os.path.basename(weights) in HUB_FILES
    return weights, (config if hub_named and os.path.isfile(config) else None)


def _read_config(path: str) -> dict:
    if os.path.getsize(path) > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: larger than {_MAX_CONFIG_BYTES} bytes, not a model config")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({one_line(e, 200)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sniff(path: str) -> str:
    """'safetensors' or 'torch-zip', from the first bytes; otherwise a CheckpointError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if size == 0:
        raise CheckpointError(f"{path}: empty file")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if size >= 10 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if n <= size - 8:
            return "safetensors"
        raise CheckpointError(
            f"{path}: safetensors header length {n} exceeds the file size ({size} bytes); truncated?"
        )
    if head.startswith(_LEGACY_TORCH_MAGIC) or head[257:262] == b"ustar":
        raise CheckpointError(
            f"{path}: legacy PyTorch serialization (before torch 1.6) is not supported; re-save it "
            "with torch>=1.6's default zip format, e.g. torch.save(torch.load(f, weights_only=True), "
            "'new.pth'), or as safetensors"
        )
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        with open(path, "rb") as f:
            data = f.read(_MAX_PICKLE_BYTES + 1)
        _scan_pickle(data, path)  # names a refused global; nothing is unpickled
        raise CheckpointError(
            f"{path}: a plain pickle, not a PyTorch zip checkpoint or safetensors file; save the "
            "state dict with torch.save (zip format) or safetensors"
        )
    raise CheckpointError(
        f"{path}: not a checkpoint (neither safetensors nor a PyTorch zip archive); starts with {head[:16]!r}"
    )


# ------------------------------------------------------------- safetensors


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """(tensors, source dtypes, __metadata__) of a safetensors file, validated first."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > _MAX_SAFETENSORS_HEADER:
            raise CheckpointError(f"{path}: safetensors header length {n} is over the 100 MiB limit")
        if n > size - 8:
            raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file size ({size} bytes)")
        raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({one_line(e, 200)})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is not a JSON object")
        data_start = 8 + n
        data_len = size - data_start
        metadata = header.pop("__metadata__", None) or {}  # MLX writes null when there is none
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")

        entries = []  # (begin, end, name, dtype name, shape)
        for name, spec in header.items():
            where = f"{path}: tensor {name!r}"
            if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
                raise CheckpointError(f"{where}: entry must have exactly dtype, shape and data_offsets")
            code = spec["dtype"]
            if code not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{where}: dtype {code!r} is not supported (no numpy equivalent)")
            dtype = _SAFETENSORS_DTYPES[code]
            shape = spec["shape"]
            if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
                    or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape)):
                raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
            offsets = spec["data_offsets"]
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
                raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
            begin, end = offsets
            if not 0 <= begin <= end <= data_len:
                raise CheckpointError(
                    f"{where}: data_offsets [{begin}, {end}] outside the data section ({data_len} bytes)"
                )
            nbytes = _prod(shape) * np.dtype(_NUMPY_DTYPES[dtype]).itemsize
            if end - begin != nbytes:
                raise CheckpointError(
                    f"{where}: data_offsets span {end - begin} bytes but {code} {shape} needs {nbytes}"
                )
            entries.append((begin, end, name, dtype, tuple(shape)))

        entries.sort(key=lambda e: (e[0], e[1]))
        expected, previous = 0, None
        for begin, end, name, _, _ in entries:
            if begin < expected:
                raise CheckpointError(f"{path}: tensors {previous!r} and {name!r} overlap in the data section")
            if begin > expected:
                raise CheckpointError(f"{path}: {begin - expected} unaccounted bytes before tensor {name!r}")
            expected, previous = end, name
        if expected != data_len:
            raise CheckpointError(f"{path}: {data_len - expected} bytes after the last tensor are unaccounted for")

        tensors, dtypes = {}, {}
        for begin, end, name, dtype, shape in entries:
            buf = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{path}: tensor {name!r} is truncated")
            storage = np.frombuffer(buf, dtype=np.dtype(_NUMPY_DTYPES[dtype]).newbyteorder("<"))
            tensors[name] = _finish(storage.reshape(shape), dtype)
            dtypes[name] = dtype
    order = list(header)  # keep the header's key order
    return {k: tensors[k] for k in order}, {k: dtypes[k] for k in order}, dict(metadata)


def _no_duplicates(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


# ------------------------------------------------------ PyTorch zip archives


# Records produced while unpickling are named tuples: immutable and without
# ``__dict__``/``__setstate__``, so a later BUILD opcode cannot alter a view
# after it was validated.


class _StorageType(NamedTuple):
    """Marker for a torch storage class named in data.pkl."""

    name: str
    dtype: str


class _DType(NamedTuple):
    """Marker for a torch dtype named in data.pkl."""

    name: str


class _TensorType(NamedTuple):
    """Marker for torch.Tensor / torch.nn.Parameter named in data.pkl."""

    name: str


class _StorageRef(NamedTuple):
    """A storage record: bytes of ``data/<key>``, ``numel`` elements of ``dtype``."""

    key: str
    dtype: str
    numel: int
    untyped: bool


class _TensorRef(NamedTuple):
    """A validated view (in elements of ``dtype``) into a storage."""

    storage: _StorageRef
    dtype: str
    offset: int
    shape: tuple
    stride: tuple
    negative: bool = False
    conjugate: bool = False


class _Inert:
    """Placeholder for a harmless data class named in the pickle (never imported, never run)."""

    __slots__ = ("args", "state")
    origin = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "state", None)
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def __repr__(self) -> str:
        return f"<{self.origin} (not loaded)>"


class _TorchArchive:
    """A PyTorch zip checkpoint opened for reading; use as a context manager."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated zip archive ({one_line(e, 200)})") from None
        try:
            self._index()
        except BaseException:
            self.zip.close()
            raise
        self._storages: dict[str, _StorageRef] = {}
        self._raw: dict[str, bytes] = {}
        self._inert: dict[tuple[str, str], type] = {}

    def __enter__(self) -> "_TorchArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.zip.close()

    def _index(self) -> None:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in self.zip.infolist():
            name = info.filename
            parts = name.split("/")
            if (not name or name.startswith("/") or "\\" in name or ".." in parts
                    or re.match(r"^[A-Za-z]:", name) or any(ord(c) < 32 for c in name)):
                raise CheckpointError(f"{self.path}: refusing unsafe zip member name {name!r}")
            if name in members:
                raise CheckpointError(f"{self.path}: zip member {name!r} appears twice")
            if not name.endswith("/"):
                members[name] = info
        prefixes = {n.split("/", 1)[0] if "/" in n else "" for n in members}
        if len(prefixes) != 1 or "" in prefixes:
            raise CheckpointError(
                f"{self.path}: zip archive is not in PyTorch's layout (all members under one folder)"
            )
        self.prefix = prefixes.pop()
        self.members = members
        if f"{self.prefix}/data.pkl" not in members:
            if f"{self.prefix}/constants.pkl" in members:
                raise CheckpointError(
                    f"{self.path}: a TorchScript archive (torch.jit.save); save model.state_dict() with torch.save"
                )
            raise CheckpointError(f"{self.path}: zip archive has no {self.prefix}/data.pkl; not a PyTorch checkpoint")
        if any(n.startswith(f"{self.prefix}/code/") for n in members):
            raise CheckpointError(
                f"{self.path}: a TorchScript archive (torch.jit.save); save model.state_dict() with torch.save"
            )
        self.big_endian = False
        order = members.get(f"{self.prefix}/byteorder")
        if order is not None:
            value = self._read_member(order, limit=16).strip()
            if value not in (b"little", b"big"):
                raise CheckpointError(f"{self.path}: byteorder record is {value!r}, expected 'little' or 'big'")
            self.big_endian = value == b"big"

    def _read_member(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: zip member {info.filename!r} is larger than {limit} bytes")
        try:
            data = self.zip.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError, NotImplementedError) as e:
            raise CheckpointError(f"{self.path}: cannot read zip member {info.filename!r} ({one_line(e, 200)})") from None
        if len(data) != info.file_size:
            raise CheckpointError(f"{self.path}: zip member {info.filename!r} is truncated")
        return data

    # -- data.pkl

    def load(self) -> Any:
        """The object tree of data.pkl, tensors as :class:`_TensorRef`."""
        where = f"{self.path}: data.pkl"
        data = self._read_member(self.members[f"{self.prefix}/data.pkl"], _MAX_PICKLE_BYTES)
        _scan_pickle(data, where, require_end=True)
        unpickler = _RestrictedUnpickler(data, self, where)
        try:
            return unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:  # malformed streams surface as many exception types
            raise CheckpointError(f"{where}: malformed pickle ({type(e).__name__}: {one_line(e, 200)})") from None

    def find_class(self, module: str, name: str, where: str) -> Any:
        kind = _classify_global(module, name, where)
        if kind == "ordered_dict":
            return collections.OrderedDict
        if kind == "rebuild":
            return getattr(self, name)
        if kind == "storage":
            return _StorageType(name, _TORCH_STORAGES[name])
        if kind == "dtype":
            return _DType(_TORCH_DTYPES[name])
        if kind == "tensor_type":
            return _TensorType(name)
        key = (module, name)
        if key not in self._inert:
            self._inert[key] = type(f"Inert_{name}", (_Inert,), {"__slots__": (), "origin": f"{module}.{name}"})
        return self._inert[key]

    def persistent_load(self, pid: Any, where: str) -> _StorageRef:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise CheckpointError(f"{where}: unsupported persistent id (expected a torch storage record)")
        _, stype, key, location, numel = pid
        if type(stype) is not _StorageType:
            raise CheckpointError(f"{where}: storage record names no torch storage type")
        if type(key) is not str or not re.fullmatch(r"[0-9A-Za-z_]{1,64}", key):
            raise CheckpointError(f"{where}: storage key {key!r} is not a plain name")
        if type(location) is not str or not _is_int(numel) or numel < 0:
            raise CheckpointError(f"{where}: storage record for data/{key} is malformed")
        itemsize = np.dtype(_NUMPY_DTYPES[stype.dtype]).itemsize
        info = self.members.get(f"{self.prefix}/data/{key}")
        if info is None:
            raise CheckpointError(f"{where}: storage data/{key} is missing from the archive")
        if info.file_size != numel * itemsize:
            raise CheckpointError(
                f"{self.path}: storage data/{key} has {info.file_size} bytes but data.pkl declares "
                f"{numel} {stype.dtype} elements ({numel * itemsize} bytes)"
            )
        ref = _StorageRef(key, stype.dtype, numel, stype.name == "UntypedStorage")
        known = self._storages.setdefault(key, ref)
        if known != ref:
            raise CheckpointError(f"{where}: storage data/{key} is declared twice with different types or sizes")
        return known

    # -- the rebuild functions data.pkl may call (validated stand-ins for torch's)

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self._view(storage, storage_offset, size, stride, None, None)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        return self._view(storage, storage_offset, size, stride, None, metadata)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                           dtype, metadata=None):
        if type(dtype) is not _DType:
            raise CheckpointError(f"{self.path}: data.pkl: _rebuild_tensor_v3 without a torch dtype")
        return self._view(storage, storage_offset, size, stride, dtype.name, metadata)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        return self._tensor_arg(data)

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return self._tensor_arg(data)

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        rebuilders = (self._rebuild_tensor, self._rebuild_tensor_v2, self._rebuild_tensor_v3,
                      self._rebuild_parameter, self._rebuild_parameter_with_state)
        if func not in rebuilders or type(new_type) is not _TensorType or type(args) is not tuple:
            raise CheckpointError(f"{self.path}: data.pkl: unsupported tensor subclass reconstruction")
        return self._tensor_arg(func(*args))

    def _tensor_arg(self, data):
        if type(data) is not _TensorRef:
            raise CheckpointError(f"{self.path}: data.pkl: parameter wraps a {type(data).__name__}, not a tensor")
        return data

    def _view(self, storage, offset, size, stride, dtype, metadata) -> _TensorRef:
        """Validate a tensor view against its storage (all in Python ints: no overflow)."""
        where = f"{self.path}: data.pkl"
        if type(storage) is not _StorageRef:
            raise CheckpointError(f"{where}: tensor built on a {type(storage).__name__}, not a storage record")
        if dtype is None:
            dtype = storage.dtype
        elif dtype not in _NUMPY_DTYPES:
            raise CheckpointError(f"{where}: tensor dtype {dtype} has no numpy equivalent")
        elif not storage.untyped and dtype != storage.dtype:
            raise CheckpointError(f"{where}: {dtype} tensor on a {storage.dtype} storage (data/{storage.key})")
        itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize
        nbytes = storage.numel * np.dtype(_NUMPY_DTYPES[storage.dtype]).itemsize
        if nbytes % itemsize:
            raise CheckpointError(f"{where}: storage data/{storage.key} is not a whole number of {dtype} elements")
        available = nbytes // itemsize
        size, stride = _int_tuple(size), _int_tuple(stride)
        if (size is None or stride is None or len(size) != len(stride) or len(size) > _MAX_NDIM
                or not _is_int(offset) or offset < 0 or any(not 0 <= s <= _MAX_DIM for s in size)
                or any(s < 0 for s in stride)):
            raise CheckpointError(
                f"{where}: invalid tensor view (offset {offset!r}, size {size!r}, stride {stride!r}) "
                f"on data/{storage.key}"
            )
        count = _prod(size)
        if count == 0:
            if offset > available:
                raise CheckpointError(f"{where}: empty tensor offset {offset} beyond data/{storage.key}")
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= available:
                raise CheckpointError(
                    f"{where}: tensor view (offset {offset}, size {list(size)}, stride {list(stride)}) reaches "
                    f"element {last} of data/{storage.key}, which holds {available} {dtype} elements"
                )
            if count > max(available, _MAX_EXPANDED_ELEMENTS):
                raise CheckpointError(f"{where}: tensor of {count} elements over a storage of {available}")
        negative = conjugate = False
        if metadata is not None:
            if type(metadata) not in (dict, collections.OrderedDict):
                raise CheckpointError(f"{where}: tensor metadata is a {type(metadata).__name__}, not a dict")
            for k, v in dict.items(metadata):
                if k == "neg" and type(v) is bool:
                    negative = v
                elif k == "conj" and type(v) is bool:
                    conjugate = v
                elif v:
                    raise CheckpointError(f"{where}: unsupported tensor metadata {k!r}")
        return _TensorRef(storage, dtype, offset, size, stride, negative, conjugate)

    # -- materialising

    def release(self, key: str) -> None:
        """Forget the cached bytes of storage ``key``."""
        self._raw.pop(key, None)

    def array(self, ref: _TensorRef) -> np.ndarray:
        """A fresh numpy array with the values of ``ref``."""
        storage = ref.storage
        raw = self._raw.get(storage.key)
        if raw is None:
            info = self.members[f"{self.prefix}/data/{storage.key}"]
            raw = self._read_member(info, limit=info.file_size)
            self._raw[storage.key] = raw
        dtype = np.dtype(_NUMPY_DTYPES[ref.dtype]).newbyteorder(">" if self.big_endian else "<")
        if ref.dtype in ("uint8", "int8", "bool"):
            dtype = np.dtype(_NUMPY_DTYPES[ref.dtype])
        flat = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
        if _prod(ref.shape) == 0:
            values = np.empty(ref.shape, dtype=dtype)
        else:  # bounds were checked in _view
            strides = tuple(s * dtype.itemsize for s in ref.stride)
            values = np.array(as_strided(flat[ref.offset:], ref.shape, strides, writeable=False), order="C")
        out = _finish(values, ref.dtype)
        if ref.conjugate:
            out = np.conj(out)
        if ref.negative:
            out = np.negative(out)
        return out


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals and persistent ids resolve only through :class:`_TorchArchive`."""

    def __init__(self, data: bytes, archive: _TorchArchive, where: str):
        import io

        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        return self._archive.find_class(module, name, self._where)

    def persistent_load(self, pid: Any) -> Any:
        return self._archive.persistent_load(pid, self._where)


def _classify_global(module: str, name: str, where: str) -> str:
    """Kind of an allowed global, else CheckpointError naming it.

    Python 2 spellings (``__builtin__``, ``commands``, ...) that pickle
    protocols 0-2 use are translated first, as the standard unpickler would.
    """
    import _compat_pickle  # the standard library's Python 2 -> 3 name table

    spelled = f"{module}.{name}"
    key = _compat_pickle.NAME_MAPPING.get(
        (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
    )
    module, name = key
    if key == ("collections", "OrderedDict"):
        return "ordered_dict"
    if key in _REBUILD_NAMES:
        return "rebuild"
    if (module in ("torch", "torch.cuda") and name in _TORCH_STORAGES) or key == _UNTYPED_STORAGE:
        return "storage"
    if module == "torch" and name in _TORCH_DTYPES:
        return "dtype"
    if key in _TENSOR_TYPES:
        return "tensor_type"
    if key in _INERT_GLOBALS:
        return "inert"
    if module == "torch" and (name.endswith("Storage") or name.startswith(_UNSUPPORTED_DTYPE_PREFIXES)):
        raise CheckpointError(
            f"{where}: tensors of type torch.{name} have no numpy equivalent; convert them (e.g. to "
            "float16/float32) before saving"
        )
    reason = ""
    if key == ("torch.storage", "_load_from_bytes"):
        reason = " (it would run torch.load on embedded bytes)"
    if spelled != f"{module}.{name}":
        reason += f" (spelled '{spelled}' in the file)"
    raise CheckpointError(
        f"{where}: refusing to load global '{module}.{name}'{reason}; only tensors, OrderedDict and plain "
        "data are allowed and nothing was executed (if you trust the file, re-save just the weights, "
        "e.g. torch.save(ckpt['model'], 'weights.pth'))"
    )


def _scan_pickle(data: bytes, where: str, require_end: bool = False) -> None:
    """Check every opcode and every named global of a pickle without running it."""
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # what each value-pushing opcode pushed, if a literal string
    count = 0
    end = None
    try:
        for opcode, arg, pos in pickletools.genops(data):
            count += 1
            op = opcode.name
            if op == "INST":  # protocol 0 call: name the global it would run
                module, _, name = arg.partition(" ")
                _classify_global(module, name, where)
            if op not in _ALLOWED_OPCODES:
                raise CheckpointError(f"{where}: refusing pickle opcode {op} at byte {pos}")
            if op in _STRING_OPCODES:
                recent.append(arg if isinstance(arg, str) else None)
            elif op in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise CheckpointError(f"{where}: pickle reads memo slot {arg} that was never written")
                recent.append(memo[arg])
            elif op in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = len(memo) if op == "MEMOIZE" else arg
                if index > count:
                    raise CheckpointError(f"{where}: implausible pickle memo index {index}")
                memo[index] = recent[-1] if recent else None
            elif op == "GLOBAL":
                module, _, name = arg.partition(" ")
                _classify_global(module, name, where)
                recent.append(None)
            elif op == "STACK_GLOBAL":
                if len(recent) < 2 or not all(isinstance(s, str) for s in recent[-2:]):
                    raise CheckpointError(f"{where}: refusing a global whose name is computed (byte {pos})")
                _classify_global(recent[-2], recent[-1], where)
                recent.append(None)
            elif op == "STOP":
                end = pos + 1
            elif op not in ("PROTO", "FRAME"):
                recent.append(None)
            if len(recent) > 64:
                del recent[:-2]
    except CheckpointError:
        raise
    except Exception as e:  # genops: unknown opcode, truncated stream
        raise CheckpointError(f"{where}: malformed pickle ({one_line(e, 200)})") from None
    if require_end and end != len(data):
        raise CheckpointError(f"{where}: {len(data) - (end or 0)} bytes of garbage after the pickle")


def _select_state_dict(root: Any, path: str) -> tuple[dict[str, _TensorRef], Optional[str], tuple[str, ...]]:
    """(tensors by key, wrapper key path, ignored entries) of the unpickled object tree."""
    if not _is_dict(root):
        raise CheckpointError(f"{path}: the checkpoint holds a {_describe(root)}, not a dict of tensors")
    current, trail, ignored = root, [], []
    for _ in range(4):
        if any(type(v) is _TensorRef for v in dict.values(current)):
            break
        key = next((k for k in WRAPPER_KEYS if k in dict.keys(current) and _is_dict(dict.__getitem__(current, k))),
                   None)
        if key is None:
            break
        ignored += [_dotted(trail, k) for k in dict.keys(current) if k != key]
        trail.append(key)
        current = dict.__getitem__(current, key)
    state = {}
    for k, v in dict.items(current):
        if type(k) is not str:
            raise CheckpointError(f"{path}: state dict key {_describe(k)} is not a string")
        if type(v) is _TensorRef:
            state[k] = v
        else:
            ignored.append(_dotted(trail, k))
    if not state:
        keys = ", ".join(_dotted([], k) for k in list(dict.keys(current))[:8])
        raise CheckpointError(
            f"{path}: no tensors found (keys: {keys or 'none'}); expected a state dict at the top level "
            f"or under {', '.join(repr(k) for k in WRAPPER_KEYS)}"
        )
    return state, ".".join(trail) or None, tuple(ignored)


def _strip_prefix(state: dict, prefix: str = "module.") -> tuple[dict, Optional[str]]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}, prefix
    return state, None


# ------------------------------------------------------------------ helpers


def _finish(values: np.ndarray, dtype: str) -> np.ndarray:
    """Native-endian, owned array of the returned dtype (bfloat16 bits -> float32, bytes -> bool)."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    if dtype == "bool":
        return values != 0
    native = values.dtype.newbyteorder("=")
    return values if values.dtype == native else values.astype(native)


def _is_int(x: Any) -> bool:
    return type(x) is int


def _int_tuple(x: Any) -> Optional[tuple]:
    if type(x) not in (tuple, list) or not all(_is_int(v) for v in x):
        return None
    return tuple(x)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _is_dict(x: Any) -> bool:
    return type(x) in (dict, collections.OrderedDict)


def _describe(x: Any) -> str:
    if isinstance(x, _Inert):
        return type(x).origin
    if type(x) is str:
        return repr(x)
    return type(x).__name__


def _dotted(trail: list, key: Any) -> str:
    name = key if type(key) is str else f"<{_describe(key)}>"
    return ".".join([*trail, name])
