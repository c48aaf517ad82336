"""Microsoft EfficientViT M0-M5 against timm and against the original code's logits."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest

from mlx_evit import create_model, get_pretrained_cfg, list_models
from mlx_evit.models.msra import (
    ORIGINAL_LAYOUT,
    TIMM_LAYOUT,
    CascadedGroupAttention,
    attention_resolutions,
    resize_bias_table,
)
from mlx_evit.models.registry import build_model
from mlx_evit.models.keymap import CheckpointMismatchError, load_state_dict
from mlx.utils import tree_flatten
import mlx.core as mx

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
F = torch.nn.functional
from torch_utils import randomize_, state_dict_numpy, torch_forward  # noqa: E402
import synthetic  # noqa: E402

torch.set_num_threads(2)

FIXTURES = synthetic.FIXTURES
VARIANTS = [f"efficientvit_m{i}" for i in range(6)]
TOL = dict(atol=1e-4, rtol=1e-4)


def _timm(name: str, img_size: int = 224, seed: int = 0):
    return randomize_(timm.create_model(name, pretrained=False, img_size=img_size), seed)


def _mlx(name: str, state: dict, img_size: int = 224):
    model = build_model(name, img_size=img_size)
    load_state_dict(model, state)
    return model.eval()


def _images(size: int, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _run(model, x: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(x)))


def _resized_for(state: dict, target_model) -> dict:
    """``state`` with its attention biases resized to ``target_model``'s tables by PyTorch bicubic."""
    want = target_model.state_dict()
    out = dict(state)
    for k, v in state.items():
        if k.endswith("attention_biases") and tuple(v.shape) != tuple(want[k].shape):
            h, s1, s2 = v.shape[0], int(round(v.shape[1] ** 0.5)), int(round(want[k].shape[1] ** 0.5))
            grid = torch.from_numpy(v).view(1, h, s1, s1)
            out[k] = F.interpolate(grid, size=(s2, s2), mode="bicubic", align_corners=False).reshape(h, -1).numpy()
    return out


# ---------------------------------------------------------------------------
# Parity with timm
# ---------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_matches_timm(name):
    ref_model = _timm(name)
    model = _mlx(name, state_dict_numpy(ref_model))
    x = _images(224)
    ref = torch_forward(ref_model, x)
    np.testing.assert_allclose(_run(model, x), ref, **TOL)
    model.fuse()
    assert not any(".norm." in k for k, _ in tree_flatten(model.parameters())), "BatchNorms left after fuse()"
    np.testing.assert_allclose(_run(model, x), ref, **TOL)


@pytest.mark.parity
def test_stage_features_match_timm():
    ref_model = _timm("efficientvit_m0")
    model = _mlx("efficientvit_m0", state_dict_numpy(ref_model))
    x = _images(224, batch=1)
    with torch.no_grad():
        ref = ref_model.forward_intermediates(torch.from_numpy(x.transpose(0, 3, 1, 2)), intermediates_only=True)
    feats = model.forward_features(mx.array(x))
    assert [tuple(f.shape) for f in feats] == [(1, 14, 14, 64), (1, 7, 7, 128), (1, 4, 4, 192)]
    for f, r in zip(feats, ref):
        np.testing.assert_allclose(np.array(f), r.numpy().transpose(0, 2, 3, 1), **TOL)


@pytest.mark.parity
def test_pooled_features_without_head():
    ref_model = _timm("efficientvit_m1")
    state = {k: v for k, v in state_dict_numpy(ref_model).items() if not k.startswith("head.")}
    model = build_model("efficientvit_m1", num_classes=0)
    load_state_dict(model, state)
    model.eval()
    x = _images(224, batch=1)
    with torch.no_grad():
        ref = ref_model.forward_head(ref_model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2))), pre_logits=True)
    out = _run(model, x)
    assert out.shape == (1, model.num_features) == (1, 192)
    np.testing.assert_allclose(out, ref.numpy(), **TOL)


def test_se_weights_stored_2d_or_4d():
    state = state_dict_numpy(_timm("efficientvit_m0"))
    flat = {k: (v.reshape(v.shape[:2]) if re.search(r"\.se\.fc[12]\.weight$", k) else v) for k, v in state.items()}
    assert sum(v.ndim == 2 for k, v in flat.items() if ".se." in k) == 4
    a, b = _mlx("efficientvit_m0", state), _mlx("efficientvit_m0", flat)
    x = _images(224, batch=1)
    np.testing.assert_array_equal(_run(a, x), _run(b, x))


# ---------------------------------------------------------------------------
# The original layout (microsoft/Cream)
# ---------------------------------------------------------------------------


