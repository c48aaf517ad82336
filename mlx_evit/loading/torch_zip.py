"""PyTorch zip checkpoints (``torch.save`` since torch 1.6): the archive, its storages and tensor views.

``<name>/data.pkl`` holds the object tree and ``<name>/data/<key>`` the
raw bytes of each storage. ``data.pkl`` is scanned and then read by the
restricted unpickler of :mod:`~mlx_evit.loading.torch_pickle`; storages
are read straight from the archive into memory, nothing is extracted.

Resources are bounded by what the file really holds:

* member names must be relative, without ``..``, backslashes or control
  characters; a stored (uncompressed) member's sizes must agree;
* ``data.pkl`` may inflate to at most :func:`pickle_limit` bytes (a state
  dict's pickle is small: 8 MiB plus 4 KiB per archive member) and hold at
  most :func:`pickle_op_limit` opcodes (200 000 plus 200 per member: at most
  about a second of scanning); it is streamed, never held whole, and
  scanning stops at its ``STOP``;
* compressed members together may inflate to at most
  ``INFLATE_FACTOR`` times the archive's size plus ``INFLATE_SLACK``
  (torch itself never compresses, so this only limits zip bombs);
* a storage is read once, when the first tensor needs it, and every
  tensor on it is a read-only numpy view of those bytes (stride-0 and
  overlapping views cost nothing); the returned tensors together may
  span at most ``VIEW_BUDGET_FACTOR`` times the stored bytes they use
  plus ``VIEW_BUDGET_SLACK``, so a consumer copying them stays bounded too;
* every ``zlib``/``lzma``/``zipfile`` error is a :class:`CheckpointError`.
"""

from __future__ import annotations

import collections
import io
import re
import zipfile
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from mlx_evit.errors import CheckpointError, one_line, short_name
from mlx_evit.loading.tensor_formats import (
    MAX_DIM, MAX_EXPANDED_ELEMENTS, MAX_NDIM, NUMPY_DTYPES, VIEW_BUDGET_FACTOR, VIEW_BUDGET_SLACK,
    check_regular_file, finish, int_tuple, is_int, itemsize, prod, returned_itemsize,
)
from mlx_evit.loading.torch_pickle import (
    TORCH_DTYPES, TORCH_STORAGES, BoundedReader, DType, Inert, RestrictedUnpickler, StorageRef, StorageType,
    TensorRef, TensorType, classify_global, scan_pickle,
)

__all__ = ["TorchArchive", "pickle_limit", "pickle_op_limit", "INFLATE_FACTOR", "INFLATE_SLACK"]

INFLATE_FACTOR = 8
INFLATE_SLACK = 16 * 2**20


def pickle_limit(members: int) -> int:
    """Largest ``data.pkl`` accepted in an archive of ``members`` members (bytes)."""
    return 8 * 2**20 + 4096 * members


def pickle_op_limit(members: int) -> int:
    """Most opcodes scanned in the ``data.pkl`` of an archive of ``members`` members (a tensor takes
    a few dozen; the constant leaves room for training arguments and metrics beside the weights)."""
    return 200_000 + 200 * members


