"""The per-backend formulations chosen for the GPU path (issue 21), and the TF32 tolerance policy.

Each formulation is checked against an independent float64 reference in both
kernel modes, and the native path is checked not to fall back to the slow
generic kernel it replaces.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

import precision
from mlx_evit.ops import backend, layers
from mlx_evit.ops.resampling import resize, resize_by_matrix, resize_matrix, source_taps
from mlx_evit.models.mit import LiteMLA

MODES = ("native", "cpu")


def _grouped_conv_ref(x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    """float64 grouped 1x1 convolution, NHWC, weight (O, 1, 1, C / groups)."""
    B, H, W, C = x.shape
    O = w.shape[0]
    xg = x.astype(np.float64).reshape(B, H, W, groups, C // groups)
    wg = w.astype(np.float64).reshape(groups, O // groups, C // groups)
    return np.einsum("bhwgc,goc->bhwgo", xg, wg).reshape(B, H, W, O)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,out,groups", [((2, 3, 5, 12), 12, 3), ((1, 4, 4, 8), 16, 4), ((3, 1, 7, 6), 6, 6)])
def test_grouped_pointwise_equals_the_grouped_convolution(monkeypatch, mode, shape, out, groups):
    monkeypatch.setenv("MLX_EVIT_KERNELS", mode)
    layer = layers.GroupedPointwise(shape[-1], out, groups)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = _grouped_conv_ref(x, np.asarray(layer.weight), groups)
    got = np.asarray(layer(mx.array(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # per_group: (B, groups, H * W, O / groups), group g holding output channels g * O/groups ...
    per = np.asarray(layer.per_group(mx.array(x)))
    B, H, W, _ = shape
    np.testing.assert_allclose(per, want.reshape(B, H * W, groups, -1).transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_litemla_runs_no_grouped_convolution(monkeypatch, mode):
    """Only dense (groups 1) or depthwise (groups == channels) mx.conv2d calls: the grouped 1x1 is a matmul."""
    monkeypatch.setenv("MLX_EVIT_KERNELS", mode)
    calls = []
    real = mx.conv2d

    def recording(x, w, *args, groups=1, **kwargs):
        calls.append((x.shape[-1], groups))
        return real(x, w, *args, groups=groups, **kwargs)

    monkeypatch.setattr(mx, "conv2d", recording)
    attn = LiteMLA(64, 16, eps=1e-5, norm_eps=1e-5)
    mx.eval(attn(mx.array(np.random.default_rng(1).standard_normal((2, 6, 5, 64)).astype(np.float32))))
    grouped = [(c, g) for c, g in calls if 1 < g < c]
    assert not grouped, f"grouped mx.conv2d calls (channels, groups): {grouped}"
    if mode == "native":
        assert calls, "the depthwise aggregation should still be MLX's conv2d on the native path"


def _litemla_ref(attn: LiteMLA, x: np.ndarray) -> np.ndarray:
    """The reference formulation (concatenated scales, ones column) in float64 numpy, unfused weights."""
    d, eps = attn.dim, attn.eps
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    B, H, W, C = x.shape
    qkv = f64(x) @ f64(attn.qkv.conv.weight).T
    dw, pw = attn.aggreg[0]
    k = dw.kernel_size
    pad = np.pad(qkv, ((0, 0), (k // 2,) * 2, (k // 2,) * 2, (0, 0)))
    wdw = f64(dw.weight)[..., 0]  # (C, k, k)
    agg = sum(pad[:, i : i + H, j : j + W] * wdw[:, i, j] for i in range(k) for j in range(k))
    agg = _grouped_conv_ref(agg, f64(pw.weight), pw.groups)
    t = np.concatenate([qkv, agg], -1).reshape(B, H * W, -1, 3 * d).transpose(0, 2, 1, 3)
    q, kk, v = np.maximum(t[..., :d], 0), np.maximum(t[..., d : 2 * d], 0), t[..., 2 * d :]
    vp = np.concatenate([v, np.ones(v.shape[:-1] + (1,))], -1)
    out = q @ (kk.swapaxes(-1, -2) @ vp)
    out = out[..., :-1] / (out[..., -1:] + eps)
    out = out.transpose(0, 2, 1, 3).reshape(B, H, W, -1)
    bn = attn.proj.norm
    y = out @ f64(attn.proj.conv.weight).T
    return (y - f64(bn.running_mean)) / np.sqrt(f64(bn.running_var) + bn.eps) * f64(bn.weight) + f64(bn.bias)


@pytest.mark.parametrize("mode", MODES)
def test_litemla_equals_the_reference_formulation(monkeypatch, mode):
    monkeypatch.setenv("MLX_EVIT_KERNELS", mode)
    attn = LiteMLA(64, 16, eps=1e-5, norm_eps=1e-5)
    attn.eval()
    x = np.random.default_rng(2).standard_normal((2, 6, 5, 64)).astype(np.float32)
    want = _litemla_ref(attn, x)
    np.testing.assert_allclose(np.asarray(attn(mx.array(x))), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel,stride,bias", [(1, 1, True), (1, 1, False), (2, 2, True), (3, 1, True)])
def test_conv2d_forms_equal_mlx_conv2d(monkeypatch, mode, kernel, stride, bias):
    """layers.Conv2d (1x1 as a GEMM on every device, im2col on the CPU) equals nn.Conv2d's mx.conv2d."""
    monkeypatch.setenv("MLX_EVIT_KERNELS", mode)
    conv = layers.Conv2d(6, 10, kernel, stride, padding=0 if kernel < 3 else 1, bias=bias)
    x = mx.array(np.random.default_rng(3).standard_normal((2, 8, 6, 6)).astype(np.float32))
    want = mx.conv2d(x, conv.weight, stride=stride, padding=0 if kernel < 3 else 1)
    if bias:
        want = want + conv.bias
    np.testing.assert_allclose(np.asarray(conv(x)), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_runs_in_output_chunks_on_exact_float32_cuda(monkeypatch, bias, stride):
    """With exact float32 on CUDA (where MLX 0.32.4 crashes on wide 3x3 convolutions), layers.Conv2d runs
    chunks of CUDA_FLOAT32_MAX_OUT output channels; the result equals the whole convolution."""
    monkeypatch.setenv("MLX_EVIT_KERNELS", "native")
    conv = layers.Conv2d(5, 11, 3, stride, padding=1, bias=bias)
    monkeypatch.setattr(layers.Conv2d, "CUDA_FLOAT32_MAX_OUT", 4)
    x = mx.array(np.random.default_rng(4).standard_normal((2, 7, 6, 5)).astype(np.float32))
    want = np.asarray(mx.conv2d(x, conv.weight, stride=stride, padding=1) + (conv.bias if bias else 0))
    calls = []
    original = mx.conv2d
    monkeypatch.setattr(mx, "conv2d", lambda *a, **k: calls.append(a[1].shape[0]) or original(*a, **k))
    monkeypatch.setattr(layers, "exact_float32_on_cuda", lambda: True)
    np.testing.assert_allclose(np.asarray(conv(x)), want, rtol=1e-5, atol=1e-5)
    assert calls == [4, 4, 3]
    calls.clear()
    monkeypatch.setattr(layers, "exact_float32_on_cuda", lambda: False)
    np.testing.assert_allclose(np.asarray(conv(x)), want, rtol=1e-5, atol=1e-5)
    assert calls == [11]


def test_exact_float32_on_cuda_needs_a_non_metal_gpu_with_tf32_off(monkeypatch):
    monkeypatch.setenv("MLX_ENABLE_TF32", "0")
    monkeypatch.setattr(backend, "default_device_is_gpu", lambda: False)
    assert not backend.exact_float32_on_cuda()
    monkeypatch.setattr(backend, "default_device_is_gpu", lambda: True)
    assert backend.exact_float32_on_cuda() is (not mx.metal.is_available())
    monkeypatch.delenv("MLX_ENABLE_TF32")
    assert not backend.exact_float32_on_cuda()


# ---------------------------------------------------------------------------
# Resize matrices (torch's rule) in ops.resampling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("n_in,n_out", [(16, 64), (32, 64), (7, 5), (4, 9)])
def test_resize_matrix_is_the_taps_and_resize_by_matrix_equals_resize(mode, n_in, n_out):
    m = resize_matrix(n_in, n_out, mode)
    idx, w = source_taps(n_in, n_out, mode)
    np.testing.assert_allclose(m.sum(1), w.sum(1), atol=1e-6)
    row = np.zeros(n_in, np.float32)
    for j in range(idx.shape[1]):
        np.add.at(row, idx[0, j], w[0, j])
    np.testing.assert_array_equal(m[0], row)
    x = mx.array(np.random.default_rng(4).standard_normal((2, n_in, n_in + 1, 3)).astype(np.float32))
    size = (n_out, n_out + 2)
    np.testing.assert_allclose(np.asarray(resize_by_matrix(x, size, mode)), np.asarray(resize(x, size, mode)),
                               atol=2e-6)


# ---------------------------------------------------------------------------
# TF32 policy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value,on", [(None, True), ("", True), ("1", True), ("2", True), ("0", False),
                                      (" 0 ", False), ("yes", True)])