def _original_m0_state() -> dict[str, np.ndarray]:
    """The fixture's synthetic M0 in microsoft/Cream's layout (with attention_bias_idxs buffers)."""
    return synthetic.state_dict(synthetic.keys_file("msra_m0_cls_keys.json"))


@pytest.mark.parity
def test_original_fixture_reproduces_reference_logits():
    """Cream's own logits and pooled features for the synthetic M0, unfused and fused."""
    state = _original_m0_state()
    ref = synthetic.fixture("msra_m0_cls")
    want = ref["x224_logits"]
    tol = dict(rtol=0, atol=1e-5 * float(np.abs(want).max()))
    model = build_model("efficientvit_m0")
    layout = load_state_dict(model, state)
    assert layout is ORIGINAL_LAYOUT
    model.eval()
    x = synthetic.nhwc(synthetic.synthetic_normal("input/msra_m0_cls/x224", (2, 3, 224, 224)))
    out = _run(model, x)
    diff = np.abs(out - want).max()
    print(f"original fixture M0: max |logits - reference| = {diff:.3g} (unfused)")
    np.testing.assert_allclose(out, want, **tol)
    features = np.array(model.forward_features(mx.array(x))[-1].mean(axis=(1, 2)))
    feat_ref = ref["x224_features"]
    np.testing.assert_allclose(features, feat_ref, rtol=0, atol=1e-5 * float(np.abs(feat_ref).max()))
    model.fuse()
    out = _run(model, x)
    print(f"original fixture M0: max |logits - reference| = {np.abs(out - want).max():.3g} (fused)")
    np.testing.assert_allclose(out, want, **tol)


@pytest.mark.parametrize("variant", [f"m{i}" for i in range(6)])
def test_key_tables_map_both_layouts_onto_the_model(variant):
    """Every original and timm key of every variant maps onto the same MLX parameter with the same shape."""
    tables = json.loads((FIXTURES / "keys" / "msra_state_dict_keys_shapes.json").read_text())[variant]
    mapped = {}
    for layout, key in ((ORIGINAL_LAYOUT, "original"), (TIMM_LAYOUT, "timm")):
        mapped[key] = {layout.target(k): tuple(s) for k, s in tables[key].items() if layout.target(k) is not None}
    assert mapped["original"] == mapped["timm"]
    model = build_model(f"efficientvit_{variant}")
    params = {k: v.shape for k, v in tree_flatten(model.parameters())}
    assert set(params) == set(mapped["timm"])
    for k, shape in mapped["timm"].items():
        assert params[k] in _mlx_shapes(shape), (k, shape, params[k])


def _mlx_shapes(torch_shape: tuple) -> set:
    """MLX shapes a PyTorch tensor may take: convs OIHW -> OHWI, 1x1 convs may become Linear (O, I)."""
    if len(torch_shape) != 4:
        return {torch_shape}
    o, i, kh, kw = torch_shape
    return {(o, kh, kw, i)} | ({(o, i)} if kh == kw == 1 else set())


def test_original_layout_names():
    assert ORIGINAL_LAYOUT.target("module.blocks3.6.mixer.m.attn.proj.1.c.weight") == "stages.2.blocks.3.mixer.m.attn.proj.1.conv.weight"
    assert ORIGINAL_LAYOUT.target("head_dist.l.bias") == "head_dist.linear.bias"
    assert ORIGINAL_LAYOUT.target("head.bn.running_var") == "head.norm.running_var"
    assert ORIGINAL_LAYOUT.target("blocks2.0.0.m.bn.num_batches_tracked") is None
    assert ORIGINAL_LAYOUT.target("blocks1.0.mixer.m.attn.attention_bias_idxs") is None


@pytest.mark.parity
def test_distillation_head_is_averaged():
    ref_model = _timm("efficientvit_m0")
    dist = randomize_(type(ref_model.head)(192, 1000), seed=5)
    torch.nn.init.normal_(dist.linear.weight, std=0.1)
    state = state_dict_numpy(ref_model)
    state.update({f"head_dist.{k}": v for k, v in state_dict_numpy(dist).items()})
    model = build_model("efficientvit_m0")
    with pytest.warns(UserWarning, match="distillation head"):
        load_state_dict(model, state)
    model.eval()
    x = _images(224)
    with torch.no_grad():
        pooled = ref_model.forward_head(ref_model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2))), pre_logits=True)
        ref = ((ref_model.head(pooled) + dist(pooled)) / 2).numpy()
    np.testing.assert_allclose(_run(model, x), ref, **TOL)
    assert np.abs(ref - torch_forward(ref_model, x)).max() > 1e-2  # the second head matters


