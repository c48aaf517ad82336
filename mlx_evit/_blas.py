"""Use an optimized system BLAS for MLX's CPU backend on Linux.

The ``mlx-cpu`` wheel bundles the reference (netlib) BLAS, about 20-30x
slower at GEMM than OpenBLAS. If the system has OpenBLAS and ``mlx.core`` is
not imported yet, loading it with ``RTLD_GLOBAL`` first makes MLX's
``cblas_sgemm`` calls resolve to it. Results agree with the reference BLAS to
float32 round-off (tested). Set ``MLX_EVIT_BLAS=0`` to opt out, or to the
path of another CBLAS library to use that one. Nothing happens on macOS
(MLX uses Accelerate there) or once ``mlx.core`` has been imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def preload_blas() -> str | None:
    """Load an optimized BLAS before MLX; returns its path, or ``None`` if not loaded."""
    choice = os.environ.get("MLX_EVIT_BLAS", "")
    if choice == "0" or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return None
    paths = [choice] if choice and choice != "1" else list(CANDIDATES)
    if not choice:
        found = ctypes.util.find_library("openblas")
        if found:
            paths.append(found)
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return path
    return None


LOADED = preload_blas()
