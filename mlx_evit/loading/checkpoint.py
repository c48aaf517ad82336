"""Reading checkpoints into ``{key: numpy array}`` safely, without torch.

Three inputs are understood, recognised from the file's first bytes (never
its name):

* **safetensors** (:mod:`~mlx_evit.loading.safetensors_reader`): the
  header is validated completely before any tensor is read;
* **PyTorch zip archives** (``torch.save`` since torch 1.6; ``.pt``,
  ``.pth``, ``.bin``, ...; :mod:`~mlx_evit.loading.torch_zip`): ``data.pkl``
  is scanned and read by a restricted unpickler
  (:mod:`~mlx_evit.loading.torch_pickle`: nothing the file names is ever
  imported or called), storages are read once, straight from the archive;
* **a directory in the Hugging Face Hub layout** timm uses:
  ``model.safetensors`` (preferred) or ``pytorch_model.bin``, with
  ``config.json`` beside it.

The usual wrappers are unwrapped: a state dict found under ``"state_dict"``,
``"model"`` or ``"model_state_dict"`` (e.g. Microsoft's
``{"model": ..., "optimizer": ..., "epoch": ..., "args": ...}``) is used and
its siblings are ignored; a ``module.`` prefix (DistributedDataParallel) on
every key is stripped. Only tensors are returned. numpy has no bfloat16, so
bfloat16 tensors are widened (exactly) to float32; every other dtype is kept.
Tensors of a PyTorch file are read-only views of their storage, shared as
torch shares it (copy one before writing to it).

Memory and time are bounded by what the file holds (see the reader
modules); non-regular files (FIFOs, devices) are refused before they are
opened; the legacy (pre-1.6) torch format, TorchScript archives, plain
pickles and dtypes numpy cannot hold are recognised and refused with advice.
Every problem is a :class:`CheckpointError` with a one-line message naming
the file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np

from mlx_evit.errors import CheckpointError, one_line, short_name
from mlx_evit.loading.safetensors_reader import read_safetensors
from mlx_evit.loading.tensor_formats import check_regular_file
from mlx_evit.loading.torch_pickle import BoundedReader, Inert, TensorRef, scan_pickle
from mlx_evit.loading.torch_zip import TorchArchive

__all__ = ["CheckpointError", "CheckpointInfo", "read_checkpoint", "read_state_dict"]

PathLike = Union[str, os.PathLike]

_MAX_CONFIG_BYTES = 16 * 2**20
_SNIFF_BYTES = 512
_PLAIN_PICKLE_SCAN = 2**16  # a plain pickle is refused anyway; this much is scanned to name a payload

HUB_FILES = ("model.safetensors", "pytorch_model.bin")
"""Weight files of a Hub-layout folder, in order of preference."""

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
"""Keys under which training scripts nest the state dict, in order of preference."""

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
        raise CheckpointError(f"{path}: cannot read ({e.strerror or one_line(e, 120)})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: data nested too deeply to read") from None


def _read(path: str, sha256: bool) -> tuple[dict[str, np.ndarray], CheckpointInfo]:
    weights, config_path = _resolve(path)
    config = _read_config(config_path) if config_path else None
    fmt = _sniff(weights)
    if fmt == "safetensors":
        tensors, dtypes, metadata = read_safetensors(weights)
        wrapper = prefix = None
        ignored: tuple[str, ...] = ()
    else:
        with TorchArchive(weights) as archive:
            root = archive.load()
            state, wrapper, ignored = _select_state_dict(root, weights)
            state, prefix = _strip_prefix(state)
            archive.check_budget(list(state.values()))
            tensors = {key: archive.array(ref) for key, ref in state.items()}
            dtypes = {key: ref.dtype for key, ref in state.items()}
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
            if os.path.lexists(candidate):
                break
        else:
            raise CheckpointError(f"{path}: folder holds neither {' nor '.join(HUB_FILES)}")
        weights = candidate
    elif os.path.lexists(path):
        weights = path
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    check_regular_file(weights)
    config = os.path.join(os.path.dirname(weights), "config.json")
    hub_named = os.path.basename(weights) in HUB_FILES
    return weights, (config if hub_named and os.path.lexists(config) else None)


def _read_config(path: str) -> dict:
    if check_regular_file(path) > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: larger than {_MAX_CONFIG_BYTES} bytes, not a model config")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(_MAX_CONFIG_BYTES + 1).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({one_line(e, 120)})") from None
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
    size = check_regular_file(path)
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
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
            _name_payload(f, path)
            raise CheckpointError(
                f"{path}: a plain pickle, not a PyTorch zip checkpoint or safetensors file; save the "
                "state dict with torch.save (zip format) or safetensors"
            )
    raise CheckpointError(
        f"{path}: not a checkpoint (neither safetensors nor a PyTorch zip archive); starts with {head[:16]!r}"
    )


def _name_payload(f: Any, path: str) -> None:
    """Scan the start of a plain pickle so that a refused global is named (nothing is unpickled).

    Only the first ``_PLAIN_PICKLE_SCAN`` bytes are read: the file is refused
    whatever they hold; a scan cut short or a malformed stream says nothing.
    """
    f.seek(0)
    stream = io.BufferedReader(BoundedReader(f, _PLAIN_PICKLE_SCAN, "scan limit"))
    try:
        scan_pickle(stream, path)
    except CheckpointError as e:
        if "refusing" in str(e) or "no numpy equivalent" in str(e):
            raise


def _select_state_dict(root: Any, path: str) -> tuple[dict[str, TensorRef], Optional[str], tuple[str, ...]]:
    """(tensors by key, wrapper key path, ignored entries) of the unpickled object tree."""
    if not _is_dict(root):
        raise CheckpointError(f"{path}: the checkpoint holds a {_describe(root)}, not a dict of tensors")
    current, trail, ignored = root, [], []
    for _ in range(4):
        if any(type(v) is TensorRef for v in dict.values(current)):
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
        if type(v) is TensorRef:
            state[k] = v
        else:
            ignored.append(_dotted(trail, k))
    if not state:
        keys = ", ".join(short_name(_dotted([], k), 40) for k in list(dict.keys(current))[:8])
        raise CheckpointError(
            f"{path}: no tensors found (keys: {keys or 'none'}); expected a state dict at the top level "
            f"or under {', '.join(repr(k) for k in WRAPPER_KEYS)}"
        )
    return state, ".".join(trail) or None, tuple(ignored)


def _strip_prefix(state: dict, prefix: str = "module.") -> tuple[dict, Optional[str]]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}, prefix
    return state, None


def _is_dict(x: Any) -> bool:
    return type(x) in (dict, collections.OrderedDict)


def _describe(x: Any) -> str:
    if isinstance(x, Inert):
        return type(x).origin
    if type(x) is str:
        return short_name(x)
    return type(x).__name__


def _dotted(trail: list, key: Any) -> str:
    name = key if type(key) is str else f"<{_describe(key)}>"
    return ".".join([*trail, name])
