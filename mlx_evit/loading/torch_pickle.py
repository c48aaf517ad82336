"""The pickle side of a PyTorch checkpoint: what ``data.pkl`` may name, checked before it runs.

A pickle is a program: unpickling can call any importable function. Here
nothing named by the file is ever imported or called:

1. Before unpickling, the stream is scanned opcode by opcode
   (:func:`scan_pickle`, streamed, at most a bounded number of bytes,
   stopping at the first ``STOP``). Only the opcodes of plain data,
   references to the allow-listed globals and persistent ids (torch's
   storage records) are accepted; every global the pickle names
   (``GLOBAL``, ``INST``, and ``STACK_GLOBAL`` whose names are pushed as
   literal strings) must be on the allow list, memo indices must be
   plausible. A refused global is reported by name (``refusing to load
   global 'posix.system'``) and nothing has run.
2. The unpickler itself (:class:`RestrictedUnpickler`) resolves names
   through its owner (:class:`~mlx_evit.loading.torch_zip.TorchArchive`)
   to our own objects only: ``collections.OrderedDict``; torch's tensor
   rebuild functions are replaced by validated stand-ins returning
   immutable records (:class:`TensorRef`); torch storage classes and dtypes
   become markers carrying a dtype. ``torch.storage._load_from_bytes`` (it
   would call ``torch.load``) and everything else is refused.
3. A few harmless data classes that training scripts store *beside* the
   weights (``argparse.Namespace``, numpy scalars, ``torch.Size``, sets,
   ...) become inert placeholders (:class:`Inert`) that record their
   arguments and never import or run the named class.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from typing import Any, BinaryIO, NamedTuple, Optional

from mlx_evit.errors import CheckpointError, one_line, short_name

__all__ = [
    "TORCH_STORAGES", "TORCH_DTYPES", "StorageType", "DType", "TensorType", "StorageRef", "TensorRef", "Inert",
    "classify_global", "scan_pickle", "RestrictedUnpickler", "BoundedReader",
]

# torch.<Name>Storage -> element dtype. UntypedStorage holds bytes; the
# tensor's dtype then comes from _rebuild_tensor_v3.
TORCH_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}

# torch.<name> dtype globals (a pickled torch.dtype is the global torch.<name>).
TORCH_DTYPES = {
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


# Records produced while unpickling are named tuples: immutable and without
# ``__dict__``/``__setstate__``, so a later BUILD opcode cannot alter a view
# after it was validated.


class StorageType(NamedTuple):
    """Marker for a torch storage class named in data.pkl."""

    name: str
    dtype: str


class DType(NamedTuple):
    """Marker for a torch dtype named in data.pkl."""

    name: str


class TensorType(NamedTuple):
    """Marker for torch.Tensor / torch.nn.Parameter named in data.pkl."""

    name: str


class StorageRef(NamedTuple):
    """A storage record: bytes of ``data/<key>``, ``numel`` elements of ``dtype``."""

    key: str
    dtype: str
    numel: int
    untyped: bool


class TensorRef(NamedTuple):
    """A validated view (in elements of ``dtype``) into a storage."""

    storage: StorageRef
    dtype: str
    offset: int
    shape: tuple
    stride: tuple
    negative: bool = False
    conjugate: bool = False


class Inert:
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


class BoundedReader(io.RawIOBase):
    """A read-only stream over ``stream`` that refuses to deliver more than ``limit`` bytes.

    Reaching the limit raises :class:`CheckpointError` with ``message``.
    """

    def __init__(self, stream: BinaryIO, limit: int, message: str):
        super().__init__()
        self._stream, self._left, self._message = stream, limit, message
        self._position = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)
        want = len(view)
        if want == 0:
            return 0
        data = self._stream.read(min(want, self._left + 1))
        if len(data) > self._left:
            raise CheckpointError(self._message)
        self._left -= len(data)
        self._position += len(data)
        view[: len(data)] = data
        return len(data)


def classify_global(module: str, name: str, where: str) -> str:
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
    if (module in ("torch", "torch.cuda") and name in TORCH_STORAGES) or key == _UNTYPED_STORAGE:
        return "storage"
    if module == "torch" and name in TORCH_DTYPES:
        return "dtype"
    if key in _TENSOR_TYPES:
        return "tensor_type"
    if key in _INERT_GLOBALS:
        return "inert"
    if module == "torch" and (name.endswith("Storage") or name.startswith(_UNSUPPORTED_DTYPE_PREFIXES)):
        raise CheckpointError(
            f"{where}: tensors of type {short_name('torch.' + name, bare=True)} have no numpy equivalent; convert them "
            "(e.g. to float16/float32) before saving"
        )
    reason = ""
    if key == ("torch.storage", "_load_from_bytes"):
        reason = " (it would run torch.load on embedded bytes)"
    if spelled != f"{module}.{name}":
        reason += f" (spelled {short_name(spelled)} in the file)"
    raise CheckpointError(
        f"{where}: refusing to load global {short_name(module + '.' + name)}{reason}; only tensors, OrderedDict "
        "and plain data are allowed and nothing was executed (if you trust the file, re-save just the "
        "weights, e.g. torch.save(ckpt['model'], 'weights.pth'))"
    )


def scan_pickle(stream: BinaryIO, where: str, require_end: bool = False, max_ops: Optional[int] = None) -> None:
    """Check every opcode and every named global of a pickle stream without running it.

    Reads ``stream`` only up to the first ``STOP`` (the caller bounds the
    stream's length, e.g. with :class:`BoundedReader`). ``require_end``:
    bytes after the ``STOP`` are an error. ``max_ops``: more opcodes than
    this are refused (scanning costs about 2 us an opcode; a state dict
    needs a few dozen per tensor).
    """
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # what each value-pushing opcode pushed, if a literal string
    count = 0
    stopped = False
    try:
        for opcode, arg, pos in pickletools.genops(stream):
            count += 1
            if max_ops is not None and count > max_ops:
                raise CheckpointError(
                    f"{where}: over {max_ops} pickle opcodes, far more than a state dict of its storages needs"
                )
            op = opcode.name
            if op == "INST":  # protocol 0 call: name the global it would run
                module, _, name = arg.partition(" ")
                classify_global(module, name, where)
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
                classify_global(module, name, where)
                recent.append(None)
            elif op == "STACK_GLOBAL":
                if len(recent) < 2 or not all(isinstance(s, str) for s in recent[-2:]):
                    raise CheckpointError(f"{where}: refusing a global whose name is computed (byte {pos})")
                classify_global(recent[-2], recent[-1], where)
                recent.append(None)
            elif op == "STOP":
                stopped = True
            elif op not in ("PROTO", "FRAME"):
                recent.append(None)
            if len(recent) > 64:
                del recent[:-2]
    except CheckpointError:
        raise
    except Exception as e:  # genops: unknown opcode, truncated stream; the stream's own errors
        raise CheckpointError(f"{where}: malformed pickle ({one_line(e, 120)})") from None
    if require_end:
        if not stopped:
            raise CheckpointError(f"{where}: pickle ends without STOP")
        try:
            extra = stream.read(1)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{where}: cannot read past the pickle ({one_line(e, 120)})") from None
        if extra:
            raise CheckpointError(f"{where}: garbage after the pickle's STOP")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals and persistent ids resolve only through ``owner``
    (``owner.find_class(module, name, where)``, ``owner.persistent_load(pid, where)``)."""

    def __init__(self, stream: BinaryIO, owner: Any, where: str):
        super().__init__(stream)
        self._owner = owner
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        return self._owner.find_class(module, name, self._where)

    def persistent_load(self, pid: Any) -> Any:
        return self._owner.persistent_load(pid, self._where)
