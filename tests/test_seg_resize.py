"""mlx_evit.ops.resampling against torch.nn.functional.interpolate (align_corners=False), and resize_argmax."""

import numpy as np
import pytest
import torch

import mlx.core as mx

import mlx_evit
from mlx_evit.ops.resampling import resize_argmax, source_taps


def torch_resize(x_nhwc: np.ndarray, size, mode: str) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    y = torch.nn.functional.interpolate(x, size=tuple(int(s) for s in size), mode=mode, align_corners=False)
    return y.numpy().transpose(0, 2, 3, 1)


def random_cases(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        if i % 4 == 0:  # integer upsampling factors (the head's periodic path)
            size = (h * int(rng.integers(2, 6)), w * int(rng.integers(2, 5)))
        elif i % 4 == 1:  # downsampling, non-integer
            size = (max(1, int(h * rng.uniform(0.2, 0.9))), max(1, int(w * rng.uniform(0.2, 0.9))))
        else:  # arbitrary, mixed up/down
            size = tuple(int(v) for v in rng.integers(1, 120, 2))
        yield (h, w), size


@pytest.mark.parity
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_equals_torch_interpolate_on_random_sizes(mode):
    rng = np.random.default_rng(1)
    worst = 0.0
    for (h, w), size in random_cases(40, seed=2 if mode == "bicubic" else 3):
        x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
        got = np.asarray(mlx_evit.resize(mx.array(x), size, mode=mode))
        ref = torch_resize(x, size, mode)
        assert got.shape == ref.shape
        worst = max(worst, float(np.abs(got - ref).max()))
    # float32 rounding of the tap sums only (indices and weights are PyTorch's): 1e-5 would
    # already be exceeded by a float32 scale-factor upsampler on these sizes.
    assert worst <= 2e-6, worst


@pytest.mark.parity
def test_tap_weights_are_torchs():
    """One-hot columns recover PyTorch's interpolation matrix; ours agrees to float32 rounding."""
    rng = np.random.default_rng(4)
    for _ in range(30):
        n_in, n_out = (int(v) for v in rng.integers(1, 100, 2))
        for mode in ("bicubic", "bilinear"):
            eye = np.eye(n_in, dtype=np.float32).reshape(1, n_in, n_in, 1)  # (B, H=n_in, W, C=1)
            theirs = torch_resize(eye, (n_out, n_in), mode)[0, :, :, 0]
            idx, w = source_taps(n_in, n_out, mode)
            ours = np.zeros((n_out, n_in))
            for j in range(idx.shape[1]):
                np.add.at(ours, (np.arange(n_out), idx[:, j]), w[:, j])
            assert np.abs(ours - theirs).max() <= 3e-7, (n_in, n_out, mode)


def test_the_head_upsampling_path_equals_the_gather_path():
    """Integer factors run as shifted slices; they equal the general (gather) computation."""
    from mlx_evit import resize as resize_fn
    from mlx_evit.ops.resampling import _periodic

    x = mx.array(np.random.default_rng(5).standard_normal((1, 5, 7, 4)).astype(np.float32))
    assert _periodic(5, 20, "bicubic") is not None and _periodic(7, 14, "bicubic") is not None
    y = np.asarray(resize_fn(x, (20, 14)))
    idx_h, w_h = source_taps(5, 20)
    idx_w, w_w = source_taps(7, 14)
    xn = np.asarray(x)
    t = sum(xn[:, :, idx_w[:, j]] * w_w[:, j][None, None, :, None] for j in range(4))
    ref = sum(t[:, idx_h[:, j]] * w_h[:, j][None, :, None, None] for j in range(4))
    np.testing.assert_allclose(y, ref, atol=2e-6)


def test_same_size_is_identity_and_half_precision_is_resized_in_float32():
    x = mx.array(np.random.default_rng(6).standard_normal((1, 9, 11, 2)).astype(np.float32))
    assert mlx_evit.resize(x, (9, 11)) is x
    y16 = mlx_evit.resize(x.astype(mx.float16), (27, 20))
    assert y16.dtype == mx.float16
    y32 = np.asarray(mlx_evit.resize(x, (27, 20)))
    assert np.abs(np.asarray(y16.astype(mx.float32)) - y32).max() < 2e-2
    np.testing.assert_allclose(np.asarray(mlx_evit.resize(np.asarray(x), (3, 4))),
                               torch_resize(np.asarray(x), (3, 4), "bicubic"), atol=2e-6)


def test_bad_arguments_are_one_line_errors():
    x = mx.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="mode"):
        mlx_evit.resize(x, (8, 8), mode="nearest")
    with pytest.raises(ValueError, match="NHWC"):
        mlx_evit.resize(mx.zeros((4, 4, 3)), (8, 8))
    with pytest.raises(ValueError, match="positive"):
        mlx_evit.resize(x, (0, 8))
    with pytest.raises(ValueError, match="height, width"):
        mlx_evit.resize(x, 8)


@pytest.mark.parametrize("size", [(37, 53), (16, 16), (5, 90)])
def test_resize_argmax_in_bands_equals_the_whole_resize(size):
    logits = mx.array(np.random.default_rng(7).standard_normal((2, 8, 12, 5)).astype(np.float32))
    whole = np.asarray(mlx_evit.resize(logits, size)).argmax(-1)
    for budget in (1, 1000, 1 << 24):  # one row per band ... everything at once
        np.testing.assert_array_equal(resize_argmax(logits, size, max_elements=budget), whole)
    assert resize_argmax(logits, size).dtype == np.uint8
    many = mx.zeros((1, 2, 2, 300))
    assert resize_argmax(many, (4, 4)).dtype == np.int32
