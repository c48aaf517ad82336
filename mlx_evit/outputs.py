"""Write command outputs without destroying data: one module for every command.

Check the target first, before any long work, then write it::

    from mlx_evit.outputs import OutputError, check_output_file

    target = check_output_file(args.output, inputs=image_files, force=True)  # raises OutputError
    ...  # the long work
    target.write_text(report)                  # or: with target.open() as stream: stream.write(...)

Folders of outputs (one file per input, e.g. ``segment --output-dir``)::

    out = check_output_dir(args.output_dir, inputs=files, force=args.force)
    out.write_file("cat.png", png_bytes)        # each file atomic; missing folders created

A folder written as a whole and swapped into place (``convert OUT_DIR``)::

    out = check_output_dir(args.out_dir, inputs=[src], force=args.force, marker="config.json")
    with atomic_directory(out) as tmp:          # a fresh folder beside OUT_DIR
        (tmp / "config.json").write_text(...)   # renamed to OUT_DIR on success, removed on error

The rules (each is tested in ``tests/test_outputs.py``):

- ``"-"`` is standard output, as are ``/dev/stdout``, ``/dev/fd/1`` and
  ``/proc/self/fd/1`` (written to ``sys.stdout``); ``/dev/stderr``,
  ``/dev/fd/N`` write to that descriptor. Nothing is created or renamed.
- A symbolic link is written *through*: its target gets the content and
  the link stays (a dangling link creates its target, as the shell's ``>``
  does; for folders, a dangling link is refused).
- A character device (``/dev/null``, a terminal) or a FIFO is opened and
  written, never replaced by a file; a block device or a socket is refused.
- An input of the run is never written, whatever the name: the same file
  (device and inode) through a symbolic link or a hard link is refused; a
  folder replaced as a whole must not hold an input either.
- A replaced file keeps its permission bits (and its owner where allowed);
  a new file gets ``0o666`` less the umask. A file without any write
  permission bit, or one the process may not write, is refused.
- A file with more than one hard link is rewritten *in place* (every link
  sees the new content): the content is staged in a temporary file first,
  so a failed run leaves it untouched, but that final copy is not atomic.
- Everything else is atomic: a temporary file in the same folder, flushed,
  ``fsync``-ed, then ``os.replace``-d onto the target; on an error it is
  removed and the old file is untouched.
- Nothing existing is replaced without ``force=True``. (``classify -o``
  passes ``force=True``: a single results file has always been
  overwritten.) A non-empty folder needs ``force``, and with a ``marker``
  only a folder that passes it (one of this command's outputs) is replaced.

Every problem raises :class:`OutputError` (a :class:`ValueError`) with a
one-line message naming the path: ``--output photo.jpg: is an input of this
run (photo.jpg); not writing over it``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union

__all__ = [
    "STDOUT",
    "OutputError",
    "OutputTarget",
    "OutputSink",
    "OutputDir",
    "check_output_file",
    "check_output_dir",
    "write_file",
    "atomic_directory",
]

PathLike = Union[str, "os.PathLike[str]"]
STDOUT = "-"
"""The output name that means standard output."""

# Names of a process's own descriptors: written to the descriptor, never created or replaced.
_FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd|proc/%d/fd)/(\d+)$" % os.getpid())
_STD_NAMES = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


class OutputError(ValueError):
    """The output target cannot be written safely; the one-line message names the path and why."""


def _fail(option: str, path: Any, problem: str) -> OutputError:
    label = f"{option} {os.fspath(path)}" if option else os.fspath(path)
    return OutputError(" ".join(f"{label}: {problem}".split()))


def _stat(path: PathLike, follow: bool = True) -> Optional[os.stat_result]:
    try:
        return os.stat(path) if follow else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _umask() -> int:
    """The process umask, read without changing it where the system allows (threads may be running)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: PathLike) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system syncs folders
    finally:
        os.close(fd)


class _Inputs:
    """The inputs of a run, by identity (device, inode) and by real path."""

    def __init__(self, paths: Iterable[Any]):
        self.ids: dict[tuple[int, int], str] = {}
        self.real: list[tuple[str, str]] = []
        for p in paths or ():
            if p is None:
                continue
            name = os.fspath(p)
            if name == STDOUT:
                continue
            st = _stat(name)
            if st is None:
                continue
            self.ids.setdefault(_identity(st), name)
            self.real.append((os.path.realpath(name), name))

    def same(self, st: Optional[os.stat_result]) -> Optional[str]:
        """The input that is this very file, if any."""
        return None if st is None else self.ids.get(_identity(st))

    def inside(self, folder: str) -> Optional[str]:
        """An input that lies in (or is) the folder ``folder`` (a real path), if any."""
        prefix = folder.rstrip(os.sep) + os.sep
        for real, name in self.real:
            if real == folder or real.startswith(prefix):
                return name
        return None


# ---------------------------------------------------------------- single files


