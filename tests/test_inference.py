"""The optimised inference path (mlx_evit.tasks.inference) and the fast elementwise math it relies on.

* ``prepare(model)`` (BatchNorm folding, ``mx.compile`` with the state as an
  input, CPU batch split over streams) must compute what the eager, unfused
  model computes, for every family, and what timm computes (B0, M0).
* Half precision and quantization: size and logit deviation against float32
  stay within tolerances measured on these models (about 3x the largest
  deviation seen over several seeds).
* The CPU polynomials in mlx_evit.ops.cpu_kernels (exp, softmax, sigmoid, normal
  CDF and the activations built on them) and both paths of mlx_evit.ops.layers
  (MLX_EVIT_KERNELS=native|cpu) against float64 references.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from mlx_evit.ops import backend, cpu_kernels, layers
from mlx_evit.tasks import inference
from mlx_evit.tasks.inference import Predictor, parameter_bytes, prepare
from mlx_evit.models.registry import build_model
from mlx_evit.models.keymap import load_state_dict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# (registry name, build overrides, input side) -- small inputs keep the suite fast.
CASES = [
    ("efficientvit_b0", {}, 96),
    ("efficientvit_b1", {}, 64),
    ("efficientvit_l1", {}, 64),
    ("efficientvit_m0", {"img_size": 64}, 64),
    ("efficientvit_m4", {"img_size": 64}, 64),
    ("efficientvit_seed", {"num_classes": 10, "embed_dim": 32}, 64),
]


def _images(batch: int, side: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal((batch, side, side, 3)).astype(np.float32))


def _randomize_norms(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding them matters."""
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if isinstance(m, nn.BatchNorm):
            c = m.running_mean.shape[0]
            m.running_mean = mx.array(rng.normal(0, 0.2, c).astype(np.float32))
            m.running_var = mx.array(rng.uniform(0.5, 1.5, c).astype(np.float32))
            m.weight = mx.array(rng.uniform(0.5, 1.5, c).astype(np.float32))
            m.bias = mx.array(rng.normal(0, 0.2, c).astype(np.float32))


def _model(name: str, overrides: dict, seed: int = 0) -> nn.Module:
    mx.random.seed(seed)
    model = build_model(name, **overrides)
    _randomize_norms(model, seed)
    mx.eval(model.parameters())
    return model.eval()


def _twin(model: nn.Module, name: str, overrides: dict) -> nn.Module:
    """An independent copy (same weights) of ``model``."""
    other = build_model(name, **overrides)
    other.load_weights(list(tree_flatten(model.parameters())))
    return other.eval()


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ---------------------------------------------------------------------------
# The optimised path computes what the eager, unfused model computes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,overrides,side", CASES, ids=[c[0] for c in CASES])
def test_prepared_model_matches_eager_unfused(name, overrides, side):
    model = _model(name, overrides)
    x = _images(3, side)
    ref = np.array(model(x))
    predictor = prepare(_twin(model, name, overrides), compile=True)
    assert isinstance(predictor, Predictor) and predictor.compiled
    assert not any(isinstance(m, nn.BatchNorm) for _, m in predictor.model.named_modules())
    out = predictor(x)
    assert out.dtype == mx.float32 and out.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert _max_diff(out, ref) <= 1e-5 * scale + 1e-6, f"{name}: {_max_diff(out, ref):.2e} (max |logit| {scale:.2f})"
    # numpy input, a second batch size (retrace) and the 1-image path give the same rows
    np.testing.assert_allclose(np.array(predictor(np.array(x[:1]))), ref[:1], rtol=1e-5, atol=1e-5 * scale + 1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["efficientvit_b0", "efficientvit_m0"])
