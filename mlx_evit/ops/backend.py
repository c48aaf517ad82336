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

import mlx.core as mx

__all__ = ["ENV_VAR", "MODES", "kernels_mode", "use_native", "default_device_is_gpu"]

ENV_VAR = "MLX_EVIT_KERNELS"
MODES = ("auto", "native", "cpu")


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
