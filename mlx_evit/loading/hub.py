"""Pretrained weights from the Hugging Face Hub, converted once and cached.

A registered tag (``efficientvit_b1.r224_in1k``) names a timm repository
on the Hub (``timm/efficientvit_b1.r224_in1k``: ``model.safetensors`` +
``config.json``). :func:`pretrained_dir` downloads those two files with
``huggingface_hub`` (its standard cache, ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, resumable downloads), converts them to
an MLX model directory and keeps that directory, so later runs load it
directly. This module only locates and downloads: :func:`locate` answers
where our converted copy is or where the downloaded upstream files are, and
:func:`mlx_evit.loading.pipeline.pretrained_dir` converts them (the pipe
owns conversion; the Hub is a source that feeds it).

Cache layout (root: ``$MLX_EVIT_CACHE``, else ``$HF_HOME/mlx_evit``)::

    models--timm--efficientvit_b1.r224_in1k/
        refs/main                  commit the revision resolved to last time
        snapshots/<commit>/        converted MLX model directory

Converted weights are keyed by the upstream commit. Online, the revision is
resolved first with one HEAD request (no retries), so a new upstream commit
is noticed and converted, and an unreachable Hub is noticed at once.
Offline (``HF_HUB_OFFLINE=1``) or unreachable, the commit recorded in
``refs/`` is used (even when the Hub cache has been cleaned), else the
files the Hub cache holds are converted.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Optional

from dataclasses import dataclass

from mlx_evit.errors import HubError, one_line
from mlx_evit.outputs import check_output_file
from mlx_evit.models.registry import get_pretrained_cfg, split_name

__all__ = ["HubError", "CACHE_ENV", "DEFAULT_REVISION", "HubSpot", "cache_root", "hub_repo_id", "locate", "record",
           "is_converted"]

CACHE_ENV = "MLX_EVIT_CACHE"
DEFAULT_REVISION = "main"
_WEIGHTS, _CONFIG = "model.safetensors", "config.json"


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
        raise HubError(f"model {name!r} has no pretrained weights on the Hub; give a local checkpoint or model folder")
    return cfg.hf_hub_id


@dataclass(frozen=True)
class HubSpot:
    """Where a registered tag's weights are: our converted copy, or the upstream files to convert.

    ``converted``: the complete converted folder (``target``) when it exists,
    else None and ``files`` is the downloaded upstream file (or timm folder)
    that the pipe converts into ``target``; ``ref`` records ``commit``.
    """

    name: str
    repo_id: str
    commit: str
    target: Path
    ref: Path
    converted: Optional[Path] = None
    files: Optional[Path] = None


def locate(
    name: str,
    *,
    revision: str = DEFAULT_REVISION,
    cache_dir: Optional[os.PathLike] = None,
    endpoint: Optional[str] = None,
    offline: bool = False,
) -> HubSpot:
    """Our converted copy of a registered tag's Hub weights, or its upstream files downloaded.

    ``revision``: branch, tag or commit of the Hub repository. ``cache_dir``:
    the converted-weights cache (default :func:`cache_root`). ``endpoint``:
    the Hub URL (default ``HF_ENDPOINT``). ``offline``: never touch the
    network (as ``HF_HUB_OFFLINE=1``). Raises :class:`HubError` (offline or
    unreachable with nothing cached, unknown repository, revision or file,
    failed download) and ``ValueError`` for an unknown model name.
    """
    from huggingface_hub import constants

    repo_id = hub_repo_id(name)
    name = f"{split_name(name)[0]}.{get_pretrained_cfg(name).tag}"  # a bare architecture means its default tag
    # timm repositories hold one model (config.json + model.safetensors); the original releases (seg, SAM)
    # hold one checkpoint file per model, named by the tag's ``hf_filename``, each cached on its own.
    single = getattr(get_pretrained_cfg(name), "hf_filename", None)
    files = (single,) if single else (_CONFIG, _WEIGHTS)
    store = Path(cache_dir) if cache_dir is not None else cache_root()
    store = store / ("models--" + repo_id.replace("/", "--") + (f"--{Path(single).stem}" if single else ""))
    ref = store / "refs" / urllib.parse.quote(revision, safe="")
    offline = offline or constants.HF_HUB_OFFLINE
    hub = _Repo(repo_id, endpoint)

    def spot(commit: str, downloaded: Optional[Path] = None) -> HubSpot:
        target = store / "snapshots" / commit
        done = target if is_converted(target) else None
        source = None if done else (downloaded if single else downloaded.parent)
        return HubSpot(name, repo_id, commit, target, ref, done, source)

    unreachable = None
    if not offline:
        try:
            commit = hub.resolve(revision, files[0])
        except _Unreachable as e:
            unreachable = str(e)
    if offline or unreachable:
        # No answer from the Hub: our conversion, else the files in the Hub cache.
        cached = _cached_commit(store, ref)
        if cached is not None:
            return spot(cached.name)
        config = hub.download(files[0], revision, local_only=True)
        weights = hub.download(files[-1], config.parent.name, local_only=True) if config else None
        if weights is None:
            why = "offline mode (HF_HUB_OFFLINE) is on" if offline else (
                f"the Hub at {endpoint or constants.ENDPOINT} cannot be reached ({unreachable})")
            raise HubError(
                f"{name}: pretrained weights are not cached and {why}. Download them once with network access "
                f"(`hf download {repo_id} {' '.join(reversed(files))}`), or give a local checkpoint or converted "
                f"MLX model folder"
            )
        return spot(config.parent.name, weights)  # the Hub cache keeps files under snapshots/<commit>/
    if is_converted(store / "snapshots" / commit):
        return spot(commit)
    config = hub.download(files[0], revision)
    # The revision may have moved since resolve(): the config's snapshot names the commit.
    weights = hub.download(files[-1], config.parent.name)
    return spot(config.parent.name, weights)


def record(spot: HubSpot) -> None:
    """Record the commit a revision resolved to (atomic; best effort on a read-only cache)."""
    _write_ref(spot.ref, spot.commit)


class _Unreachable(Exception):
    """The Hub gave no usable answer (no connection, timeout, server error)."""


class _Repo:
    """One Hub repository, through huggingface_hub (its cache, endpoint and retries)."""

    def __init__(self, repo_id: str, endpoint: Optional[str]):
        self.repo_id, self.endpoint = repo_id, endpoint

    def resolve(self, revision: str, filename: str = _CONFIG) -> str:
        """The commit ``revision`` points at, from one HEAD request without retries.

        Raises :class:`_Unreachable` when the Hub does not answer (so the
        caller can fall back to the caches at once) and :class:`HubError`
        for a definite answer such as an unknown repository.
        """
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(self.repo_id, filename, revision=revision, endpoint=self.endpoint)
        try:
            commit = get_hf_file_metadata(url).commit_hash
        except Exception as e:
            message = self._definite(e, filename, revision)
            if message is None:
                raise _Unreachable(one_line(e)) from None
            raise HubError(message) from None
        if not commit:
            raise HubError(f"{url}: the answer has no X-Repo-Commit header; is HF_ENDPOINT a Hugging Face Hub?")
        return commit

    def download(self, filename: str, revision: str, local_only: bool = False) -> Optional[Path]:
        """Path of ``filename`` in the Hub cache, downloaded if needed.

        ``local_only``: look in the cache only; ``None`` if it is not there.
        """
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(
                self.repo_id, filename, revision=revision, endpoint=self.endpoint, local_files_only=local_only
            ))
        except LocalEntryNotFoundError as e:
            if local_only:
                return None
            raise HubError(f"{self._where(filename, revision)}: download failed ({one_line(e)})") from None
        except Exception as e:  # huggingface_hub's HTTP client errors are not all OSErrors
            message = self._definite(e, filename, revision)
            if message is None:
                message = f"{self._where(filename, revision)}: download failed ({type(e).__name__}: {one_line(e)})"
            raise HubError(message) from None

    def _where(self, filename: str, revision: str) -> str:
        return f"{self.repo_id}/{filename} (revision {revision})"

    def _definite(self, error: BaseException, filename: str, revision: str) -> Optional[str]:
        """A message for answers that retrying will not change; ``None`` for the others."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = self._where(filename, revision)
        if isinstance(error, GatedRepoError):
            return f"{where}: the repository is gated; log in with `hf auth login` after accepting its terms"
        if isinstance(error, RepositoryNotFoundError):
            return f"{where}: no such repository on the Hub (or it is private)"
        if isinstance(error, RevisionNotFoundError):
            return f"{where}: no such revision in the repository"
        if isinstance(error, EntryNotFoundError):
            return f"{where}: the repository has no such file"
        if isinstance(error, HfHubHTTPError):
            status = getattr(getattr(error, "response", None), "status_code", None)
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                return f"{where}: the Hub answered HTTP {status}"
        return None


def _cached_commit(store: Path, ref: Path) -> Optional[Path]:
    """The converted directory ``ref`` points at, if it is complete."""
    try:
        commit = ref.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    converted = store / "snapshots" / commit
    return converted if commit and "/" not in commit and is_converted(converted) else None


def is_converted(path: Path) -> bool:
    """Whether ``path`` is a complete converted folder of the cache."""
    return (path / _WEIGHTS).is_file() and (path / _CONFIG).is_file()


def _write_ref(ref: Path, commit: str) -> None:
    """Record the commit a revision resolved to (atomic; best effort on a read-only cache)."""
    try:
        if ref.is_file() and ref.read_text(encoding="ascii").strip() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        check_output_file(ref, force=True).write_text(commit, encoding="ascii")
    except (OSError, UnicodeDecodeError, ValueError):
        pass