def test_prepared_model_matches_timm(variant):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from torch_utils import randomize_, state_dict_numpy, torch_forward

    torch.set_num_threads(2)
    torch.manual_seed(3)
    ref_model = randomize_(timm.create_model(variant, pretrained=False), seed=3)
    model = build_model(variant)
    load_state_dict(model, state_dict_numpy(ref_model))
    x = np.random.default_rng(5).standard_normal((2, 224, 224, 3)).astype(np.float32)
    ref = torch_forward(ref_model, x)
    out = np.array(prepare(model)(mx.array(x)))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_batch_split_over_streams_gives_each_image_alone():
    model = _model("efficientvit_b0", {})
    x = _images(5, 64, seed=1)
    twin = _twin(model, "efficientvit_b0", {})
    split = prepare(model, streams=2)  # an explicit count: always split that far
    together = np.array(split(x))
    assert split.streams == 2 and split.last_split == 2
    single = prepare(twin, streams=1)
    alone = np.concatenate([np.array(single(x[i : i + 1])) for i in range(5)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_default_split_is_chosen_by_timing_the_first_calls():
    model = _model("efficientvit_m0", {"img_size": 64})
    x = _images(4, 64, seed=2)
    ref = np.array(prepare(_twin(model, "efficientvit_m0", {"img_size": 64}), streams=1)(x))
    predictor = prepare(model)
    assert predictor.tune and predictor.streams == min(2, os.cpu_count() or 1)
    if predictor.streams < 2:
        pytest.skip("one CPU: nothing to split")
    used = []
    calls = 0
    while predictor.tuning(x):  # whole and split alternately, the last four timed: every call returns the answer
        # (OpenBLAS blocks a GEMM by its row count: half a batch may differ from the whole in the last bits)
        np.testing.assert_allclose(np.array(predictor(x)), ref, rtol=1e-5, atol=5e-6)
        used.append(predictor.last_split)
        calls += 1
    assert calls == 6 and used == [1, 2, 1, 2, 1, 2]
    assert not predictor.tuning(x[:1]) and predictor.tuning(x[:3])
    (key, choice), = predictor.split_plan.items()
    assert key[0] == (4, 64, 64, 3) and choice in (1, 2)
    predictor(x)
    assert predictor.last_split == choice
    predictor(x[:1])  # one image: nothing to split, nothing to try
    assert predictor.last_split == 1
    predictor(x[:3])  # a new shape starts its own trials
    assert predictor.last_split == 1 and len(predictor.split_plan) == 1


def test_batch_split_shares_the_blas_threads_and_restores_them():
    calls = []

    class FakeBLAS:
        threads = 2

        def get(self):
            return self.threads

        def set(self, n):
            calls.append(n)
            self.threads = n

    predictor = prepare(_model("efficientvit_b0", {}), streams=2)
    predictor._blas = FakeBLAS()
    predictor(_images(4, 64))
    assert calls == [1, 2] and predictor._blas.threads == 2
    calls.clear()
    predictor(_images(1, 64))  # one image: no split, BLAS untouched
    assert calls == []
    real = inference._OpenBLASThreads.open()
    if real is not None:  # the real OpenBLAS ends where it started
        before = real.get()
        prepare(_model("efficientvit_b0", {}), streams=2)(_images(2, 64))
        assert real.get() == before


def test_buffer_cache_limit_is_raised_never_lowered():
    original = mx.set_cache_limit(32 << 20)  # MLX's CPU default
    try:
        prepare(build_model("efficientvit_b0"))
        assert mx.set_cache_limit(8 << 30) == inference.CACHE_LIMIT  # raised to 1 GiB
        prepare(build_model("efficientvit_b0"))
        assert mx.set_cache_limit(32 << 20) == 8 << 30  # a larger limit is kept
        prepare(build_model("efficientvit_b0"), cache_limit=None)
        assert mx.set_cache_limit(32 << 20) == 32 << 20  # None: left alone
    finally:
        mx.set_cache_limit(original)


def test_weights_changed_after_prepare_are_used():
    """The compiled forward takes the model state as input: no stale, baked-in weights."""
    model = _model("efficientvit_b0", {})
    predictor = prepare(model)
    x = _images(1, 64)
    before = np.array(predictor(x))
    head = predictor.model.head.classifier[4]
    head.bias = head.bias + 1.0
    after = np.array(predictor(x))
    np.testing.assert_allclose(after, before + 1.0, rtol=1e-5, atol=1e-5)
    # a whole new set of weights, loaded the usual way
    other = _model("efficientvit_b0", {}, seed=7)
    predictor.model.load_weights(list(tree_flatten(prepare(other).model.parameters())))
    np.testing.assert_allclose(np.array(predictor(x)), np.array(other(x)), rtol=1e-5, atol=1e-5)


def test_msra_bias_tables_follow_dtype_and_weights():
    model = _model("efficientvit_m0", {"img_size": 64})
    x = _images(2, 64)
    ref = np.array(model(x))
    predictor = prepare(_twin(model, "efficientvit_m0", {"img_size": 64}), dtype="float16")
    cga = predictor.model.stages[0].blocks[0].mixer.m.attn
    assert cga._bias_cache[0] is cga.attention_biases  # cache refreshed after the cast
    assert cga.attention_biases.dtype == mx.float16
    assert _max_diff(predictor(x), ref) < 1e-2 * np.abs(ref).max()


def test_training_mode_after_prepare_is_refused():
    predictor = prepare(_model("efficientvit_b0", {}))
    predictor.model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        predictor(_images(1, 64))
    predictor.model.eval()
    assert predictor(_images(1, 64)).shape == (1, 1000)


def test_without_a_cpu_compiler_runs_eagerly(monkeypatch):
    model = _model("efficientvit_m0", {"img_size": 64})
    x = _images(2, 64)
    ref = np.array(prepare(_twin(model, "efficientvit_m0", {"img_size": 64}))(x))
    model = _twin(model, "efficientvit_m0", {"img_size": 64})
    monkeypatch.setattr(inference, "cpu_compile_available", lambda: False)
    predictor = prepare(model)
    assert not predictor.compiled
    np.testing.assert_allclose(np.array(predictor(x)), ref, rtol=1e-5, atol=1e-6)
    assert not prepare(model, compile=False).compiled


def test_cpu_compiles_only_once_the_job_repays_it(monkeypatch):
    """compile="auto" on the CPU: eager (no JIT compilation, fast first run) until the predictor
    has seen COMPILE_AFTER_PIXELS input pixels, compiled after; the answers do not change."""
    model = _model("efficientvit_m0", {"img_size": 64})
    x = _images(2, 64)
    ref = np.array(prepare(_twin(model, "efficientvit_m0", {"img_size": 64}), compile=False)(x))
    monkeypatch.setattr(inference, "COMPILE_AFTER_PIXELS", 3 * 2 * 64 * 64)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)  # the CPU policy, whatever the machine's default device
    try:
        predictor = prepare(_twin(model, "efficientvit_m0", {"img_size": 64}), streams=1)
        assert not predictor.compiled
        for call in range(4):
            np.testing.assert_allclose(np.array(predictor(x)), ref, rtol=1e-5, atol=1e-5)
            assert predictor.pixels_seen == (call + 1) * 2 * 64 * 64
            assert predictor.compiled == (call >= 2 and inference.cpu_compile_available()), call
        assert prepare(model, compile=True, streams=1).compiled == inference.cpu_compile_available()
    finally:
        mx.set_default_device(device)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(compile="yes"), "compile must be True, False or 'auto'"),
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(dtype=mx.int32), "dtype must be one of"),
        (dict(quantize=3), "quantize must be None or one of"),
        (dict(quantize=8, group_size=48), "group_size must be 32, 64 or 128"),
        (dict(streams=0), "streams must be a positive integer"),
        (dict(streams=True), "streams must be a positive integer"),
        (dict(cache_limit=-1), "cache_limit must be None or a number of bytes"),
    ],
)
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare(build_model("efficientvit_b0"), **kwargs)


