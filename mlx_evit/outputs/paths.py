"""What the output modules share: the error type, path checks by identity, the inputs of a run."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]
STDOUT = "-"
"""The output name that means standard output."""

# Names of a process's own descriptors: written to the descriptor, never created or replaced.
FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd|proc/%d/fd)/(\d+)$" % os.getpid())
STD_NAMES = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


class OutputError(ValueError):
    """The output target cannot be written safely; the one-line message names the path and why."""


def fail(option: str, path: Any, problem: str) -> OutputError:
    label = f"{option} {os.fspath(path)}" if option else os.fspath(path)
    return OutputError(" ".join(f"{label}: {problem}".split()))


def stat_or_none(path: PathLike, follow: bool = True) -> Optional[os.stat_result]:
    try:
        return os.stat(path) if follow else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def file_identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def current_umask() -> int:
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


def fsync_dir(directory: PathLike) -> None:
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


class InputSet:
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
            st = stat_or_none(name)
            if st is None:
                continue
            self.ids.setdefault(file_identity(st), name)
            self.real.append((os.path.realpath(name), name))

    def same(self, st: Optional[os.stat_result]) -> Optional[str]:
        """The input that is this very file, if any."""
        return None if st is None else self.ids.get(file_identity(st))

    def inside(self, folder: str) -> Optional[str]:
        """An input that lies in (or is) the folder ``folder`` (a real path), if any."""
        prefix = folder.rstrip(os.sep) + os.sep
        for real, name in self.real:
            if real == folder or real.startswith(prefix):
                return name
        return None


