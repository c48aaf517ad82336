"""mlx_evit.ops.blas: MLX's GEMMs on a fast, checked BLAS whatever the import order (issue 13, item 8).

Each case runs in a fresh process (the binding is per process). Cases for a
library that this machine lacks (the system OpenBLAS, the scipy-openblas32
wheel of the ``blas`` extra) are skipped; .ci/run installs both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlx_evit.ops import blas as _blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX uses Accelerate on macOS")

SCRIPT = r"""
import json, os, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    if sys.argv[2] == "mlx-first":
        import mlx.core
    import mlx_evit
    from mlx_evit.ops import blas as _blas
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a = mx.array(rng.standard_normal((257, 300)).astype(np.float32))
w = mx.array(rng.standard_normal((300, 129)).astype(np.float32))
x = mx.array(rng.standard_normal((2, 17, 19, 24)).astype(np.float32))
k = mx.array(rng.standard_normal((32, 3, 3, 24)).astype(np.float32))
np.save(sys.argv[1] + "_mm.npy", np.array(a @ w))
np.save(sys.argv[1] + "_conv.npy", np.array(mx.conv2d(x, k, stride=2, padding=1)))
st = _blas.info()
from mlx_evit.tasks.inference import _OpenBLASThreads
threads = _OpenBLASThreads.open()
print(json.dumps({
    "route": st.route, "library": st.library, "prefix": st.prefix, "core": st.core,
    "detected": st.detected_core, "problem": st.problem, "loaded": st.library if st.fast else None,
    "bound": _blas._bound(_blas._MLXSlots()),
    "threads": threads.get() if threads else None,
    "warnings": [str(w.message) for w in caught if issubclass(w.category, _blas.SlowBLASWarning)],
}))
"""


def _run(tmp_path, tag: str, order: str = "evit-first", **env_values) -> tuple[dict, np.ndarray, np.ndarray]:
    env = {k: v for k, v in os.environ.items() if k not in (_blas.ENV, _blas.CORE_ENV, "OPENBLAS_CORETYPE")}
    env.update(env_values)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / tag), order], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return info, np.load(tmp_path / f"{tag}_mm.npy"), np.load(tmp_path / f"{tag}_conv.npy")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """MLX's own (reference) BLAS: the results every route must reproduce."""
    info, mm, conv = _run(tmp_path_factory.mktemp("ref"), "ref", MLX_EVIT_BLAS="0")
    assert info["route"] is None and info["loaded"] is None and info["warnings"] == []  # opted out: quiet
    assert "mlx_cpu.libs" in info["bound"]["cblas_sgemm"]
    return mm, conv


def _system() -> str | None:
    libs = _blas._system_libraries()
    return os.path.realpath(libs[0]) if libs else None


LIBRARIES = {"system": _system, "pip": _blas._pip_library}