def test_prepare_needs_a_module():
    with pytest.raises(TypeError, match="mlx.nn.Module"):
        prepare(lambda x: x)


# ---------------------------------------------------------------------------
# Half precision and quantization
# ---------------------------------------------------------------------------

# Relative deviation = max |logit diff| / max |logit| against the float32 eager model. Largest
# values measured over seeds 0-3 on these four models: float16 1.4e-3, bfloat16 1.4e-2,
# 8-bit 8.6e-3, 4-bit 0.12; the tolerances are about 3x those.
REL_TOL = {"float16": 4e-3, "bfloat16": 4e-2, "q8": 2.5e-2, "q4": 0.36}


@pytest.mark.parametrize("precision", list(REL_TOL))
@pytest.mark.parametrize("name,overrides,side", [CASES[0], CASES[2], CASES[4], CASES[5]],
                         ids=["b0", "l1", "m4", "seed"])
def test_lower_precision_deviation_and_size(name, overrides, side, precision):
    model = _model(name, overrides)
    x = _images(2, side)
    ref = np.array(model(x))
    full_size = parameter_bytes(prepare(_twin(model, name, overrides)).model)
    kwargs = dict(quantize=int(precision[1:])) if precision.startswith("q") else dict(dtype=precision)
    predictor = prepare(_twin(model, name, overrides), **kwargs)
    out = predictor(x)
    assert out.dtype == mx.float32
    out = np.array(out)
    assert np.isfinite(out).all()
    rel = _max_diff(out, ref) / np.abs(ref).max()
    assert rel <= REL_TOL[precision], f"{name} {precision}: relative deviation {rel:.2e}"
    assert rel > 1e-6, "lower precision gave float32 results: the option was ignored"
    size = parameter_bytes(predictor.model)
    if precision in ("float16", "bfloat16"):
        assert size == pytest.approx(full_size / 2, rel=0.01)
    else:
        bits = int(precision[1:])
        quantized = [m for _, m in predictor.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
        plain = [m for _, m in predictor.model.named_modules() if type(m) is nn.Linear]
        assert quantized and all(m.bits == bits for m in quantized)
        assert all(m.weight.shape[-1] % 64 for m in plain), "a Linear layer that fits the groups was not quantized"
        # Each quantized weight: `bits` bits, plus a float32 scale and bias per group of 64.
        shapes = [(m.weight.shape[0], m.weight.shape[1] * 32 // bits) for m in quantized]
        saved = sum(o * i * 4 - (o * i * bits // 8 + 2 * o * (i // 64) * 4) for o, i in shapes)
        assert size == full_size - saved and saved > 0.3 * full_size


def test_half_precision_parameters_have_the_requested_dtype():
    predictor = prepare(_model("efficientvit_b0", {}), dtype="bfloat16")
    floats = [v for _, v in tree_flatten(predictor.model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    assert floats and all(v.dtype == mx.bfloat16 for v in floats)
    assert predictor.dtype == mx.bfloat16


def test_default_dtype_is_the_models_own():
    model = _model("efficientvit_b0", {})
    x = _images(1, 64)
    ref = np.array(prepare(_twin(model, "efficientvit_b0", {}), dtype="float16")(x))
    model.set_dtype(mx.float16)  # e.g. loaded with convert.load(..., dtype="float16")
    predictor = prepare(model)
    assert predictor.dtype == mx.float16 and predictor.model.stem.in_conv.conv.weight.dtype == mx.float16
    out = predictor(x)  # float32 images are cast to the model's dtype; logits come back float32
    assert out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------
# Fast elementwise math (the CPU forms in mlx_evit.ops.layers)
# ---------------------------------------------------------------------------

_X = np.concatenate([
    np.linspace(-90.0, 90.0, 36001),
    np.random.default_rng(0).standard_normal(20000) * 4,
]).astype(np.float32)
_ERF = np.vectorize(math.erf)


def _phi_cdf(x):
    return 0.5 * (1.0 + _ERF(x / math.sqrt(2.0)))


@pytest.mark.parametrize("mode", ["native", "cpu"])
@pytest.mark.parametrize("compiled", [False, True])
def test_fast_exp_is_accurate(monkeypatch, mode, compiled):
    """Both paths clamp to [-88, 88] (finite at 89 and 90) and are accurate wherever float32 is normal."""
    monkeypatch.setenv("MLX_EVIT_KERNELS", mode)
    f = mx.compile(layers.exp) if compiled else layers.exp
    y = np.array(f(mx.array(_X)), dtype=np.float64)
    x = _X.astype(np.float64)
    ref = np.exp(np.clip(x, -88.0, 88.0))
    assert np.isfinite(y).all()
    ok = ref > 1e-37  # below that float32 is denormal (the CPU form flushes it to zero)
    rtol = 2e-7 if mode == "cpu" else 1e-5  # ours; MLX's own exp (about 4e-6 measured on its CPU backend)
    assert (np.abs(y - ref) / ref)[ok].max() < rtol
    assert (y[~ok] < 1e-37).all()
    assert np.isnan(np.array(layers.exp(mx.array([np.nan])))).all()


def test_fast_exp_gradient():
    x = mx.array([-3.0, -0.5, 0.0, 0.7, 5.0])
    np.testing.assert_allclose(np.array(mx.grad(lambda v: layers.exp(v).sum())(x)), np.exp(np.array(x)), rtol=1e-6)


@pytest.mark.parametrize(
    "fn,ref,atol",
    [
        (layers.sigmoid, lambda x: 1.0 / (1.0 + np.exp(-x)), 2e-7),
        (layers.normal_cdf, _phi_cdf, 3e-7),
        (layers.gelu, lambda x: x * _phi_cdf(x), 5e-7),
        (layers.gelu_tanh, lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))), 1e-6),
        (layers.elu_plus_one, lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0))), 1e-6),
    ],
    ids=["sigmoid", "normal_cdf", "gelu", "gelu_tanh", "elu_plus_one"],
)
@pytest.mark.parametrize("mode", ["native", "cpu"])
def test_activations_match_float64(monkeypatch, mode, fn, ref, atol):
    monkeypatch.setenv("MLX_EVIT_KERNELS", mode)
    x = _X[np.abs(_X) < 30]
    y = np.array(mx.compile(fn)(mx.array(x)), dtype=np.float64)
    r = ref(x.astype(np.float64))
    err = np.abs(y - r)
    assert (err <= atol * np.maximum(1.0, np.abs(r))).all(), f"max error {err.max():.2e} at x={x[err.argmax()]}"


def test_cpu_forms_agree_with_mlx_builtins():
    """The CPU module's forms agree with MLX's own functions, and are different code (whatever the device)."""
    x = mx.array(np.random.default_rng(1).standard_normal((64, 49)).astype(np.float32) * 3)
    builtins = {
        "exp": mx.exp,
        "softmax": lambda v: mx.softmax(v, axis=-1),
        "sigmoid": mx.sigmoid,
        "normal_cdf": lambda v: 0.5 * (1.0 + mx.erf(v / math.sqrt(2.0))),
        "gelu": nn.gelu,
        "gelu_tanh": nn.gelu_approx,
    }
    ours = {f: np.array(getattr(cpu_kernels, f)(x)) for f in builtins}
    theirs = {f: np.array(fn(x)) for f, fn in builtins.items()}
    for f in builtins:
        np.testing.assert_allclose(ours[f], theirs[f], rtol=2e-6, atol=1e-6, err_msg=f)
    # the CPU forms really are different code paths (not mx.exp in disguise)
    assert any(np.any(ours[f] != theirs[f]) for f in builtins)


@pytest.mark.parametrize("mode", ["native", "cpu"])
def test_layers_dispatch_on_the_switch(monkeypatch, mode):
    """MLX_EVIT_KERNELS picks the layer's form: the built-in under native, the CPU module's under cpu."""
    x = mx.array(np.random.default_rng(2).standard_normal((8, 33)).astype(np.float32) * 3)
    monkeypatch.setenv("MLX_EVIT_KERNELS", mode)
    expect = mx.sigmoid(x) if mode == "native" else cpu_kernels.sigmoid(x)
    np.testing.assert_array_equal(np.array(layers.sigmoid(x)), np.array(expect))
    conv = layers.DepthwiseConv2d(8, 3)
    xc = mx.array(np.random.default_rng(3).standard_normal((1, 5, 5, 8)).astype(np.float32))
    expect = (mx.conv2d(xc, conv.weight, padding=1, groups=8) if mode == "native"
              else cpu_kernels.depthwise_conv2d(xc, conv.weight, 1, conv.STRIDED_VIEW_MAX, conv.TAPS_PER_KERNEL))
    np.testing.assert_array_equal(np.array(conv(xc)), np.array(expect))


def test_bad_kernels_value_is_one_line_error(monkeypatch):
    monkeypatch.setenv("MLX_EVIT_KERNELS", "metal")
    with pytest.raises(ValueError, match=r"^MLX_EVIT_KERNELS='metal' is not one of auto, native, cpu$"):
        layers.exp(mx.array([1.0]))
    monkeypatch.setenv("MLX_EVIT_KERNELS", "auto")
    assert backend.use_native() == (mx.default_device().type == mx.DeviceType.gpu)


def test_softmax_rows_sum_to_one_and_handle_large_logits():
    x = mx.array([[1000.0, 999.0, -1000.0], [0.0, 0.0, 0.0], [-50.0, 20.0, 20.0]])
    y = np.array(layers.softmax(x, axis=-1))
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[0], [1 / (1 + math.exp(-1)), 1 / (1 + math.e), 0.0], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(y[1], [1 / 3] * 3, rtol=1e-6)


# ---------------------------------------------------------------------------
# The CPU formulations of the depthwise convolution
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (3, 2), (5, 1), (7, 1)])
@pytest.mark.parametrize("form", ["strided_view", "shifted"])
def test_depthwise_cpu_forms_equal_mlx_grouped_conv(monkeypatch, tmp_path, kernel_size, stride, form):
    """Both CPU forms (any taps-per-kernel split), eager, compiled and exported, equal ``mx.conv2d(groups=C)``."""
    rng = np.random.default_rng(kernel_size * 10 + stride)
    C = 12
    conv = layers.DepthwiseConv2d(C, kernel_size, stride=stride, bias=True)
    conv.weight = mx.array(rng.standard_normal(conv.weight.shape).astype(np.float32))
    conv.bias = mx.array(rng.standard_normal(C).astype(np.float32))
    x = mx.array(rng.standard_normal((2, 11, 9, C)).astype(np.float32))  # odd, non-square: edge taps matter
    p = kernel_size // 2
    ref = np.array(mx.conv2d(x, conv.weight, stride=stride, padding=p, groups=C) + conv.bias)
    monkeypatch.setenv("MLX_EVIT_KERNELS", "cpu")
    monkeypatch.setattr(layers.DepthwiseConv2d, "STRIDED_VIEW_MAX", 10**9 if form == "strided_view" else 0)
    for taps in (1, 3, 4, kernel_size * kernel_size):
        monkeypatch.setattr(layers.DepthwiseConv2d, "TAPS_PER_KERNEL", taps)
        for fn in (conv, mx.compile(lambda v: conv(v))):
            np.testing.assert_allclose(np.array(fn(x)), ref, rtol=1e-5, atol=1e-5, err_msg=f"taps={taps}")
    # The compiled forward pass survives export (examples/export.py; an unserialisable primitive
    # would fail here) and reimports exactly.
    monkeypatch.setattr(layers.DepthwiseConv2d, "TAPS_PER_KERNEL", 2)
    path = str(tmp_path / "dw.mlxfn")
    mx.export_function(path, mx.compile(lambda v: conv(v)), x)
    np.testing.assert_allclose(np.array(mx.import_function(path)(x)[0]), ref, rtol=1e-5, atol=1e-5)
    # Gradients through the CPU form equal those through MLX's grouped convolution.
    def loss(w, native):
        if native:
            y = mx.conv2d(x, w, stride=stride, padding=p, groups=C) + conv.bias
        else:
            conv.weight = w
            y = conv(x)
        return (y * y).sum()

    g_ref = mx.grad(lambda w: loss(w, True))(conv.weight)
    g_cpu = mx.grad(lambda w: loss(w, False))(conv.weight)
    np.testing.assert_allclose(np.array(g_cpu), np.array(g_ref), rtol=1e-4, atol=1e-4)