# ---------------------------------------------------------------------------
# Other input sizes
# ---------------------------------------------------------------------------


@pytest.mark.parity
def test_bias_resize_matches_torch_interpolate():
    rng = np.random.default_rng(0)
    for s1, s2 in [(4, 5), (4, 6), (4, 7), (7, 6), (4, 3), (2, 9)]:
        table = rng.standard_normal((3, s1 * s1)).astype(np.float32)
        ref = F.interpolate(torch.from_numpy(table).view(1, 3, s1, s1), size=(s2, s2), mode="bicubic", align_corners=False)
        np.testing.assert_allclose(resize_bias_table(table, s2), ref.reshape(3, -1).numpy(), atol=1e-5)


def test_attention_resolutions():
    assert attention_resolutions(224) == (7, 7, 4)
    assert {attention_resolutions(s) for s in (208, 224, 240, 256)} == {(7, 7, 4)}
    assert attention_resolutions(192) == (7, 6, 3)
    assert attention_resolutions(272) == attention_resolutions(320) == (7, 7, 5)
    assert attention_resolutions(384) == (7, 7, 6)
    assert attention_resolutions(448) == (7, 7, 7)


def test_size_with_same_tables_loads_unchanged_and_pads_windows():
    """256: 16x16 stage-1 maps are padded to 21x21 (3x3 windows); stage 2 8x8 -> 14x14."""
    state = state_dict_numpy(_timm("efficientvit_m0"))
    ref_model = timm.create_model("efficientvit_m0", pretrained=False, img_size=256)
    ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    ref_model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _mlx("efficientvit_m0", state, img_size=256)
    x = _images(256)
    ref = torch_forward(ref_model, x)
    np.testing.assert_allclose(_run(model, x), ref, **TOL)
    # a 224-built model has the same tables, so it takes 256 inputs and computes the same thing
    np.testing.assert_allclose(_run(_mlx("efficientvit_m0", state), x), ref, **TOL)


@pytest.mark.parametrize("img_size, n_resized", [(320, 3), (192, 5), (448, 3)])
def test_size_with_other_tables_resizes_biases(img_size, n_resized):
    state = state_dict_numpy(_timm("efficientvit_m0"))
    ref_model = timm.create_model("efficientvit_m0", pretrained=False, img_size=img_size)
    ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in _resized_for(state, ref_model).items()})
    ref_model.eval()
    model = build_model("efficientvit_m0", img_size=img_size)
    with pytest.warns(UserWarning, match=rf"resized {n_resized} attention-bias table"):
        load_state_dict(model, state)
    model.eval()
    x = _images(img_size)
    np.testing.assert_allclose(_run(model, x), torch_forward(ref_model, x), **TOL)