def test_tf32_requested_follows_mlx_rule(value, on):
    assert backend.tf32_requested(value) is on


def test_float32_is_tf32_only_on_a_gpu_with_tf32_allowed(monkeypatch):
    monkeypatch.delenv("MLX_ENABLE_TF32", raising=False)
    assert backend.float32_is_tf32() is (mx.default_device().type == mx.DeviceType.gpu)
    monkeypatch.setattr(backend, "default_device_is_gpu", lambda: False)
    assert not backend.float32_is_tf32()  # the CPU is exact float32 whatever the variable says
    monkeypatch.setattr(backend, "default_device_is_gpu", lambda: True)
    assert backend.float32_is_tf32()
    monkeypatch.setenv("MLX_ENABLE_TF32", "0")
    assert not backend.float32_is_tf32()


def test_parity_tolerance_is_unchanged_in_float32_and_widened_under_tf32():
    assert precision.parity_tolerance(1e-4, 1e-5, 30.0, tf32=False) == (1e-4, 1e-5)
    rtol, atol = precision.parity_tolerance(1e-4, 1e-5, 30.0, tf32=True)
    assert rtol == precision.TF32_REL and atol == pytest.approx(precision.TF32_REL * 30.0)
    assert precision.parity_tolerance(0.5, 1.0, 30.0, tf32=True) == (0.5, 1.0)  # never tighter