@dataclass
class OutputTarget:
    """A checked output file; made by :func:`check_output_file`.

    ``kind``: ``"stdout"``, ``"fd"`` (a descriptor of this process),
    ``"stream"`` (a character device or FIFO, opened and written), ``"new"``
    (created atomically), ``"replace"`` (an existing file replaced
    atomically, mode kept) or ``"inplace"`` (a hard-linked file rewritten in
    place). ``path``: the file really written (symbolic links resolved),
    ``None`` for stdout and descriptors.
    """

    given: str
    kind: str
    path: Optional[str] = None
    fd: Optional[int] = None
    force: bool = False
    option: str = "output"
    _inputs: _Inputs = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    _identity: Optional[tuple[int, int]] = field(default=None, repr=False, compare=False)

    @property
    def is_stream(self) -> bool:
        """True when the output goes to a stream (stdout, a descriptor, a terminal, a FIFO), not a file."""
        return self.kind in ("stdout", "fd", "stream")

    @property
    def is_stdout(self) -> bool:
        return self.kind == "stdout"

    def open(self, binary: bool = False, encoding: str = "utf-8", newline: Optional[str] = "") -> "OutputSink":
        """An :class:`OutputSink` to write to: ``commit()`` puts it in place, ``discard()`` drops it.

        As a context manager it commits on a normal exit and discards on an exception.
        """
        return OutputSink(self, binary, encoding, newline)

    def write_bytes(self, data: bytes) -> None:
        """Write ``data`` as the whole content (atomically where the target is a file)."""
        with self.open(binary=True) as sink:
            sink.stream.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        """Write ``text`` as the whole content (atomically where the target is a file)."""
        with self.open(encoding=encoding) as sink:
            sink.stream.write(text)

    def _error(self, problem: str) -> OutputError:
        return _fail(self.option, self.given, problem)

    def _recheck(self) -> os.stat_result | None:
        """Re-validate a file target just before it is replaced (it may have changed during the work)."""
        st = _stat(self.path)
        if st is None:
            return None  # (still) missing: create it
        if not stat.S_ISREG(st.st_mode):
            raise self._error("changed into something that is not a regular file while the work ran; not replacing it")
        which = self._inputs.same(st) if self._inputs else None
        if which is not None:
            raise self._error(f"is an input of this run ({which}); not writing over it")
        if self.kind == "new" and not self.force:
            raise self._error("was created by someone else while the work ran; pass --force to replace it")
        return st


