"""The one backend switch: MLX's built-in kernels or this package's CPU formulations.

Every layer in :mod:`mlx_evit.ops.layers` that has a CPU formulation (in
:mod:`mlx_evit.ops.cpu_kernels`) asks :func:`use_native` which one to run. The
environment variable ``MLX_EVIT_KERNELS`` chooses:

* ``auto`` (default): native when MLX's default device is a GPU (what runs on
  a Mac), the CPU formulations otherwise;
* ``native``: MLX's built-in ops on any device (lets a CPU-only machine test
  the code that runs on the Apple GPU);
* ``cpu``: the CPU formulations on any device.

A bad value is a one-line ``ValueError`` naming the variable. The variable
is read at every call (no state kept here), so the choice is
made at trace time under ``mx.compile`` and a test can set it with
``monkeypatch.setenv``.
"""

from __future__ import annotations

import os
from typing import Optional

import mlx.core as mx

__all__ = ["ENV_VAR", "MODES", "TF32_ENV_VAR", "kernels_mode", "use_native", "default_device_is_gpu",
           "tf32_requested", "float32_is_tf32", "exact_float32_on_cuda"]

ENV_VAR = "MLX_EVIT_KERNELS"
MODES = ("auto", "native", "cpu")
TF32_ENV_VAR = "MLX_ENABLE_TF32"


def kernels_mode() -> str:
    """The requested mode, ``"auto"``, ``"native"`` or ``"cpu"``; a bad value is a one-line ``ValueError``."""
    mode = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not one of {', '.join(MODES)}")
    return mode


def default_device_is_gpu() -> bool:
    """Whether MLX's default device is a GPU (the one device test of the package).

    Besides ``auto`` below, it decides what depends on the device rather than
    on the kernels: compiling without a C++ compiler, splitting a batch
    across CPU streams, compiling a training step.
    """
    return mx.default_device().type == mx.DeviceType.gpu


def use_native() -> bool:
    """True when layers should run MLX's built-in kernels, False for the CPU formulations."""
    mode = kernels_mode()
    return default_device_is_gpu() if mode == "auto" else mode == "native"


def tf32_requested(value: Optional[str]) -> bool:
    """Whether MLX allows TF32 for float32 GEMMs and convolutions, given ``MLX_ENABLE_TF32``'s value.

    MLX's rule: unset means on (the default ``1``); ``0`` turns it off; any
    other integer turns it on. A non-integer value is read as MLX's default (on).
    """
    if value is None or not value.strip():
        return True
    try:
        return int(value.strip()) != 0
    except ValueError:
        return True


def float32_is_tf32() -> bool:
    """True when float32 matmuls and convolutions on MLX's default device may run in TF32.

    The policy of this package (README, "GPU"): it leaves MLX's
    default alone. On CUDA (and Apple M5-class GPUs) MLX runs float32
    GEMMs and convolutions in TF32 unless ``MLX_ENABLE_TF32=0``: 7.5x the
    float32 GEMM rate on an H200 (378 against 50 TFLOP/s), with whole-model
    outputs about 1e-3 relative off true float32 (seg logits 4.8e-3, SAM
    embeddings 1.9e-3; measured on an H200, MLX 0.32.4). The CPU is always
    exact float32. Tests use this to pick their float32 or TF32 tolerance.
    """
    return default_device_is_gpu() and tf32_requested(os.environ.get(TF32_ENV_VAR))


def exact_float32_on_cuda() -> bool:
    """True on MLX's CUDA backend with TF32 switched off (``MLX_ENABLE_TF32=0``): exact float32 convolutions.

    In this mode MLX 0.32.4 crashes (an illegal memory access, a segfault
    of the process) on some dense 3x3 convolutions that its TF32 mode runs
    fine; :class:`mlx_evit.ops.layers.Conv2d` avoids them.
    """
    return default_device_is_gpu() and not mx.metal.is_available() and not float32_is_tf32()