def test_create_model_from_file_resizes_and_routes_through_convert(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    ref_model = _timm("efficientvit_m2")
    state = state_dict_numpy(ref_model)
    path = tmp_path / "m2.safetensors"
    safetensors_numpy.save_file(state, str(path))
    model = create_model("efficientvit_m2.r224_in1k", pretrained=str(path))
    x = _images(224, batch=1)
    np.testing.assert_allclose(_run(model, x), torch_forward(ref_model, x), **TOL)
    assert model.pretrained_cfg["hf_hub_id"] == "timm/efficientvit_m2.r224_in1k"
    with pytest.warns(UserWarning, match="resized 3 attention-bias"):
        big = create_model("efficientvit_m2", pretrained=str(path), img_size=384)
    assert _run(big, _images(384, batch=1)).shape == (1, 1000)


def test_input_size_errors():
    model = build_model("efficientvit_m0").eval()
    with pytest.raises(ValueError, match="multiples of 16"):
        model(mx.zeros((1, 232, 232, 3)))
    with pytest.raises(ValueError, match=r"img_size=224 \(attention windows 7, 7, 4\); a 320x320 input needs windows 7, 7, 5.*img_size=320.*208\.\.256"):
        model(mx.zeros((1, 320, 320, 3)))
    with pytest.raises(ValueError, match="NCHW"):
        model(mx.zeros((1, 3, 224, 224)))
    with pytest.raises(ValueError, match="img_size must be a positive multiple of 16"):
        build_model("efficientvit_m0", img_size=230)
    # non-square inputs: the shorter side decides the windows, as in timm
    assert model.forward_features(mx.zeros((1, 224, 320, 3)))[-1].shape == (1, 4, 5, 192)


# ---------------------------------------------------------------------------
# Fusion cache, errors, registry
# ---------------------------------------------------------------------------


def test_fused_bias_cache_follows_new_weights():
    model = _mlx("efficientvit_m0", state_dict_numpy(_timm("efficientvit_m0"))).fuse()
    cgas = [m for _, m in model.named_modules() if isinstance(m, CascadedGroupAttention)]
    assert len(cgas) == 6 and all(c._bias_cache is not None for c in cgas)
    x = mx.array(_images(224, batch=1))
    before = np.array(model(x))
    cga = cgas[0]
    new = mx.random.normal(cga.attention_biases.shape, key=mx.random.key(3))
    cga.update({"attention_biases": new})
    table = np.array(cga.attention_bias())
    r = cga.resolution
    ys, xs = np.divmod(np.arange(r * r), r)
    idx = np.abs(ys[:, None] - ys[None]) * r + np.abs(xs[:, None] - xs[None])
    np.testing.assert_array_equal(table, np.array(new)[:, idx])
    assert np.abs(np.array(model(x)) - before).max() > 1e-3


def _error(model, state) -> CheckpointMismatchError:
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict(model, state)
    return info.value


def test_wrong_checkpoints_name_keys():
    state = state_dict_numpy(_timm("efficientvit_m0"))
    model = build_model("efficientvit_m0")

    err = _error(build_model("efficientvit_m0"), state_dict_numpy(timm.create_model("efficientvit_m1")))
    assert "patch_embed.conv1.conv.weight: checkpoint (16, 3, 3, 3) vs model (8, 3, 3, 3)" in str(err)
    assert any(m.startswith("stages.0.blocks.0.mixer.m.attn.qkvs.0.conv.weight: checkpoint (96, 64)") for m in err.mismatched)
    assert "stages.0.blocks.0.mixer.m.attn.qkvs.2.conv.weight" in err.missing  # M1 has 2 heads in stage 1

    truncated = {k: v for k, v in state.items() if not k.startswith(("head.", "stages.2.blocks.2."))}
    err = _error(model, truncated)
    assert "head.linear.weight" in str(err) and not err.unexpected and not err.mismatched
    assert "stages.2.blocks.2.mixer.m.attn.attention_biases" in err.missing

    bad = dict(state)
    bad["stages.1.downsample.patchmerge.conv2.conv.weight"] = np.zeros((256, 1, 5, 5), np.float32)
    err = _error(model, bad)
    assert "stages.1.downsample.patchmerge.conv2.conv.weight" in str(err) and "(256, 5, 5, 1)" in str(err)

    extra = dict(state, **{"stages.2.blocks.7.dw0.m.conv.weight": np.zeros((192, 1, 3, 3), np.float32)})
    err = _error(model, extra)
    assert err.unexpected == ["stages.2.blocks.7.dw0.m.conv.weight"]

    orig = {k: v for k, v in _original_m0_state().items() if k != "blocks3.1.se.fc1.bias"}
    err = _error(model, orig)
    assert "original" in str(err) and err.missing == ["stages.2.downsample.patchmerge.se.fc1.bias"]


def test_registry_entries():
    assert list_models("efficientvit_m*") == VARIANTS
    assert list_models("efficientvit_m*", pretrained=True) == [f"{n}.r224_in1k" for n in VARIANTS]
    cfg = get_pretrained_cfg("efficientvit_m4.r224_in1k")
    assert (cfg.crop_pct, cfg.interpolation, cfg.input_size, cfg.hf_hub_id) == (
        0.875, "bicubic", (3, 224, 224), "timm/efficientvit_m4.r224_in1k")
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
    model = build_model("efficientvit_m5", img_size=288)
    assert model.arch_args["img_size"] == 288 and model.attn_resolutions == (7, 7, 5)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    bn_stats = sum(v.size for k, v in tree_flatten(model.parameters()) if k.endswith(("running_mean", "running_var")))
    ref = timm.create_model("efficientvit_m5", img_size=288)
    assert n_params - bn_stats == sum(p.numel() for p in ref.parameters())


def test_unfused_model_trains():
    """Train mode: batch-statistics BatchNorm, gradients reach the attention biases and the q convs."""
    import mlx.nn as nn

    model = build_model("efficientvit_m0", num_classes=10)
    model.train()
    x = mx.array(_images(224))
    y = mx.array([1, 7])

    def loss_fn(m):
        return nn.losses.cross_entropy(m(x), y).mean()

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    flat = dict(tree_flatten(grads))
    for key in ("stages.0.blocks.0.mixer.m.attn.attention_biases", "stages.2.blocks.2.mixer.m.attn.dws.3.conv.weight",
                "patch_embed.conv1.norm.weight", "head.linear.weight"):
        assert np.abs(np.array(flat[key])).max() > 0, key
    assert np.isfinite(loss.item())
