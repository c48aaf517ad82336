"""Single output files: :func:`check_output_file` before the work, then an atomic write (rules in
:mod:`mlx_evit.outputs`)."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any, Optional

from mlx_evit.outputs.paths import (STDOUT, InputSet, OutputError, PathLike, FD_PATH, STD_NAMES, current_umask,
                                    fail, file_identity, fsync_dir, stat_or_none)

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
    _inputs: InputSet = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    file_identity: Optional[tuple[int, int]] = field(default=None, repr=False, compare=False)

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
        return fail(self.option, self.given, problem)

    def _recheck(self) -> os.stat_result | None:
        """Re-validate a file target just before it is replaced (it may have changed during the work)."""
        st = stat_or_none(self.path)
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
                    os.chmod(self._tmp, 0o666 & ~current_umask())
                os.replace(self._tmp, target.path)
                fsync_dir(os.path.dirname(target.path) or ".")
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


def descriptor(path: str) -> Optional[int]:
    """The descriptor a /dev/stdout-like name stands for, or None."""
    absolute = os.path.abspath(path)
    if absolute in STD_NAMES:
        return STD_NAMES[absolute]
    m = FD_PATH.match(absolute)
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
    inputs_ = inputs if isinstance(inputs, InputSet) else InputSet(inputs)

    def error(problem: str) -> OutputError:
        return fail(option, given, problem)

    if given == "":
        raise fail(option, "''", "empty file name")
    if given == STDOUT:
        return OutputTarget(given, "stdout", force=force, option=option, _inputs=inputs_)
    fd = descriptor(given)
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

    lst = stat_or_none(given, follow=False)
    st = stat_or_none(given)
    if lst is not None and st is None and stat.S_ISLNK(lst.st_mode):
        real = os.path.realpath(given)  # a dangling link: create its target, as the shell does
        if stat_or_none(real, follow=False) is not None:
            raise error("is a symbolic link that cannot be resolved")
    else:
        real = os.path.realpath(given) if lst is not None else os.path.abspath(given)

    if st is None:
        parent = os.path.dirname(real) or "."
        pst = stat_or_none(parent)
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
    return OutputTarget(given, kind, path=real, force=force, option=option, _inputs=inputs_,
                        file_identity=file_identity(st))
