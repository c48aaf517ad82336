"""Float32 or TF32 tolerance for the parity tests (tests only).

On MLX's CPU device, and on a GPU with ``MLX_ENABLE_TF32=0``, float32 is
exact and every test keeps the tolerance it states. On a GPU where MLX may
run float32 GEMMs and convolutions in TF32 (its default on CUDA;
:func:`mlx_evit.ops.backend.float32_is_tf32`), a parity test's
``np.testing.assert_allclose`` is widened to at least :data:`TF32_REL`:
relative ``rtol`` and an absolute floor of ``TF32_REL * max |desired|``;
tests that compare with their own asserts take their bound through
:func:`tol`, which does the same for one number.
The bound is 2x the largest whole-model deviation measured on an H200 with
TF32 on (seg logits 4.8e-3 of their range; classification about 1e-3, SAM
embeddings 1.9e-3); measured again on an H200 with MLX 0.32.4 (this
wave's parity run under TF32): the largest deviation of any parity test was
5.8e-3 of the reference's range (SAM-L0 decoder low-res logits).
"""

from __future__ import annotations

import numpy as np

from mlx_evit.ops.backend import float32_is_tf32

TF32_REL = 1e-2
"""Relative tolerance (of the reference's largest magnitude) of a parity comparison under TF32."""


def tol(value: float) -> float:
    """A parity test's own relative bound ``value``: itself where float32 is exact, at least :data:`TF32_REL` under TF32."""
    return max(value, TF32_REL) if float32_is_tf32() else value


def parity_tolerance(rtol: float, atol: float, desired_max: float, tf32: bool) -> tuple[float, float]:
    """``(rtol, atol)`` to use: the stated ones when float32 is exact, never less than the TF32 bound under TF32."""
    if not tf32:
        return rtol, atol
    return max(rtol, TF32_REL), max(atol, TF32_REL * float(desired_max))


def tf32_assert_allclose(original):
    """``assert_allclose`` with the TF32 tolerance applied (what the conftest installs under TF32)."""

    def assert_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
        desired_arr = np.asarray(desired)
        peak = float(np.abs(desired_arr).max()) if desired_arr.size and desired_arr.dtype.kind in "fc" else 0.0
        rtol, atol = parity_tolerance(rtol, atol, peak, tf32=True)
        return original(actual, desired, rtol, atol, *args, **kwargs)

    return assert_allclose
