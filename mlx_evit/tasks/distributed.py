"""Running under ``mlx.launch``: ranks that agree, fail together, and never hang.

:class:`Ranks` wraps an ``mx.distributed`` group (size 1 when the program is
not launched, so the same code runs alone) with the three things a
data-parallel command needs besides ``all_sum``:

* :meth:`Ranks.check`: every rank says whether it failed; if one did, all
  of them learn which and stop (:class:`RankFailure`) before anything is
  written. ``mlx.launch`` exits 0 even when a rank dies, so the commands
  must not rely on it for the outcome.
* a timeout on every collective (``timeout`` seconds, a heartbeat at each
  synchronisation point): a rank that waits longer for the others prints
  why and exits (:data:`EXIT_RANK_FAILED`); a lost connection (a peer that
  died) becomes a :class:`RankFailure` too.
* a message on SIGTERM (how ``mlx.launch`` stops the other ranks when one
  exits with an error), instead of a silent death.

Used by ``python -m mlx_evit.evaluate`` and ``examples/finetune.py``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

import numpy as np

import mlx.core as mx

__all__ = ["Ranks", "RankFailure", "EXIT_RANK_FAILED", "DEFAULT_TIMEOUT", "shard_bounds"]

EXIT_RANK_FAILED = 4
"""Exit status of a rank that stops because another rank failed, hung or was lost."""

DEFAULT_TIMEOUT = 600.0
"""Seconds a rank waits for the others at one synchronisation point."""


class RankFailure(RuntimeError):
    """Another rank failed (or its connection was lost); the message names it."""


def shard_bounds(n: int, parts: int, part: int) -> tuple[int, int]:
    """``[lo, hi)`` of ``part`` when ``n`` items are cut into ``parts`` contiguous pieces (sizes differ by <= 1)."""
    return (n * part) // parts, (n * (part + 1)) // parts


class Ranks:
    """The ranks of this run (``mx.distributed.init()``; one rank when not launched).

    ``timeout``: seconds a collective may wait for the other ranks before
    this rank gives up (printing a message naming the command and the wait,
    exit status :data:`EXIT_RANK_FAILED`). ``prog``: the name in messages.
    With more than one rank, SIGTERM prints why this rank stops.
    """

    def __init__(self, group: Optional[mx.distributed.Group] = None, *, timeout: float = DEFAULT_TIMEOUT,
                 prog: str = "mlx_evit"):
        if group is None:
            group = mx.distributed.init()
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.group = group
        self.rank = int(group.rank())
        self.size = int(group.size())
        self.timeout = float(timeout)
        self.prog = prog
        if self.size > 1:
            _message_on_sigterm(self._stop_message("terminated by the launcher (SIGTERM): another rank failed, "
                                                   "see its message"))

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, size={self.size})"

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self) -> str:
        """``"1 rank"`` / ``"2 ranks"``."""
        return f"{self.size} rank" + ("" if self.size == 1 else "s")

    def _stop_message(self, why: str) -> str:
        return f"{self.prog}: rank {self.rank}: error: {why}; stopping, nothing written\n"

    # -- collectives

    def all_sum(self, array: np.ndarray) -> np.ndarray:
        """Sum of ``array`` over the ranks (numpy in, numpy out; a copy when alone).

        Raises :class:`RankFailure` when a peer's connection is lost; exits the
        process when the others do not answer within ``timeout``.
        """
        array = np.ascontiguousarray(array)
        if self.size == 1:
            return array.copy()
        timer = threading.Timer(self.timeout, self._timed_out)
        timer.daemon = True
        timer.start()
        try:
            out = mx.distributed.all_sum(mx.array(array), group=self.group, stream=mx.cpu)
            mx.eval(out)
        except RuntimeError as e:
            raise RankFailure(f"lost the connection to another rank ({' '.join(str(e).split())}); "
                              "it probably died, see its message") from None
        finally:
            timer.cancel()
        return np.array(out)

    def _timed_out(self) -> None:
        os.write(2, self._stop_message(f"no answer from the other ranks within {self.timeout:g} s "
                                       "(a rank died or hangs)").encode())
        os._exit(EXIT_RANK_FAILED)

    def check(self, error: Optional[str] = None) -> None:
        """A synchronisation point: raise :class:`RankFailure` if any rank reports an error.

        Every rank must call it at the same points. ``error``: this rank's
        problem (already reported by it), or None.
        """
        if self.size == 1:
            if error:
                raise RankFailure(error)
            return
        flags = np.zeros(self.size, np.int32)
        flags[self.rank] = 1 if error else 0
        failed = np.flatnonzero(self.all_sum(flags)).tolist()
        if failed:
            names = ", ".join(map(str, failed))
            raise RankFailure(f"rank{'s' if len(failed) > 1 else ''} {names} failed"
                              + ("" if error else " (see its message)"))

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order (on every rank)."""
        if self.size == 1:
            return [bytes(data)]
        lengths = np.zeros(self.size, np.int64)
        lengths[self.rank] = len(data)
        lengths = self.all_sum(lengths.astype(np.int32)).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        buffer = np.zeros(max(int(offsets[-1]), 1), np.uint8)
        buffer[offsets[self.rank] : offsets[self.rank + 1]] = np.frombuffer(data, np.uint8)
        # uint8 sums of one non-zero contribution per byte are exact; int32 keeps the ring backend's types common.
        total = self.all_sum(buffer.astype(np.int32)).astype(np.uint8)
        return [total[offsets[r] : offsets[r + 1]].tobytes() for r in range(self.size)]


_SIGTERM_LOCK = threading.Lock()
_SIGTERM_MESSAGE: list[str] = []


def _message_on_sigterm(message: str) -> None:
    """On SIGTERM: write ``message`` to stderr and exit :data:`EXIT_RANK_FAILED`, even mid-collective.

    The signal's byte goes to a wakeup pipe read by a watcher thread (Python
    handlers only run on the main thread, which may be blocked in MLX).
    Only possible from the main thread; elsewhere SIGTERM keeps its default.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    with _SIGTERM_LOCK:
        if _SIGTERM_MESSAGE:
            _SIGTERM_MESSAGE[0] = message
            return
        _SIGTERM_MESSAGE.append(message)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the watcher does the work
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

        def watch() -> None:
            while True:
                data = os.read(read_fd, 64)
                if not data:
                    return
                if signal.SIGTERM in data:
                    try:
                        sys.stderr.flush()
                    except Exception:
                        pass
                    os.write(2, _SIGTERM_MESSAGE[0].encode())
                    os._exit(EXIT_RANK_FAILED)

        threading.Thread(target=watch, name="sigterm-message", daemon=True).start()
