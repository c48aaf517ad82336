"""Pretrained weights from the Hugging Face Hub, converted once and cached.

A registered tag (``efficientvit_b1.r224_in1k``) names a timm repository
on the Hub (``timm/efficientvit_b1.r224_in1k``: ``model.safetensors`` +
``config.json``). :func:`pretrained_dir` downloads those two files with
``huggingface_hub`` (its standard cache, ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, resumable downloads), converts them to
an MLX model directory (:func:`mlx_evit.convert.convert`) and keeps that
directory, so later runs load it directly.

Cache layout (root: ``$MLX_EVIT_CACHE``, else ``$HF_HOME/mlx_evit``)::

    models--timm--efficientvit_b1.r224_in1k/
        refs/main                  commit the revision resolved to last time
        snapshots/<commit>/        converted MLX model directory

Converted weights are keyed by the upstream commit: online, the revision is
resolved on the Hub first (a HEAD request), so a new upstream commit is
noticed and converted; offline (``HF_HUB_OFFLINE=1`` or no connection), the
commit recorded in ``refs/`` is used, even when the Hub cache has been
cleaned.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Callable, Optional

from .registry import get_pretrained_cfg, split_name

__all__ = ["HubError", "CACHE_ENV", "DEFAULT_REVISION", "cache_root", "hub_repo_id", "pretrained_dir"]

CACHE_ENV = "MLX_EVIT_CACHE"
DEFAULT_REVISION = "main"
_WEIGHTS, _CONFIG = "model.safetensors", "config.json"


class HubError(RuntimeError):
    """Pretrained weights cannot be fetched or converted; the message says why and what to do."""


def cache_root() -> Path:
    """Root of the converted-weights cache: ``$MLX_EVIT_CACHE``, else ``$HF_HOME/mlx_evit``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    from huggingface_hub import constants  # reads HF_HOME / XDG_CACHE_HOME

    return Path(constants.HF_HOME) / "mlx_evit"


def hub_repo_id(name: str) -> str:
    """The Hub repository of a registered name (``timm/efficientvit_b1.r224_in1k``).

    A bare architecture means its default tag. Raises ``ValueError`` for an
    unknown name and :class:`HubError` for a model without published weights.
    """
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise HubError(f"model {name!r} has no pretrained weights on the Hub; give a checkpoint (--weights PATH)")
    return cfg.hf_hub_id


def pretrained_dir(
    name: str,
    *,
    revision: str = DEFAULT_REVISION,
    cache_dir: Optional[os.PathLike] = None,
    endpoint: Optional[str] = None,
    offline: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> Path:
    """Converted MLX model directory of a registered tag's Hub weights.

    Downloads and converts on first use, then returns the cached directory.
    ``revision``: branch, tag or commit of the Hub repository. ``cache_dir``:
    the converted-weights cache (default :func:`cache_root`). ``endpoint``:
    the Hub URL (default ``HF_ENDPOINT``). ``offline``: never touch the
    network (as ``HF_HUB_OFFLINE=1``). ``log``: called with one-line status
    messages (downloading, converting). Raises :class:`HubError` (offline
    with nothing cached, unknown repository or revision, failed download or
    conversion) and ``ValueError`` for an unknown model name.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    repo_id = hub_repo_id(name)
    name = f"{split_name(name)[0]}.{get_pretrained_cfg(name).tag}"  # a bare architecture means its default tag
    store = Path(cache_dir) if cache_dir is not None else cache_root()
    store = store / ("models--" + repo_id.replace("/", "--"))
    ref = store / "refs" / urllib.parse.quote(revision, safe="")
    offline = offline or constants.HF_HUB_OFFLINE

    def download(filename: str, rev: str) -> Path:
        with _hub_errors(repo_id, filename, rev):
            return Path(hf_hub_download(repo_id, filename, revision=rev, endpoint=endpoint, local_files_only=offline))

    try:
        config = download(_CONFIG, revision)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        # Offline or unreachable, and not in the Hub cache: our cache may still hold it.
        cached = _cached_commit(store, ref)
        if cached is not None:
            return cached
        raise HubError(_offline_message(name, repo_id, offline, endpoint or constants.ENDPOINT)) from None
    commit = config.parent.name  # the Hub cache stores files under snapshots/<commit>/
    converted = store / "snapshots" / commit
    if not _is_model_dir(converted):
        try:
            weights = download(_WEIGHTS, commit)
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):
            raise HubError(_offline_message(name, repo_id, offline, endpoint or constants.ENDPOINT)) from None
        if log is not None:
            log(f"converting {repo_id}@{commit[:12]} to MLX in {converted}")
        _convert(name, weights.parent, converted)
    _write_ref(ref, commit)
    return converted


def _cached_commit(store: Path, ref: Path) -> Optional[Path]:
    """The converted directory ``ref`` points at, if it is complete."""
    try:
        commit = ref.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    converted = store / "snapshots" / commit
    return converted if commit and "/" not in commit and _is_model_dir(converted) else None


def _is_model_dir(path: Path) -> bool:
    return (path / _WEIGHTS).is_file() and (path / _CONFIG).is_file()


def _convert(name: str, source: Path, target: Path) -> None:
    """Convert a downloaded timm folder into ``target`` (atomic; a concurrent run may win)."""
    from .convert import convert

    try:
        convert(source, target, model=name)
    except Exception as e:
        if _is_model_dir(target):  # another process finished the same conversion first
            return
        raise HubError(f"cannot convert {source} for {name}: {_one_line(e)}") from None


def _write_ref(ref: Path, commit: str) -> None:
    """Record the commit a revision resolved to (atomic; best effort on a read-only cache)."""
    try:
        if ref.is_file() and ref.read_text(encoding="ascii").strip() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=ref.parent, prefix=".ref-")
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(commit)
        os.replace(tmp, ref)
    except (OSError, UnicodeDecodeError):
        pass


class _hub_errors:
    """Turns huggingface_hub's online errors into one-line :class:`HubError` messages.

    Offline errors (``LocalEntryNotFoundError``, ``OfflineModeIsEnabled``)
    pass through: the caller falls back to the cache.
    """

    def __init__(self, repo_id: str, filename: str, revision: str):
        self.where = f"{repo_id}/{filename} (revision {revision})"

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            return False
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return False
        if isinstance(error, GatedRepoError):
            message = f"{self.where}: the repository is gated; log in with `hf auth login` after accepting its terms"
        elif isinstance(error, RepositoryNotFoundError):
            message = f"{self.where}: no such repository on the Hub (or it is private)"
        elif isinstance(error, RevisionNotFoundError):
            message = f"{self.where}: no such revision in the repository"
        elif isinstance(error, EntryNotFoundError):
            message = f"{self.where}: the repository has no such file"
        elif isinstance(error, HfHubHTTPError):
            status = getattr(getattr(error, "response", None), "status_code", None)
            message = f"{self.where}: the Hub answered HTTP {status}"
        elif isinstance(error, (OSError, ValueError)):
            message = f"{self.where}: download failed ({_one_line(error)})"
        else:
            return False
        raise HubError(message) from None


def _offline_message(name: str, repo_id: str, offline: bool, endpoint: str) -> str:
    why = "offline mode (HF_HUB_OFFLINE) is on" if offline else f"the Hub at {endpoint} cannot be reached"
    return (
        f"{name}: pretrained weights are not cached and {why}. Download them once with network access "
        f"(`hf download {repo_id} {_WEIGHTS} {_CONFIG}`), or give a local checkpoint or converted "
        f"MLX directory (--weights PATH)"
    )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__
