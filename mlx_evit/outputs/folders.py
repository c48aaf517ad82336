"""Output folders: one file per input (:class:`OutputDir`), or a folder swapped in whole
(:func:`atomic_directory`); rules in :mod:`mlx_evit.outputs`."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from mlx_evit.outputs.files import OutputTarget, check_output_file, descriptor
from mlx_evit.outputs.paths import STDOUT, InputSet, current_umask, OutputError, PathLike, fail, fsync_dir, stat_or_none

Marker = Union[str, Callable[[Path], bool], None]
"""What makes a folder one of this command's outputs: a file name it holds, or a test."""


@dataclass
class OutputDir:
    """A checked output folder; made by :func:`check_output_dir`.

    ``path``: the folder really written (symbolic links resolved).
    ``existed``: it existed (and was accepted) at check time.
    """

    given: str
    path: Path
    existed: bool
    force: bool = False
    option: str = "output"
    marker: Marker = field(default=None, repr=False)
    describe: str = "an output folder of this command"
    allow_empty: bool = True
    _inputs: InputSet = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    _written: set = field(default_factory=set, repr=False, compare=False)

    def _error(self, problem: str) -> OutputError:
        return fail(self.option, self.given, problem)

    def target(self, name: PathLike) -> OutputTarget:
        """A checked :class:`OutputTarget` for the file ``name`` in this folder (subfolders allowed).

        Its folders are created. An existing file is replaced only if this
        object wrote it, or with ``force``.
        """
        rel = Path(os.fspath(name))
        if rel.is_absolute() or not rel.parts or any(p in ("..", "") for p in rel.parts):
            raise self._error(f"{os.fspath(name)!r} is not a file name inside the folder")
        file = self.path / rel
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise self._error(f"{file.parent} exists and is not a folder") from None
        except OSError as e:
            raise self._error(f"cannot create {file.parent} ({e.strerror or e})") from None
        ours = os.fspath(file) in self._written
        label = f"{self.option} {self.given}" if self.option else self.given
        target = check_output_file(file, self._inputs, force=self.force or ours, option=f"{label}:")
        self._written.add(os.fspath(file))
        return target

    def write_file(self, name: PathLike, data: Union[bytes, str], encoding: str = "utf-8") -> Path:
        """Write one file into the folder atomically (``bytes`` as is, ``str`` encoded); returns its path."""
        target = self.target(name)
        if isinstance(data, str):
            target.write_text(data, encoding=encoding)
        else:
            target.write_bytes(bytes(data))
        return Path(target.path)


def _is_marked(folder: Path, marker: Marker) -> bool:
    if marker is None:
        return True
    if callable(marker):
        return bool(marker(folder))
    return (folder / marker).is_file()


def check_output_dir(
    path: PathLike,
    inputs: Iterable[Any] = (),
    force: bool = False,
    *,
    marker: Marker = None,
    describe: str = "an output folder of this command",
    option: str = "output",
    allow_empty: bool = True,
) -> OutputDir:
    """Validate an output folder before the work; returns the :class:`OutputDir` to write later.

    A missing folder is created when written (its parents too; the nearest
    existing one must be a writable folder). An existing empty folder is
    used (with ``allow_empty=False`` it needs ``force`` too). A non-empty one needs ``force``, and with a ``marker`` (a file name
    that must be in it, or a predicate on its path) it must be one of the
    command's outputs (``describe`` names that in the message). The folder
    must not be an input nor hold one. Raises :class:`OutputError`.
    """
    given = os.fspath(path)
    inputs_ = inputs if isinstance(inputs, InputSet) else InputSet(inputs)

    def error(problem: str) -> OutputError:
        return fail(option, given, problem)

    if given in ("", STDOUT) or descriptor(given) is not None:
        raise error("expected a folder name")
    lst = stat_or_none(given, follow=False)
    st = stat_or_none(given)
    if lst is not None and st is None:
        raise error("is a broken symbolic link")
    real = Path(os.path.realpath(given))
    args = dict(force=force, option=option, marker=marker, describe=describe, allow_empty=allow_empty,
                _inputs=inputs_)
    if st is None:
        ancestor = real.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise error(f"{ancestor} is not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise error(f"folder {ancestor} is not writable")
        return OutputDir(given, real, existed=False, **args)
    if not stat.S_ISDIR(st.st_mode):
        kind = "a file" if stat.S_ISREG(st.st_mode) else "not a folder"
        raise error(f"exists and is {kind}; expected a folder")
    which = inputs_.same(st) or inputs_.inside(os.fspath(real))
    if which is not None:
        raise error(f"holds an input of this run ({which}); not writing into it")
    if not os.access(real, os.W_OK | os.X_OK):
        raise error("is not writable")
    non_empty = any(real.iterdir())
    if non_empty or not allow_empty:
        if not force:
            raise error("already exists; pass --force to replace it")
        if non_empty and not _is_marked(real, marker):
            raise error(f"is a non-empty folder that is not {describe}; not replacing it")
    return OutputDir(given, real, existed=True, **args)


def write_file(directory: Union[OutputDir, PathLike], name: PathLike, data: Union[bytes, str], **check: Any) -> Path:
    """Write ``data`` to ``directory/name`` atomically; a plain path is checked first (``check``: of
    :func:`check_output_dir`). Prefer calling :meth:`OutputDir.write_file` on a folder checked up front."""
    out = directory if isinstance(directory, OutputDir) else check_output_dir(directory, **check)
    return out.write_file(name, data)


@contextlib.contextmanager
def atomic_directory(target: Union[OutputDir, PathLike], **check: Any) -> Iterator[Path]:
    """Fill a fresh folder beside the target; on success it replaces the target as a whole.

    ``target``: an :class:`OutputDir` from :func:`check_output_dir`, or a
    path checked now (``check``: its keyword arguments). The temporary
    folder is removed on an error (the old folder stays); an old folder is
    renamed aside, the new one renamed in, the old one removed. A replaced
    folder's permission bits are kept.
    """
    out = target if isinstance(target, OutputDir) else check_output_dir(target, **check)
    dest = out.path
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as e:
        raise out._error(f"cannot create a folder in {dest.parent} ({e.strerror or e})") from None
    try:
        yield tmp
        _sync_tree(tmp)
        st = stat_or_none(dest)
        if st is not None:
            # re-check: it may have changed during the work
            check_output_dir(dest, out._inputs, out.force, marker=out.marker, describe=out.describe,
                             option=out.option, allow_empty=out.allow_empty or out.existed)
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(old, dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.chmod(tmp, 0o777 & ~current_umask())
            os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(root)