class TorchArchive:
    """A PyTorch zip checkpoint opened for reading; use as a context manager."""

    def __init__(self, path: str):
        self.path = path
        size = check_regular_file(path)
        self._inflate_left = INFLATE_FACTOR * size + INFLATE_SLACK
        try:
            self.zip = zipfile.ZipFile(path)
        except Exception as e:  # BadZipFile, OSError, NotImplementedError, ... on a corrupt directory
            raise CheckpointError(f"{path}: corrupt or truncated zip archive ({one_line(e, 120)})") from None
        try:
            self._index()
        except BaseException:
            self.zip.close()
            raise
        self._storages: dict[str, StorageRef] = {}
        self._raw: dict[str, bytes] = {}
        self._inert: dict[tuple[str, str], type] = {}

    def __enter__(self) -> "TorchArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.zip.close()

    def _index(self) -> None:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in self.zip.infolist():
            name = info.filename
            parts = name.split("/")
            if (not name or len(name) > 4096 or name.startswith("/") or "\\" in name or ".." in parts
                    or re.match(r"^[A-Za-z]:", name) or any(ord(c) < 32 for c in name)):
                raise CheckpointError(f"{self.path}: refusing unsafe zip member name {short_name(name)}")
            if name in members:
                raise CheckpointError(f"{self.path}: zip member {short_name(name)} appears twice")
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
            raise CheckpointError(
                f"{self.path}: zip archive has no {short_name(self.prefix + '/data.pkl', bare=True)}; not a PyTorch checkpoint"
            )
        if any(n.startswith(f"{self.prefix}/code/") for n in members):
            raise CheckpointError(
                f"{self.path}: a TorchScript archive (torch.jit.save); save model.state_dict() with torch.save"
            )
        self.big_endian = False
        order = members.get(f"{self.prefix}/byteorder")
        if order is not None:
            value = self._read_member(order, limit=16).strip()
            if value not in (b"little", b"big"):
                raise CheckpointError(f"{self.path}: byteorder record is {value[:16]!r}, expected 'little' or 'big'")
            self.big_endian = value == b"big"

    # -- members

    def _check_member(self, info: zipfile.ZipInfo, limit: int) -> None:
        """Refuse a member over ``limit`` bytes, or inflating beyond the archive's budget."""
        name = short_name(info.filename)
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: zip member {name} declares {info.file_size} bytes, over the "
                                  f"{limit} this member may need")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise CheckpointError(f"{self.path}: stored zip member {name} declares {info.compress_size} "
                                      f"bytes in the archive but {info.file_size} bytes of content")
            return
        if info.file_size > self._inflate_left:
            raise CheckpointError(
                f"{self.path}: compressed zip member {name} would inflate to {info.file_size} bytes; the archive's "
                f"compressed members may inflate to {INFLATE_FACTOR}x its size plus {INFLATE_SLACK >> 20} MiB "
                "(a zip bomb?)"
            )
        self._inflate_left -= info.file_size

    def _open_member(self, info: zipfile.ZipInfo) -> Any:
        try:
            return self.zip.open(info)
        except Exception as e:  # unsupported version/compression, bad local header, encrypted
            raise CheckpointError(
                f"{self.path}: cannot read zip member {short_name(info.filename)} ({one_line(e, 120)})"
            ) from None

    def _read_member(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        self._check_member(info, limit)
        try:
            with self._open_member(info) as stream:
                data = stream.read(info.file_size + 1)
        except CheckpointError:
            raise
        except Exception as e:  # zlib.error, lzma.LZMAError, BadZipFile (CRC), OSError, EOFError ...
            raise CheckpointError(
                f"{self.path}: cannot read zip member {short_name(info.filename)} ({one_line(e, 120)})"
            ) from None
        if len(data) != info.file_size:
            raise CheckpointError(f"{self.path}: zip member {short_name(info.filename)} is truncated")
        return data

    # -- data.pkl

    def load(self) -> Any:
        """The object tree of data.pkl, tensors as :class:`TensorRef` (scanned first, streamed both times)."""
        where = f"{self.path}: data.pkl"
        info = self.members[f"{self.prefix}/data.pkl"]
        limit = pickle_limit(len(self.members))
        self._check_member(info, limit)
        if info.compress_type != zipfile.ZIP_STORED:
            self._inflate_left -= info.file_size  # it is inflated twice: scan, then unpickle
        message = f"{where}: longer than its declared {info.file_size} bytes"
        with self._open_member(info) as raw:
            scan_pickle(io.BufferedReader(BoundedReader(raw, info.file_size, message)), where, require_end=True,
                        max_ops=pickle_op_limit(len(self.members)))
        with self._open_member(info) as raw:
            unpickler = RestrictedUnpickler(io.BufferedReader(BoundedReader(raw, info.file_size, message)), self,
                                            where)
            try:
                return unpickler.load()
            except CheckpointError:
                raise
            except Exception as e:  # malformed streams and inflate errors surface as many exception types
                raise CheckpointError(f"{where}: malformed pickle ({type(e).__name__}: {one_line(e, 120)})") from None

    def find_class(self, module: str, name: str, where: str) -> Any:
        kind = classify_global(module, name, where)
        if kind == "ordered_dict":
            return collections.OrderedDict
        if kind == "rebuild":
            return getattr(self, name)
        if kind == "storage":
            return StorageType(name, TORCH_STORAGES[name])
        if kind == "dtype":
            return DType(TORCH_DTYPES[name])
        if kind == "tensor_type":
            return TensorType(name)
        key = (module, name)
        if key not in self._inert:
            self._inert[key] = type(f"Inert_{name}", (Inert,), {"__slots__": (), "origin": f"{module}.{name}"})
        return self._inert[key]

    def persistent_load(self, pid: Any, where: str) -> StorageRef:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise CheckpointError(f"{where}: unsupported persistent id (expected a torch storage record)")
        _, stype, key, location, numel = pid
        if type(stype) is not StorageType:
            raise CheckpointError(f"{where}: storage record names no torch storage type")
        if type(key) is not str or not re.fullmatch(r"[0-9A-Za-z_]{1,64}", key):
            raise CheckpointError(f"{where}: storage key {short_name(key)} is not a plain name")
        if type(location) is not str or not is_int(numel) or numel < 0:
            raise CheckpointError(f"{where}: storage record for data/{key} is malformed")
        size = itemsize(stype.dtype)
        info = self.members.get(f"{self.prefix}/data/{key}")
        if info is None:
            raise CheckpointError(f"{where}: storage data/{key} is missing from the archive")
        if info.file_size != numel * size:
            raise CheckpointError(
                f"{self.path}: storage data/{key} has {info.file_size} bytes but data.pkl declares "
                f"{numel} {stype.dtype} elements ({numel * size} bytes)"
            )
        ref = StorageRef(key, stype.dtype, numel, stype.name == "UntypedStorage")
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
        if type(dtype) is not DType:
            raise CheckpointError(f"{self.path}: data.pkl: _rebuild_tensor_v3 without a torch dtype")
        return self._view(storage, storage_offset, size, stride, dtype.name, metadata)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        return self._tensor_arg(data)

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return self._tensor_arg(data)

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        rebuilders = (self._rebuild_tensor, self._rebuild_tensor_v2, self._rebuild_tensor_v3,
                      self._rebuild_parameter, self._rebuild_parameter_with_state)
        if func not in rebuilders or type(new_type) is not TensorType or type(args) is not tuple:
            raise CheckpointError(f"{self.path}: data.pkl: unsupported tensor subclass reconstruction")
        return self._tensor_arg(func(*args))

    def _tensor_arg(self, data):
        if type(data) is not TensorRef:
            raise CheckpointError(f"{self.path}: data.pkl: parameter wraps a {type(data).__name__}, not a tensor")
        return data

    def _view(self, storage, offset, size, stride, dtype, metadata) -> TensorRef:
        """Validate a tensor view against its storage (all in Python ints: no overflow)."""
        where = f"{self.path}: data.pkl"
        if type(storage) is not StorageRef:
            raise CheckpointError(f"{where}: tensor built on a {type(storage).__name__}, not a storage record")
        if dtype is None:
            dtype = storage.dtype
        elif dtype not in NUMPY_DTYPES:
            raise CheckpointError(f"{where}: tensor dtype {short_name(dtype)} has no numpy equivalent")
        elif not storage.untyped and dtype != storage.dtype:
            raise CheckpointError(f"{where}: {dtype} tensor on a {storage.dtype} storage (data/{storage.key})")
        size_of = itemsize(dtype)
        nbytes = storage.numel * itemsize(storage.dtype)
        if nbytes % size_of:
            raise CheckpointError(f"{where}: storage data/{storage.key} is not a whole number of {dtype} elements")
        available = nbytes // size_of
        size, stride = int_tuple(size), int_tuple(stride)
        if (size is None or stride is None or len(size) != len(stride) or len(size) > MAX_NDIM
                or not is_int(offset) or offset < 0 or any(not 0 <= s <= MAX_DIM for s in size)
                or any(not 0 <= s <= MAX_DIM for s in stride)):
            raise CheckpointError(
                f"{where}: invalid tensor view (offset {short_name(offset)}, size {short_name(size)}, "
                f"stride {short_name(stride)}) on data/{storage.key}"
            )
        count = prod(size)
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
            if count > max(available, MAX_EXPANDED_ELEMENTS):
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
                    raise CheckpointError(f"{where}: unsupported tensor metadata {short_name(k)}")
        return TensorRef(storage, dtype, offset, size, stride, negative, conjugate)

    # -- materialising

    def check_budget(self, refs: list[TensorRef]) -> None:
        """Refuse tensors that together span far more bytes than the storages they view hold.

        Aliases and stride-0 views are free as views, but whoever copies them
        (conversion, ``mx.array``) would multiply the file's real content.
        """
        stored = {ref.storage.key: ref.storage.numel * itemsize(ref.storage.dtype) for ref in refs}
        real = sum(stored.values())
        spanned = sum(prod(ref.shape) * returned_itemsize(ref.dtype) for ref in refs)
        budget = VIEW_BUDGET_FACTOR * real + VIEW_BUDGET_SLACK
        if spanned > budget:
            raise CheckpointError(
                f"{self.path}: its tensors span {spanned} bytes over {real} bytes of stored data (aliases or "
                f"stride-0 views); at most {VIEW_BUDGET_FACTOR}x the stored bytes plus "
                f"{VIEW_BUDGET_SLACK >> 20} MiB are read"
            )

    def array(self, ref: TensorRef) -> np.ndarray:
        """The values of ``ref``: a read-only view of its storage's bytes (read once, shared), or a
        new array where the dtype, byte order or sign must change."""
        storage = ref.storage
        raw = self._raw.get(storage.key)
        if raw is None:
            info = self.members[f"{self.prefix}/data/{storage.key}"]
            raw = self._read_member(info, limit=info.file_size)
            self._raw[storage.key] = raw
        dtype = np.dtype(NUMPY_DTYPES[ref.dtype]).newbyteorder(">" if self.big_endian else "<")
        if ref.dtype in ("uint8", "int8", "bool"):
            dtype = np.dtype(NUMPY_DTYPES[ref.dtype])
        flat = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
        if prod(ref.shape) == 0:
            values = np.empty(ref.shape, dtype=dtype)
        else:  # bounds were checked in _view
            strides = tuple(s * dtype.itemsize for s in ref.stride)
            values = as_strided(flat[ref.offset:], ref.shape, strides, writeable=False)
        out = finish(values, ref.dtype)
        if ref.conjugate:
            out = np.conj(out)
        if ref.negative:
            out = np.negative(out)
        return out