def test_tf32_assert_allclose_accepts_tf32_error_and_rejects_more():
    ref = np.linspace(-10, 10, 101)
    check = precision.tf32_assert_allclose(np.testing.assert_allclose)
    check(ref + 5e-3 * 10, ref, rtol=0, atol=1e-5)  # 5e-3 of the range: what TF32 gives
    with pytest.raises(AssertionError):
        check(ref + 3e-2 * 10, ref, rtol=0, atol=1e-5)  # 3x the TF32 bound
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(ref + 5e-3 * 10, ref, rtol=0, atol=1e-5)  # the float32 tolerance is unchanged


@pytest.mark.parity
def test_cpu_parity_tests_keep_their_tolerance():
    """On the CPU the conftest leaves numpy's assert_allclose alone (no silent loosening)."""
    if backend.float32_is_tf32():
        pytest.skip("TF32 device: the widened tolerance applies here by design")
    assert np.testing.assert_allclose.__module__.startswith("numpy")


@pytest.mark.parametrize("mode", MODES)
def test_transposed_conv_2x2_equals_a_float64_reference(monkeypatch, mode):
    """ConvTranspose2x2 (GEMM + pixel shuffle on the CPU, the built-in natively): each input pixel writes
    its own 2x2 output block, y[2i+u, 2j+v] = W[:, u, v, :] @ x[i, j] + b."""
    from mlx_evit.models.sam_decoder import ConvTranspose2x2

    monkeypatch.setenv("MLX_EVIT_KERNELS", mode)
    up = ConvTranspose2x2(12, 5)
    up.bias = mx.array(np.random.default_rng(5).standard_normal(5).astype(np.float32))
    up.weight = mx.array(np.random.default_rng(7).standard_normal((5, 2, 2, 12)).astype(np.float32))  # 4 taps
    x = np.random.default_rng(6).standard_normal((2, 3, 4, 12)).astype(np.float32)
    w, b = np.asarray(up.weight).astype(np.float64), np.asarray(up.bias).astype(np.float64)
    want = np.zeros((2, 6, 8, 5))
    for u in range(2):
        for v in range(2):
            want[:, u::2, v::2] = x.astype(np.float64) @ w[:, u, v, :].T + b
    np.testing.assert_allclose(np.asarray(up(mx.array(x))), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_sam_attention_core_equals_a_float64_reference(monkeypatch, mode):
    """attention_core broadcasts a batch-1 image over many prompts; equal to softmax(q k^T / sqrt(d)) v."""
    from mlx_evit.models.sam_decoder import attention_core

    monkeypatch.setenv("MLX_EVIT_KERNELS", mode)
    rng = np.random.default_rng(7)
    q = rng.standard_normal((3, 2, 9, 8)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 5, 8)).astype(np.float32) for _ in range(2))
    s = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)
    got = attention_core(mx.array(q), mx.array(k), mx.array(v))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_seg_blocks_run_whole_on_a_gpu_and_in_bands_on_the_cpu(monkeypatch):
    """run_banded takes the device's limit: the CPU's small bands, the GPU's memory bound; same result."""
    from mlx_evit.models import mit, seg_model

    block = mit.MBConv(8, 8, 1, 4, layers.relu, 1e-5).eval()
    x = mx.array(np.random.default_rng(5).standard_normal((1, 64, 16, 8)).astype(np.float32))
    whole = np.asarray(block(x))
    calls = []
    original = mit.MBConv.__call__
    monkeypatch.setattr(mit.MBConv, "__call__", lambda self, t: calls.append(t.shape[1]) or original(self, t))
    monkeypatch.setattr(seg_model, "BAND_ELEMENTS", 16 * 32 * 16)
    for gpu, bands in ((False, 4), (True, 1)):
        calls.clear()
        monkeypatch.setattr(seg_model, "default_device_is_gpu", lambda gpu=gpu: gpu)
        np.testing.assert_allclose(np.asarray(seg_model.run_banded(block, x)), whole, rtol=1e-6, atol=1e-6)
        assert len(calls) == bands, (gpu, calls)