class OutputSink:
    """An open output: write to ``stream``, then :meth:`commit` (or :meth:`discard`)."""

    def __init__(self, target: OutputTarget, binary: bool, encoding: str, newline: Optional[str]):
        self.target = target
        self.binary = binary
        self._tmp: Optional[str] = None
        self._done = False
        mode = "wb" if binary else "w"
        kind = target.kind
        if kind == "stdout":
            self.stream: IO[Any] = sys.stdout.buffer if binary else sys.stdout
            self._owned = False
            return
        if kind == "fd" and target.fd == 2 and not binary:
            self.stream, self._owned = sys.stderr, False
            return
        self._owned = True
        text = {} if binary else {"encoding": encoding, "newline": newline}
        if kind == "fd":
            if target.fd == 1:
                sys.stdout.flush()
            self.stream = io.open(os.dup(target.fd), mode, **text)
        elif kind == "stream":
            try:
                fd = os.open(target.path, os.O_WRONLY | getattr(os, "O_NOCTTY", 0))  # no O_CREAT, no O_TRUNC
            except OSError as e:
                raise target._error(f"cannot open for writing ({e.strerror or e})") from None
            self.stream = io.open(fd, mode, **text)
        else:
            directory, base = os.path.split(target.path)
            try:
                fd, self._tmp = tempfile.mkstemp(dir=directory or ".", prefix=f".{base}.", suffix=".tmp")
            except OSError as e:
                raise target._error(f"cannot create a file in {directory or '.'} ({e.strerror or e})") from None
            self.stream = io.open(fd, mode, **text)

    def __enter__(self) -> "OutputSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def commit(self) -> None:
        """Finish the output: flush a stream; put a file in place (atomically, mode kept)."""
        if self._done:
            return
        self._done = True
        target = self.target
        if self._tmp is None:
            self.stream.flush()
            if self._owned:
                self.stream.close()
            return
        try:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            st = target._recheck()
            if st is not None and st.st_nlink > 1:  # hard links: rewrite in place, every link sees it
                self._copy_into(target.path)
                os.unlink(self._tmp)
            else:
                if st is not None:
                    os.chmod(self._tmp, stat.S_IMODE(st.st_mode))
                    if (st.st_uid, st.st_gid) != _owner(self._tmp):
                        with contextlib.suppress(OSError):
                            os.chown(self._tmp, st.st_uid, st.st_gid)
                else:
                    os.chmod(self._tmp, 0o666 & ~_umask())
                os.replace(self._tmp, target.path)
                _fsync_dir(os.path.dirname(target.path) or ".")
        except BaseException as e:
            self._remove_tmp()
            if isinstance(e, OSError):
                raise target._error(f"cannot write ({e.strerror or e})") from None
            raise
        self._tmp = None

    def _copy_into(self, path: str) -> None:
        with open(self._tmp, "rb") as src:
            fd = os.open(path, os.O_WRONLY)
            try:
                size = 0
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        size += n
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        """Drop a file output (the old file stays as it was); a stream keeps what was written."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(Exception):
            if self._owned:
                self.stream.close()
            else:
                self.stream.flush()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self.stream.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None


def _owner(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid


def _descriptor(path: str) -> Optional[int]:
    """The descriptor a /dev/stdout-like name stands for, or None."""
    absolute = os.path.abspath(path)
    if absolute in _STD_NAMES:
        return _STD_NAMES[absolute]
    m = _FD_PATH.match(absolute)
    return int(m.group(1)) if m else None


def check_output_file(
    path: PathLike,
    inputs: Iterable[Any] = (),
    force: bool = False,
    *,
    option: str = "output",
) -> OutputTarget:
    """Validate an output file before the work; returns the :class:`OutputTarget` to write later.

    ``path``: a file name, ``"-"`` for stdout. ``inputs``: the run's input
    files and folders (missing ones are ignored); none of them is written.
    ``force``: replace an existing file. ``option``: how messages name the
    target (``"--output"``). Raises :class:`OutputError`.
    """
    given = os.fspath(path)
    inputs_ = inputs if isinstance(inputs, _Inputs) else _Inputs(inputs)

    def error(problem: str) -> OutputError:
        return _fail(option, given, problem)

    if given == "":
        raise _fail(option, "''", "empty file name")
    if given == STDOUT:
        return OutputTarget(given, "stdout", force=force, option=option, _inputs=inputs_)
    fd = _descriptor(given)
    if fd is not None:
        if fd == 0:
            raise error("is standard input")
        if fd == 1:
            return OutputTarget(given, "stdout", fd=1, force=force, option=option, _inputs=inputs_)
        try:
            os.fstat(fd)
        except OSError:
            raise error(f"descriptor {fd} is not open") from None
        return OutputTarget(given, "fd", fd=fd, force=force, option=option, _inputs=inputs_)
    if given.endswith(os.sep) or (os.altsep and given.endswith(os.altsep)):
        raise error("names a folder; expected a file name")

    lst = _stat(given, follow=False)
    st = _stat(given)
    if lst is not None and st is None and stat.S_ISLNK(lst.st_mode):
        real = os.path.realpath(given)  # a dangling link: create its target, as the shell does
        if _stat(real, follow=False) is not None:
            raise error("is a symbolic link that cannot be resolved")
    else:
        real = os.path.realpath(given) if lst is not None else os.path.abspath(given)

    if st is None:
        parent = os.path.dirname(real) or "."
        pst = _stat(parent)
        if pst is None:
            raise error(f"folder {parent} does not exist")
        if not stat.S_ISDIR(pst.st_mode):
            raise error(f"{parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise error(f"folder {parent} is not writable")
        return OutputTarget(given, "new", path=real, force=force, option=option, _inputs=inputs_)

    mode = st.st_mode
    which = inputs_.same(st)
    if which is not None:
        raise error(f"is an input of this run ({which}); not writing over it")
    if stat.S_ISDIR(mode):
        raise error("is a folder; expected a file")
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        if not os.access(given, os.W_OK):
            raise error("is not writable")
        return OutputTarget(given, "stream", path=given, force=force, option=option, _inputs=inputs_)
    if stat.S_ISBLK(mode):
        raise error("is a block device; refusing to write to it")
    if stat.S_ISSOCK(mode):
        raise error("is a socket; refusing to write to it")
    if not stat.S_ISREG(mode):
        raise error("is not a regular file; refusing to write to it")
    if not force:
        raise error("already exists; pass --force to replace it")
    if not (mode & 0o222) or not os.access(real, os.W_OK):
        raise error("is read-only; not replacing it")
    parent = os.path.dirname(real) or "."
    kind = "inplace" if st.st_nlink > 1 else "replace"
    if kind == "replace" and not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"folder {parent} is not writable")
    return OutputTarget(given, kind, path=real, force=force, option=option, _inputs=inputs_, _identity=_identity(st))


# ---------------------------------------------------------------- folders

Marker = Union[str, Callable[[Path], bool], None]


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
    _inputs: _Inputs = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    _written: set = field(default_factory=set, repr=False, compare=False)

    def _error(self, problem: str) -> OutputError:
        return _fail(self.option, self.given, problem)

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
    inputs_ = inputs if isinstance(inputs, _Inputs) else _Inputs(inputs)

    def error(problem: str) -> OutputError:
        return _fail(option, given, problem)

    if given in ("", STDOUT) or _descriptor(given) is not None:
        raise error("expected a folder name")
    lst = _stat(given, follow=False)
    st = _stat(given)
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
        st = _stat(dest)
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
            os.chmod(tmp, 0o777 & ~_umask())
            os.rename(tmp, dest)
        _fsync_dir(dest.parent)
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
        _fsync_dir(root)
