"""Tests of the seed model (mlx_evit.models.seed): shapes, the attention maths, the
cascade, linear memory, training, weight round-trips and option validation.

The numerical references below are written independently in numpy float64:
the quadratic (n x n) form of the linear attention and a per-head loop over
the cascade using the module's own weights.
"""

import re
import time

import numpy as np
import pytest

from mlx_evit import EfficientViT, create_model, get_pretrained_cfg, list_models, output_size
from mlx_evit.ops.layers import elu_plus_one, linear_attention
from mlx_evit.models.seed import ATTN_EPS, CascadedGroupLinearAttention

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

SMALL = dict(image_size=32, patch_size=8, embed_dim=16, depths=(1, 1), num_heads=(2, 2))


def np_phi(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def quadratic_attention(q, k, v, eps):
    """Reference: materialise the n x n kernel matrix phi(q_i).phi(k_j), normalise each row."""
    a = np.einsum("...nd,...md->...nm", q, k)  # (..., N, N)
    return np.einsum("...nm,...md->...nd", a, v) / (a.sum(-1, keepdims=True) + eps)


def expected_grids(h, w, patch, stages):
    h, w = h // patch, w // patch
    out = []
    for _ in range(stages):
        out.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return out


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------

SWEEP = [
    # (options, input shape (B, H, W, C))
    (dict(image_size=32, patch_size=4, embed_dim=16, depths=(1,), num_heads=(2,)), (2, 32, 32, 3)),
    (dict(image_size=32, patch_size=4, embed_dim=16, depths=(2, 1), num_heads=(1, 4), num_classes=10), (1, 32, 48, 3)),
    (dict(image_size=64, patch_size=8, embed_dim=24, depths=(1, 1, 2), num_heads=(3, 6, 4)), (2, 64, 80, 3)),
    (
        dict(image_size=56, patch_size=4, in_channels=1, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
             mlp_ratio=2.5, num_classes=5),
        (3, 56, 56, 1),
    ),
    (dict(), (1, 224, 224, 3)),  # the seed's defaults
    (dict(num_classes=1000), (1, 320, 256, 3)),  # larger, non-square input
    (dict(patch_size=14, embed_dim=32, depths=(1, 2, 1), num_heads=(2, 8, 4), num_classes=7), (2, 98, 70, 3)),
]


@pytest.mark.parametrize("options,shape", SWEEP)
def test_output_and_feature_shapes(options, shape):
    model = EfficientViT.build(**options)
    x = mx.random.normal(shape)
    y = model(x)
    size = output_size(**options)
    assert y.shape == (shape[0], size) == (shape[0], model.output_size)
    expected = options.get("num_classes") or options.get("embed_dim", 64) * 2 ** (len(options.get("depths", (1, 2, 3))) - 1)
    assert size == expected
    assert np.isfinite(np.array(y)).all()

    feats = model.forward_features(x)
    depths = options.get("depths", (1, 2, 3))
    grids = expected_grids(shape[1], shape[2], options.get("patch_size", 16), len(depths))
    widths = [options.get("embed_dim", 64) * 2**i for i in range(len(depths))]
    assert [f.shape for f in feats] == [(shape[0], h, w, c) for (h, w), c in zip(grids, widths)]
    assert model.num_features == widths[-1]
    assert model.num_classes == options.get("num_classes")


def test_output_size_defaults_and_features_without_head():
    assert output_size() == 256
    assert output_size(num_classes=10) == 10
    assert output_size(embed_dim=32, depths=(1,), num_heads=(4,)) == 32
    model = EfficientViT.build(**SMALL, num_classes=0)  # 0 behaves like None: pooled features
    assert model(mx.zeros((1, 32, 32, 3))).shape == (1, 32)


@pytest.mark.parity
def test_pooled_features_are_layernorm_then_token_mean():
    model = EfficientViT.build(**SMALL)
    x = mx.random.normal((2, 32, 40, 3))
    last = np.array(model.forward_features(x)[-1], dtype=np.float64)
    mu = last.mean(-1, keepdims=True)
    var = last.var(-1, keepdims=True)
    w, b = np.array(model.norm.weight), np.array(model.norm.bias)
    ref = (((last - mu) / np.sqrt(var + model.norm.eps)) * w + b).mean(axis=(1, 2))
    np.testing.assert_allclose(np.array(model(x)), ref, atol=1e-5)


def test_batch_items_are_independent():
    model = EfficientViT.build(**SMALL, num_classes=3)
    x = mx.random.normal((3, 32, 32, 3))
    together = np.array(model(x))
    alone = np.concatenate([np.array(model(x[i : i + 1])) for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


# ---------------------------------------------------------------------------
# Linear attention and the cascade
# ---------------------------------------------------------------------------


@pytest.mark.parity
def test_linear_attention_equals_quadratic_formula():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(scale=2.0, size=(2, 3, 50, 8)).astype(np.float32) for _ in range(3))
    out = linear_attention(elu_plus_one(mx.array(q)), elu_plus_one(mx.array(k)), mx.array(v), ATTN_EPS)
    assert out.dtype == mx.float32
    ref = quadratic_attention(np_phi(q.astype(np.float64)), np_phi(k.astype(np.float64)), v.astype(np.float64), ATTN_EPS)
    np.testing.assert_allclose(np.array(out), ref, atol=1e-5, rtol=0)
    # the reference can tell a wrong normaliser apart
    assert np.abs(ref - quadratic_attention(np_phi(q), np_phi(k), v, 1.0)).max() > 1e-3


def reference_cga(module, x, cascade=True):
    """Per-head numpy float64 reference of CascadedGroupLinearAttention using its weights."""
    x = np.asarray(x, dtype=np.float64)
    d = module.head_dim
    outs = []
    for i, lin in enumerate(module.qkvs):
        h = x[..., i * d : (i + 1) * d]
        if cascade and i > 0:
            h = h + outs[-1]
        t = h @ np.array(lin.weight, dtype=np.float64).T + np.array(lin.bias, dtype=np.float64)
        q, k, v = t[..., :d], t[..., d : 2 * d], t[..., 2 * d :]
        outs.append(quadratic_attention(np_phi(q), np_phi(k), v, module.eps))
    cat = np.concatenate(outs, axis=-1)
    proj = cat @ np.array(module.proj.weight, dtype=np.float64).T + np.array(module.proj.bias, dtype=np.float64)
    return proj, outs


@pytest.mark.parity
def test_cga_matches_per_head_reference():
    mx.random.seed(1)
    attn = CascadedGroupLinearAttention(24, 3)
    x = mx.random.normal((2, 37, 24))
    ref, ref_heads = reference_cga(attn, np.array(x))
    np.testing.assert_allclose(np.array(attn(x)), ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(attn.heads(x), ref_heads):
        np.testing.assert_allclose(np.array(got), want, atol=1e-5, rtol=1e-5)
    # the comparison is sensitive to the cascade: without it the reference differs
    no_cascade, _ = reference_cga(attn, np.array(x), cascade=False)
    assert np.abs(no_cascade - ref).max() > 1e-2


def test_cascade_passes_head_outputs_forward():
    mx.random.seed(2)
    attn = CascadedGroupLinearAttention(16, 4)
    d = attn.head_dim
    x = np.random.default_rng(2).normal(size=(1, 30, 16)).astype(np.float32)
    base = [np.array(h) for h in attn.heads(mx.array(x))]

    only0 = x.copy()
    only0[..., :d] += np.random.default_rng(3).normal(size=(1, 30, d)).astype(np.float32)
    after0 = [np.array(h) for h in attn.heads(mx.array(only0))]
    # head 1's own input slice is unchanged, yet its output changes (and so do the later heads)
    for i in range(4):
        assert np.abs(after0[i] - base[i]).max() > 1e-3, f"head {i} ignored a change of head 0's slice"

    only1 = x.copy()
    only1[..., d : 2 * d] += np.random.default_rng(4).normal(size=(1, 30, d)).astype(np.float32)
    after1 = [np.array(h) for h in attn.heads(mx.array(only1))]
    np.testing.assert_array_equal(after1[0], base[0])  # head 0 never sees head 1's slice
    assert np.abs(after1[1] - base[1]).max() > 1e-3


def test_each_head_has_its_own_projections():
    attn = CascadedGroupLinearAttention(32, 4)
    assert len(attn.qkvs) == 4
    assert all(lin.weight.shape == (24, 8) for lin in attn.qkvs)
    weights = [np.array(lin.weight) for lin in attn.qkvs]
    assert all(not np.array_equal(weights[0], w) for w in weights[1:])
    with pytest.raises(ValueError, match="num_heads=3 does not divide dim=32"):
        CascadedGroupLinearAttention(32, 3)


# ---------------------------------------------------------------------------
# Linear cost
# ---------------------------------------------------------------------------


def forward_peak_bytes(fn, x):
    """Peak memory of ``fn(x)`` above what is allocated before (weights, input)."""
    mx.eval(x)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn(x))
    return mx.get_peak_memory() - base


def test_peak_memory_grows_linearly_with_tokens():
    model = EfficientViT.build(image_size=64, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2))
    mx.eval(model.parameters())
    small = forward_peak_bytes(model, mx.random.normal((1, 128, 128, 3)))  # 1024 tokens
    large = forward_peak_bytes(model, mx.random.normal((1, 256, 256, 3)))  # 4096 tokens
    ratio = large / small
    assert 2.0 < ratio < 6.0, f"peak memory grew {ratio:.2f}x for 4x the tokens (quadratic would be ~16x)"


def test_no_n_by_n_array_at_large_n():
    n = 128 * 128  # an n x n float32 array would be 1 GiB
    attn = CascadedGroupLinearAttention(16, 2)
    mx.eval(attn.parameters())
    peak = forward_peak_bytes(attn, mx.random.normal((1, n, 16)))
    assert peak < 64 * 2**20, f"attention over {n} tokens peaked at {peak / 2**20:.1f} MiB"
    # the whole model with 128 x 128 tokens in its first stage
    model = EfficientViT.build(image_size=512, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2))
    mx.eval(model.parameters())
    peak = forward_peak_bytes(model, mx.random.normal((1, 512, 512, 3)))
    assert peak < 256 * 2**20, f"model with {n} tokens peaked at {peak / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------