def _assert_fast(info, library, mm, conv, reference):
    assert info["problem"] is None and info["route"] in ("preload", "got")
    assert info["library"] == library and info["loaded"] == library
    assert set(info["bound"].values()) == {library}  # every GEMM slot of libmlx calls it
    np.testing.assert_allclose(mm, reference[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(conv, reference[1], rtol=1e-5, atol=1e-4)
    assert info["threads"] and info["threads"] >= 1  # inference's OpenBLAS thread control finds it


@pytest.mark.parametrize("order", ["evit-first", "mlx-first"])
@pytest.mark.parametrize("which", ["system", "pip"])
def test_each_library_in_each_import_order(tmp_path, reference, which, order):
    library = LIBRARIES[which]()
    if library is None:
        pytest.skip(f"no {which} OpenBLAS here")
    library = os.path.realpath(library)
    info, mm, conv = _run(tmp_path, f"{which}-{order}", order, MLX_EVIT_BLAS=which)
    _assert_fast(info, library, mm, conv, reference)
    # mlx.core imported first (the natural order), or a prefixed library: libmlx's GOT is rewritten
    expect_got = order == "mlx-first" or info["prefix"] != ""
    assert info["route"] == ("got" if expect_got else "preload")
    assert info["warnings"] == []


def test_default_prefers_the_system_library(tmp_path, reference):
    info, mm, conv = _run(tmp_path, "default", "mlx-first")
    expected = _system() or _blas._pip_library()
    if expected is None:
        pytest.skip("no OpenBLAS here")
    _assert_fast(info, os.path.realpath(expected), mm, conv, reference)


def test_misdetected_core_is_switched_and_overrides_are_honoured(tmp_path, reference):
    library = _system()
    wanted = _blas.core_for(_blas.cpu_flags())
    if library is None or wanted is None:
        pytest.skip("needs the system OpenBLAS on an x86 CPU with AVX")
    info, *_ = _run(tmp_path, "keep", MLX_EVIT_BLAS="system", MLX_EVIT_BLAS_CORETYPE="keep")
    detected = info["detected"]
    assert info["core"] == detected
    info, mm, conv = _run(tmp_path, "auto", MLX_EVIT_BLAS="system")
    _assert_fast(info, library, mm, conv, reference)
    if _blas._tier(detected) < _blas._tier(wanted):  # e.g. Debian's 0.3.21 on an AVX-512 Xeon: Prescott
        assert info["core"].lower() == wanted.lower()
    else:
        assert info["core"] == detected
    info, mm, conv = _run(tmp_path, "forced", MLX_EVIT_BLAS="system", MLX_EVIT_BLAS_CORETYPE="Sandybridge")
    assert info["core"] == "Sandybridge"
    _assert_fast(info, library, mm, conv, reference)
    info, *_ = _run(tmp_path, "user", MLX_EVIT_BLAS="system", OPENBLAS_CORETYPE="Prescott")
    assert info["core"] == "Prescott"  # the user's OPENBLAS_CORETYPE is left alone


@pytest.mark.parametrize("order", ["evit-first", "mlx-first"])
def test_no_fast_library_warns_once_with_the_fix(tmp_path, reference, order):
    info, mm, conv = _run(tmp_path, f"none-{order}", order, MLX_EVIT_BLAS=str(tmp_path / "libnothing.so"))
    assert info["route"] is None and info["loaded"] is None
    (message,) = info["warnings"]
    assert "\n" not in message and "reference BLAS" in message and 'pip install "mlx_evit[blas]"' in message
    assert ("imported before mlx_evit" in message) == (order == "mlx-first")
    assert "mlx_cpu.libs" in info["bound"]["cblas_sgemm"]
    np.testing.assert_allclose(mm, reference[0], rtol=1e-5, atol=1e-4)


FAILING_CHECK = r"""
import warnings, json
import mlx_evit
from mlx_evit.ops import blas as _blas
before = _blas._bound(_blas._MLXSlots())
_blas._STATE = None
_blas.gemm_check = lambda lib, sizes=None: "sgemm is off by 1e+00 (relative)"  # a library that computes wrongly
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    st = _blas.setup()
print(json.dumps({"before": before, "after": _blas._bound(_blas._MLXSlots()), "route": st.route,
                  "warnings": [str(w.message) for w in caught]}))
"""


def test_a_library_failing_its_self_check_is_not_used(tmp_path):
    if _blas._pip_library() is None and _system() is None:
        pytest.skip("no OpenBLAS here")
    out = subprocess.run([sys.executable, "-c", FAILING_CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert "mlx_cpu.libs" not in info["before"]["cblas_sgemm"]  # it was fast
    assert info["route"] is None and "mlx_cpu.libs" in info["after"]["cblas_sgemm"]  # back on the reference
    (message,) = info["warnings"]
    assert "off by" in message


def test_core_for_cpu_features():
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx2", "fma", "avx"}
    assert _blas.core_for(avx512) == "SkylakeX"
    assert _blas.core_for({"avx2", "fma", "avx"}) == "Haswell"
    assert _blas.core_for({"avx", "sse4_2"}) == "Sandybridge"
    assert _blas.core_for({"sse3"}) is None
    assert _blas._tier("Prescott") < _blas._tier("Haswell") < _blas._tier("SkylakeX")


def test_got_slots_of_libmlx():
    import mlx.core  # noqa: F401

    slots = _blas._MLXSlots()
    assert set(slots.addresses) == set(_blas.SYMBOLS)
    assert all(v for v in slots.current().values())
