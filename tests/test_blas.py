"""The OpenBLAS preload changes speed, not results."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = r"""
import json, sys
import mlx_evit, mlx_evit._blas as b
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a = mx.array(rng.standard_normal((257, 300)).astype(np.float32))
w = mx.array(rng.standard_normal((300, 129)).astype(np.float32))
x = mx.array(rng.standard_normal((2, 17, 19, 24)).astype(np.float32))
k = mx.array(rng.standard_normal((32, 3, 3, 24)).astype(np.float32))
np.save(sys.argv[1] + "_mm.npy", np.array(a @ w))
np.save(sys.argv[1] + "_conv.npy", np.array(mx.conv2d(x, k, stride=2, padding=1)))
print(json.dumps({"loaded": b.LOADED, "maps": open("/proc/self/maps").read()}))
"""


def _run(tmp_path, env_value, tag):
    env = dict(os.environ)
    env.pop("MLX_EVIT_BLAS", None)
    if env_value is not None:
        env["MLX_EVIT_BLAS"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / tag)], env=env, capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return info, np.load(tmp_path / f"{tag}_mm.npy"), np.load(tmp_path / f"{tag}_conv.npy")


def test_preload_is_optional_and_exact(tmp_path):
    off, mm_ref, conv_ref = _run(tmp_path, "0", "off")
    assert off["loaded"] is None  # opt-out respected
    on, mm, conv = _run(tmp_path, None, "on")
    if on["loaded"] is None:
        pytest.skip("no system OpenBLAS on this machine")
    np.testing.assert_allclose(mm, mm_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(conv, conv_ref, rtol=1e-5, atol=1e-4)
    # the library really is in the process only when enabled
    real = os.path.realpath(on["loaded"])
    assert real in on["maps"] and real not in off["maps"]
