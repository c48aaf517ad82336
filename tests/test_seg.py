"""EfficientViT-Seg: parity with the original code's fixtures, strict key layouts of all 11 variants, shapes."""

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

import synthetic
from precision import tol
from mlx_evit import resize
from mlx_evit.models.registry import build_model, list_models
from mlx_evit.ops.resampling import resize_argmax
from mlx_evit.models.seg_model import MODELS, ORIGINAL_SEG_LARGE_LAYOUT, ORIGINAL_SEG_LAYOUT, EfficientViTSeg
from mlx_evit.models.keymap import CheckpointMismatchError, load_state_dict

SEG_NAMES = [e.name for e in MODELS]


def upstream_name(name: str) -> str:
    """``efficientvit_seg_b1_ade20k`` -> the zoo name ``efficientvit-seg-b1-ade20k``."""
    return name.replace("_", "-")


@pytest.fixture(scope="module")
def shapes():
    return synthetic.all_shapes()


def synthetic_model(name: str, shapes, fuse: bool = False):
    model = build_model(name)
    load_state_dict(model, synthetic.state_dict(shapes[upstream_name(name)]))
    model.eval()
    if fuse:
        model.fuse()
    return model


def rel_err(a, ref) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


# fixture: (model, NCHW input shape, final resize size)
FIXTURES = {
    "seg_b0_city_512x1024": ("efficientvit_seg_b0_cityscapes", (1, 3, 512, 1024), (720, 1280)),
    "seg_b0_city_128x128": ("efficientvit_seg_b0_cityscapes", (1, 3, 128, 128), (100, 150)),
    "seg_b1_ade_256x320": ("efficientvit_seg_b1_ade20k", (1, 3, 256, 320), (300, 400)),
    "seg_l1_city_256x512": ("efficientvit_seg_l1_cityscapes", (1, 3, 256, 512), (300, 500)),
}


def test_registry_lists_the_eleven_released_variants():
    assert sorted(list_models("efficientvit_seg_*")) == sorted(
        [f"efficientvit_seg_{v}_cityscapes" for v in ("b0", "b1", "b2", "b3", "l1", "l2")]
        + [f"efficientvit_seg_{v}_ade20k" for v in ("b1", "b2", "b3", "l1", "l2")]
    )
    assert "efficientvit_seg_b0_ade20k" not in list_models()  # not released (the original raises)