# Training, gradients, weights
# ---------------------------------------------------------------------------


def digits_32():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    x = np.kron(x, np.ones((4, 4), np.float32))[..., None]  # 8x8 -> 32x32, one channel
    return x, digits.target.astype(np.int32)


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def test_gradients_reach_every_parameter():
    mx.random.seed(5)
    model = EfficientViT.build(**dict(SMALL, depths=(1, 2), num_heads=(2, 4)), num_classes=4)
    x = mx.random.normal((4, 32, 48, 3))
    y = mx.array([0, 1, 2, 3])
    _, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
    flat = tree_flatten(grads)
    assert len(flat) == len(tree_flatten(model.trainable_parameters())) > 0
    dead = [name for name, g in flat if not np.any(np.array(g) != 0)]
    assert not dead, f"parameters without gradient: {dead}"


def test_learns_digits():
    x, y = digits_32()
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    test_idx, train_idx = perm[:360], perm[360:]
    mx.random.seed(0)
    model = EfficientViT.build(
        image_size=32, patch_size=8, in_channels=1, embed_dim=32, depths=(1, 1), num_heads=(2, 2),
        mlp_ratio=2.0, num_classes=10,
    )
    epochs, batch = 5, 64
    steps = epochs * (len(train_idx) // batch)
    opt = optim.AdamW(learning_rate=optim.cosine_decay(3e-3, steps), weight_decay=0.01)
    step = nn.value_and_grad(model, loss_fn)
    start = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(train_idx)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            _, grads = step(model, mx.array(x[idx]), mx.array(y[idx]))
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
    model.eval()
    pred = np.array(mx.argmax(model(mx.array(x[test_idx])), axis=-1))
    accuracy = float((pred == y[test_idx]).mean())
    elapsed = time.perf_counter() - start
    assert accuracy >= 0.90, f"held-out accuracy {accuracy:.3f} after {elapsed:.0f}s"


def test_weights_round_trip_safetensors(tmp_path):
    options = dict(SMALL, num_classes=6)
    model = EfficientViT.build(**options)
    x = mx.random.normal((2, 32, 32, 3))
    path = str(tmp_path / "seed.safetensors")
    model.save_weights(path)
    other = EfficientViT.build(**options)
    assert not np.allclose(np.array(other(x)), np.array(model(x)))  # fresh random weights differ
    other.load_weights(path)
    np.testing.assert_array_equal(np.array(other(x)), np.array(model(x)))


def test_registry_and_fuse():
    assert "efficientvit_seed" in list_models()
    assert get_pretrained_cfg("efficientvit_seed") is None
    model = create_model("efficientvit_seed", num_classes=10, embed_dim=32, depths=(1, 1), num_heads=(2, 2))
    assert isinstance(model, EfficientViT)
    x = mx.random.normal((1, 64, 48, 3))
    y = np.array(model(x))
    assert y.shape == (1, 10)
    assert model.fuse() is model
    np.testing.assert_array_equal(np.array(model(x)), y)
    assert model.checkpoint_layouts == ()
    assert create_model("efficientvit_seed").forward_features(mx.zeros((1, 32, 32, 3)))[-1].shape == (1, 1, 1, 256)
    with pytest.raises(ValueError, match="no pretrained tags"):
        create_model("efficientvit_seed.in1k")


def test_half_precision_keeps_float32_attention():
    model = EfficientViT.build(**SMALL, num_classes=3)
    x = mx.random.normal((2, 32, 32, 3))
    ref = np.array(model(x))
    model.set_dtype(mx.bfloat16)
    y = model(x.astype(mx.bfloat16))
    assert y.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), ref, atol=0.1 * np.abs(ref).max() + 0.05)