@pytest.mark.parametrize("name", SEG_NAMES)
def test_every_upstream_key_loads_strictly(name, shapes):
    """Each key of the variant's upstream state dict maps to exactly one parameter of the right shape."""
    keys = shapes[upstream_name(name)]
    model = build_model(name)
    layout = ORIGINAL_SEG_LARGE_LAYOUT if model.large else ORIGINAL_SEG_LAYOUT
    targets = {}
    for key, (shape, _) in keys.items():
        dst = layout.target(key)
        if dst is None:
            assert key.endswith("num_batches_tracked"), key
            continue
        assert dst not in targets, f"{key} and {targets.get(dst)} both map to {dst}"
        targets[dst] = key
    params = dict(tree_flatten(model.parameters()))
    assert set(targets) == set(params)
    # The strict loader agrees, picks the right layout on its own and converts every tensor to its shape.
    state = synthetic.state_dict(keys)
    chosen = load_state_dict(model, state)
    assert chosen is layout
    loaded = dict(tree_flatten(model.parameters()))
    probe = next(k for k in targets if k.endswith("head.inputs.0.conv.weight"))
    np.testing.assert_array_equal(np.asarray(loaded[probe]), state[targets[probe]].reshape(loaded[probe].shape))
    # Upstream parameter counts (README table): learnable parameters, BN statistics excluded.
    learnable = sum(v.size for k, v in loaded.items() if not k.endswith(("running_mean", "running_var")))
    upstream = sum(int(np.prod(s)) for k, (s, _) in keys.items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert learnable == upstream


def test_parameter_counts_match_the_upstream_readme():
    expected = {"efficientvit_seg_b0_cityscapes": 706_691, "efficientvit_seg_b1_ade20k": 4_791_414,
                "efficientvit_seg_l1_cityscapes": 40_242_227, "efficientvit_seg_l2_cityscapes": 52_607_923,
                "efficientvit_seg_l2_ade20k": 51_462_454}
    for name, count in expected.items():
        model = build_model(name)
        n = sum(v.size for k, v in tree_flatten(model.parameters()) if not k.endswith(("running_mean", "running_var")))
        assert n == count, name


def test_wrong_variant_is_refused_with_the_keys(shapes):
    model = build_model("efficientvit_seg_b1_cityscapes")
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict(model, synthetic.state_dict(shapes["efficientvit-seg-b1-ade20k"]))
    assert info.value.missing or info.value.mismatched


@pytest.mark.parity
@pytest.mark.parametrize("fixture,fuse", [
    (f, fuse) for f in FIXTURES if f != "seg_l1_city_256x512" for fuse in (False, True)
] + [pytest.param("seg_l1_city_256x512", True, marks=pytest.mark.slow)])  # L1: 40M parameters, fused only
def test_fixture_parity(fixture, fuse, shapes, monkeypatch):
    """Stage maps, stride-8 logits, bicubic-resized corners and the full-size argmax of the original code."""
    name, shape, out_size = FIXTURES[fixture]
    if fuse:  # high-resolution blocks in bands of rows (at 1024x2048 by default; here at every size)
        monkeypatch.setattr("mlx_evit.models.seg_model.BAND_ELEMENTS", 1 << 15)
    ref = synthetic.fixture(fixture)
    x = synthetic.synthetic_normal(f"input/{fixture}/x", shape)
    assert synthetic.crc32(x) == int(ref["input_crc32"])
    model = synthetic_model(name, shapes, fuse)
    feats = model.forward_features(mx.array(synthetic.nhwc(x)))
    logits = model.forward_head(feats)
    assert logits.shape == (1, shape[2] // 8, shape[3] // 8, model.num_classes)
    assert rel_err(logits, synthetic.nhwc(ref["logits"])) <= tol(1e-5)
    assert rel_err(feats[3], synthetic.nhwc(ref["stage4"])) <= tol(1e-5)
    assert rel_err(feats[1], synthetic.nhwc(ref["stage2_f16"].astype(np.float32))) <= tol(2e-3)
    full = np.asarray(resize(logits, out_size))
    assert rel_err(full[:, :16, :16], synthetic.nhwc(ref["resized_tl"])) <= tol(1e-5)
    assert rel_err(full[:, -16:, -16:], synthetic.nhwc(ref["resized_br"])) <= tol(1e-5)
    labels = resize_argmax(logits, out_size, max_elements=1 << 18)[0]  # several bands
    assert labels.shape == out_size
    assert (labels != ref["resized_argmax"]).mean() <= 1e-3
    np.testing.assert_array_equal(labels, full[0].argmax(-1))


@pytest.mark.parametrize("size", [(256, 96), (64, 64)])
def test_any_multiple_of_32_and_batches(size, shapes):
    model = synthetic_model("efficientvit_seg_b0_cityscapes", shapes)
    x = mx.array(np.random.default_rng(0).standard_normal((2, *size, 3)).astype(np.float32))
    y = model(x)
    assert y.shape == (2, size[0] // 8, size[1] // 8, 19)
    one = model(x[1:])
    assert np.abs(np.asarray(y[1:]) - np.asarray(one)).max() < tol(1e-4)


def test_input_not_a_multiple_of_32_is_a_clear_error():
    model = build_model("efficientvit_seg_b0_cityscapes")
    with pytest.raises(ValueError, match="multiples of 32"):
        model(mx.zeros((1, 100, 64, 3)))
    with pytest.raises(ValueError, match="NHWC|channels"):
        model(mx.zeros((1, 3, 64, 64)))


def test_headless_build_returns_the_classifier_features():
    model = build_model("efficientvit_seg_b0_cityscapes", num_classes=0)
    y = model(mx.zeros((1, 64, 64, 3)))
    assert y.shape == (1, 8, 8, 128)  # head width 32 x final expand 4
    other = build_model("efficientvit_seg_l1_cityscapes", num_classes=7)
    assert other.head.output[-1].conv.weight.shape == (7, 256)


@pytest.mark.parity
def test_half_precision_argmax_agrees(shapes):
    """float16 / bfloat16 weights and activations (attention and resizes in float32): label agreement."""
    from mlx_evit.ops.dtypes import cast_model

    ref = synthetic.fixture("seg_b0_city_128x128")
    x = mx.array(synthetic.nhwc(synthetic.synthetic_normal("input/seg_b0_city_128x128/x", (1, 3, 128, 128))))
    want = ref["resized_argmax"]
    for dtype, min_agree in ((mx.float16, 0.99), (mx.bfloat16, 0.97)):  # measured 0.997, 0.986
        model = cast_model(synthetic_model("efficientvit_seg_b0_cityscapes", shapes, fuse=True), dtype)
        logits = model(x.astype(dtype))
        assert logits.dtype == dtype
        assert np.isfinite(np.asarray(logits.astype(mx.float32))).all()
        agree = (resize_argmax(logits, (100, 150))[0] == want).mean()
        assert agree >= min_agree, (dtype, agree)


def test_layouts_are_told_apart_from_classification_checkpoints():
    from mlx_evit.models.mit import ORIGINAL_LAYOUT

    cls_keys = list(synthetic.keys_file("mit_b0_cls_keys.json"))
    assert ORIGINAL_SEG_LAYOUT.matches(cls_keys) == 0 and ORIGINAL_SEG_LARGE_LAYOUT.matches(cls_keys) == 0
    assert ORIGINAL_LAYOUT.matches(cls_keys) > 0
    assert EfficientViTSeg.checkpoint_layouts == (ORIGINAL_SEG_LAYOUT, ORIGINAL_SEG_LARGE_LAYOUT)


@pytest.mark.parametrize("kind,stride", [("mbconv", 1), ("mbconv", 2), ("fmbconv", 2), ("dsconv", 1), ("resblock", 1)])
@pytest.mark.parametrize("height", [37, 64])
def test_banded_blocks_equal_the_whole_computation(kind, stride, height):
    """High-resolution blocks run in bands of rows with halos; the result is the whole block's."""
    from mlx_evit.ops.layers import hardswish
    from mlx_evit.models.mit import DSConv, FusedMBConv, MBConv, ResBlock, Residual
    from mlx_evit.models.seg_model import run_banded

    mx.random.seed(0)
    block = {
        "mbconv": lambda: MBConv(8, 8, stride, 4, hardswish, 1e-5),
        "fmbconv": lambda: FusedMBConv(8, 8, stride, 4, hardswish, 1e-5),
        "dsconv": lambda: DSConv(8, 8, stride, hardswish, 1e-5),
        "resblock": lambda: ResBlock(8, 8, stride, hardswish, 1e-5),
    }[kind]()
    block = Residual(block, shortcut=stride == 1)
    block.eval()
    x = mx.random.normal((2, height, 19, 8))
    whole = np.asarray(block(x))
    for budget in (1, 2000, 10**9):  # 8-row bands ... one band
        banded = np.asarray(run_banded(block, x, max_elements=budget))
        assert banded.shape == whole.shape
        np.testing.assert_allclose(banded, whole, atol=1e-5, rtol=1e-5)