# ---------------------------------------------------------------------------
# Invalid options and inputs
# ---------------------------------------------------------------------------

BAD_OPTIONS = [
    (dict(embed_dim=64, num_heads=(4, 3, 4)), "num_heads[1]=3 does not divide width 128"),
    (dict(embed_dim=30, depths=(1,), num_heads=(4,)), "num_heads[0]=4 does not divide width 30"),
    (dict(depths=(1, 2), num_heads=(4, 4, 4)), "depths has 2 entries but num_heads has 3"),
    (dict(image_size=225), "image_size=225 is not divisible by patch_size=16"),
    (dict(image_size=8, patch_size=16), "image_size=8 is not divisible by patch_size=16"),
    (dict(image_size=0), "image_size must be a positive integer, got 0"),
    (dict(patch_size=-4), "patch_size must be a positive integer, got -4"),
    (dict(in_channels=0), "in_channels must be a positive integer, got 0"),
    (dict(embed_dim=0), "embed_dim must be a positive integer, got 0"),
    (dict(embed_dim=32.0), "embed_dim must be a positive integer, got 32.0"),
    (dict(patch_size=True), "patch_size must be a positive integer, got True"),
    (dict(depths=(1, 0, 3)), "depths[1] must be a positive integer, got 0"),
    (dict(num_heads=(4, -4, 4)), "num_heads[1] must be a positive integer, got -4"),
    (dict(depths=(), num_heads=()), "depths must be a non-empty list"),
    (dict(depths=3), "depths must be a non-empty list of positive integers (one per stage), got 3"),
    (dict(mlp_ratio=0.0), "mlp_ratio must be a positive finite number, got 0.0"),
    (dict(mlp_ratio=-1), "mlp_ratio must be a positive finite number, got -1"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio must be a positive finite number, got nan"),
    (dict(mlp_ratio="4"), "mlp_ratio must be a positive finite number, got '4'"),
    (dict(embed_dim=8, depths=(1,), num_heads=(2,), mlp_ratio=0.1),
     "mlp_ratio=0.1 gives an FFN hidden width of 0 in stage 0 (width 8)"),
    (dict(num_classes=-1), "num_classes must be a positive integer or None, got -1"),
    (dict(num_classes=2.5), "num_classes must be a positive integer or None, got 2.5"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS)
def test_invalid_options_raise(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EfficientViT.build(**options)
    with pytest.raises(ValueError, match=re.escape(message)):
        output_size(**options)


def test_registry_validates_options():
    with pytest.raises(ValueError, match=re.escape("num_heads[0]=3 does not divide width 32")):
        create_model("efficientvit_seed", embed_dim=32, depths=(1,), num_heads=(3,))


BAD_INPUTS = [
    ((32, 32, 3), "expected a 4-D NHWC input"),
    ((1, 1, 32, 32, 3), "expected a 4-D NHWC input"),
    ((1, 32, 32, 4), "expected 3 channels in the last axis"),
    ((1, 3, 32, 32), "transpose it with x.transpose(0, 2, 3, 1)"),
    ((1, 36, 32, 3), "must be multiples of 8, got 36x32"),
    ((1, 32, 4, 3), "at least 8"),
]


@pytest.mark.parametrize("shape,message", BAD_INPUTS)
def test_invalid_inputs_raise(shape, message):
    model = EfficientViT.build(**SMALL)
    with pytest.raises(ValueError, match=re.escape(message)):
        model(mx.zeros(shape))
    with pytest.raises(ValueError, match=re.escape(message)):
        model.forward_features(mx.zeros(shape))


def test_integer_images_are_refused():
    model = EfficientViT.build(**SMALL)
    with pytest.raises(ValueError, match="floating-point"):
        model(mx.zeros((1, 32, 32, 3), dtype=mx.uint8))
