"""Parity of MIT EfficientViT B0-B3 / L1-L3 (mlx_evit.models.mit) with timm and the original code.

References nobody here wrote: timm 1.0.31's ``efficientvit_mit.py`` (run in
the test with random weights and randomized BatchNorm statistics), and the
fixture ``mit_efficientvit_b0_r224_random.pt`` whose logits were computed by
the original mit-han-lab code. The original L-series layout is checked
against timm with the original constants patched in (attention eps 1e-15,
head BatchNorm eps 1e-7), which the spec measured bit-identical to the
original code.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

from mlx_evit import create_model, get_pretrained_cfg, list_models
from mlx_evit.ops.layers import ConvNorm
from mlx_evit.models.mit import ORIGINAL_LARGE_LAYOUT, ORIGINAL_LAYOUT, TIMM_LAYOUT, MitEfficientViT
from mlx_evit.models.registry import build_model
from mlx_evit.models.keymap import CheckpointMismatchError, load_state_dict, select_layout

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import timm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch_utils import randomize_, state_dict_numpy, torch_forward  # noqa: E402
import synthetic  # noqa: E402
from precision import tol  # noqa: E402
from mlx_evit.ops.backend import float32_is_tf32  # noqa: E402

torch.set_num_threads(2)

FIXTURES = str(synthetic.FIXTURES)
VARIANTS = ("b0", "b1", "b2", "b3", "l1", "l2", "l3")
# Second resolution per variant (the first is 224) and batch size (1 for the heavy L models).
SECOND_RES = {"b0": 256, "b1": 288, "b2": 256, "b3": 288, "l1": 256, "l2": 288, "l3": 256}
BATCH = {"b0": 2, "b1": 2, "b2": 2, "b3": 2, "l1": 1, "l2": 1, "l3": 1}
TOL = dict(atol=1e-4, rtol=1e-4)


def _name(variant: str) -> str:
    return f"efficientvit_{variant}"


def _input(batch: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, h, w, 3)).astype(np.float32)


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


class TimmZoo:
    """timm models with random weights, built once per variant, and their cached outputs."""

    def __init__(self):
        self._models: dict[str, torch.nn.Module] = {}
        self._states: dict[str, dict[str, np.ndarray]] = {}
        self._logits: dict[tuple, np.ndarray] = {}

    def model(self, variant: str) -> torch.nn.Module:
        if variant not in self._models:
            torch.manual_seed(VARIANTS.index(variant))
            m = timm.create_model(_name(variant), pretrained=False)
            self._models[variant] = randomize_(m, seed=VARIANTS.index(variant))
        return self._models[variant]

    def state(self, variant: str) -> dict[str, np.ndarray]:
        if variant not in self._states:
            self._states[variant] = state_dict_numpy(self.model(variant))
        return self._states[variant]

    def logits(self, variant: str, batch: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(NHWC input, timm logits) for a seeded input of this shape."""
        key = (variant, batch, h, w)
        if key not in self._logits:
            self._logits[key] = torch_forward(self.model(variant), _input(batch, h, w))
        return _input(batch, h, w), self._logits[key]

    def release(self, variant: str) -> None:
        """Drop a variant's torch model and weights (rebuilt identically if asked again)."""
        self._models.pop(variant, None)
        self._states.pop(variant, None)

    def mlx_model(self, variant: str) -> MitEfficientViT:
        """Our model with the timm weights loaded (timm layout), eval mode."""
        model = build_model(_name(variant))
        layout = load_state_dict(model, self.state(variant))
        assert layout is TIMM_LAYOUT
        return model.eval()


@pytest.fixture(scope="module")
def zoo():
    return TimmZoo()


# ---------------------------------------------------------------------------
# Registry and key tables (no torch model needed)
# ---------------------------------------------------------------------------


def test_registry_tags_match_timm_pretrained_cfgs():
    ours = list_models("efficientvit_[bl]*", pretrained=True)
    theirs = timm.list_pretrained("efficientvit_[bl]*")
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 19
    for name in theirs:
        mine = get_pretrained_cfg(name)
        ref = timm.models.get_pretrained_cfg(name)
        assert tuple(mine.input_size) == tuple(ref.input_size), name
        assert mine.crop_pct == ref.crop_pct, name
        assert mine.interpolation == ref.interpolation == "bicubic", name
        assert mine.crop_mode == ref.crop_mode, name
        assert tuple(mine.mean) == tuple(ref.mean) and tuple(mine.std) == tuple(ref.std), name
        assert mine.num_classes == ref.num_classes, name
        assert mine.hf_hub_id == ref.hf_hub_id == f"timm/{name}", name
    # The bare architecture name selects timm's default (first) tag.
    assert get_pretrained_cfg("efficientvit_l3").tag == "r224_in1k"
    assert list_models("efficientvit_[bl]*") == [_name(v) for v in VARIANTS]


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_keys_map_to_timm_keys(variant):
    """Every original key of the spec's per-variant table maps to the timm key beside it,
    and the timm keys are exactly our parameter paths (plus BN counters)."""
    path = os.path.join(FIXTURES, "keys", f"{variant}_orig_timm_shape.tsv")
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    original = [r["original_key"] for r in rows]
    layout = select_layout(original, MitEfficientViT.checkpoint_layouts)
    assert layout is (ORIGINAL_LARGE_LAYOUT if variant.startswith("l") else ORIGINAL_LAYOUT)
    assert select_layout([r["timm_key"] for r in rows], MitEfficientViT.checkpoint_layouts) is TIMM_LAYOUT
    wrong = [(r["original_key"], layout.target(r["original_key"]), r["timm_key"])
             for r in rows if layout.target(r["original_key"]) != TIMM_LAYOUT.target(r["timm_key"])]
    assert not wrong, wrong[:5]

    params = dict(tree_flatten(build_model(_name(variant)).parameters()))
    timm_keys = {r["timm_key"] for r in rows if not r["timm_key"].endswith("num_batches_tracked")}
    assert set(params) == timm_keys
    n_params = sum(int(np.prod(eval(r["torch_shape"]))) for r in rows if r["dtype"] == "float32"
                   and not r["timm_key"].endswith(("running_mean", "running_var")))
    n_ours = sum(v.size for k, v in params.items() if not k.endswith(("running_mean", "running_var")))
    assert n_ours == n_params


# ---------------------------------------------------------------------------
# Numerical parity with timm
# ---------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_timm(zoo, variant):
    """Unfused, then BN-folded, at 224 and a second resolution, against timm (same weights)."""
    model = zoo.mlx_model(variant)
    sizes = (224, SECOND_RES[variant])
    cases = [zoo.logits(variant, BATCH[variant], s, s) for s in sizes]
    for s, (x, ref) in zip(sizes, cases):
        out = np.array(model(mx.array(x)))
        assert out.shape == (BATCH[variant], 1000)
        np.testing.assert_allclose(out, ref, **TOL, err_msg=f"{variant} at {s}: max |diff| {_max_diff(out, ref):.2e}")

    model.fuse()
    convs = [m for _, m in model.named_modules() if isinstance(m, ConvNorm)]
    assert convs and all(m.norm is None for m in convs)
    assert not any(isinstance(m, nn.BatchNorm) for _, m in model.named_modules())
    for s, (x, ref) in zip(sizes, cases):
        out = np.array(model(mx.array(x)))
        np.testing.assert_allclose(out, ref, **TOL,
                                   err_msg=f"fused {variant} at {s}: max |diff| {_max_diff(out, ref):.2e}")
    if variant not in ("b0", "b1", "l1"):  # the other tests only use these; keep memory low
        zoo.release(variant)


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["b1", "l1"])
def test_odd_input_size_features_and_logits(zoo, variant):
    """200x232 (odd maps after stride 8): stage maps and logits agree with timm."""
    x = _input(1, 200, 232, seed=1)
    model = zoo.mlx_model(variant)
    feats = model.forward_features(mx.array(x))
    logits = np.array(model(mx.array(x)))
    with torch.no_grad():
        tm = zoo.model(variant)
        x_nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        t_logits = tm(x_nchw)
        _, t_feats = tm.forward_intermediates(x_nchw)
    assert len(feats) == 4
    for i, (f, tf, info) in enumerate(zip(feats, t_feats, model.feature_info)):
        tf = tf.numpy().transpose(0, 2, 3, 1)
        stride = info["reduction"]
        assert f.shape == tf.shape == (1, -(-200 // stride), -(-232 // stride), info["num_chs"])
        scale = float(np.abs(tf).max())
        assert _max_diff(f, tf) <= tol(1e-5) * (scale + 1), f"stage {i}: {_max_diff(f, tf):.2e}"
    np.testing.assert_allclose(logits, t_logits.numpy(), **TOL)


@pytest.mark.parity
def test_create_model_from_timm_safetensors(zoo, tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in zoo.model("b0").state_dict().items()}, path)
    model = create_model("efficientvit_b0.r224_in1k", pretrained=path)
    assert model.arch_args["attention_eps"] == 1e-5  # timm layout keeps timm's constant
    assert model.pretrained_cfg["crop_pct"] == 0.95
    x, ref = zoo.logits("b0", 2, 224, 224)
    out = np.array(model(mx.array(x)))
    np.testing.assert_allclose(out, ref, **TOL)


# ---------------------------------------------------------------------------
# Original (mit-han-lab) checkpoints
# ---------------------------------------------------------------------------


MIT_B0_CASES = {"x224": (2, 224, 224), "x160x192": (2, 160, 192), "x128": (2, 128, 128), "x200x232": (1, 200, 232)}


def _original_b0_state() -> dict[str, torch.Tensor]:
    """The fixture's synthetic B0 (mit-han-lab layout), as torch tensors."""
    keys = synthetic.keys_file("mit_b0_cls_keys.json")
    return {k: torch.from_numpy(v) for k, v in synthetic.state_dict(keys).items()}


@pytest.fixture(scope="module")
def original_b0_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("mit_b0") / "efficientvit_b0_synthetic.pt"
    torch.save({"state_dict": _original_b0_state()}, path)
    return str(path)


@pytest.mark.parity
@pytest.mark.parametrize("case", list(MIT_B0_CASES))
def test_original_b0_fixture_reproduces_reference_logits(case, original_b0_file):
    """The original-layout B0 (a ``{"state_dict": ...}`` torch pickle) loads through create_model
    with eps 1e-15 implied by its layout and gives the original code's logits and stage-4 map at
    square, non-square, odd and quadratic-branch (x128) sizes."""
    ref = synthetic.fixture("mit_b0_cls")
    b, h, w = MIT_B0_CASES[case]
    x = mx.array(synthetic.nhwc(synthetic.synthetic_normal(f"input/mit_b0_cls/{case}", (b, 3, h, w))))
    want, want_final = ref[f"{case}_logits"], synthetic.nhwc(ref[f"{case}_stage_final"])
    close = dict(rtol=0, atol=1e-5 * float(np.abs(want).max()))
    model = create_model("efficientvit_b0", pretrained=original_b0_file)
    assert model.arch_args["attention_eps"] == 1e-15
    out = np.array(model(x))
    diff = _max_diff(out, want)
    print(f"original B0 fixture {case}: max |diff| {diff:.2e} (|logits| <= {np.abs(want).max():.2f})")
    np.testing.assert_allclose(out, want, **close)
    final = np.array(model.forward_features(x)[-1])
    np.testing.assert_allclose(final, want_final, rtol=0, atol=1e-5 * float(np.abs(want_final).max()))

    if case == "x224":
        # The same weights with timm's eps are measurably further from the original code.
        timm_eps = build_model("efficientvit_b0").eval()
        state = {k: v.numpy() for k, v in _original_b0_state().items()}
        assert load_state_dict(timm_eps, state) is ORIGINAL_LAYOUT
        if not float32_is_tf32():  # under TF32 the rounding of the GEMMs hides the eps difference
            assert _max_diff(timm_eps(x), want) > 5 * diff

    model.fuse()
    fused_diff = _max_diff(model(x), want)
    print(f"original B0 fixture {case}, BN folded: max |diff| {fused_diff:.2e}")
    np.testing.assert_allclose(np.array(model(x)), want, **close)


def _to_original_keys(state: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """Rename a timm state dict to the original layout with the spec's key table."""
    with open(os.path.join(FIXTURES, "keys", f"{variant}_orig_timm_shape.tsv")) as f:
        to_orig = {r["timm_key"]: r["original_key"] for r in csv.DictReader(f, delimiter="\t")}
    return {to_orig[k]: v.contiguous() for k, v in state.items()}


@pytest.mark.parity
def test_original_large_layout_uses_original_constants(tmp_path):
    """An L1 checkpoint in the original layout gets attention eps 1e-15 and head BN eps 1e-7.

    Weights are chosen so both constants matter: tiny head BN variances, and
    q/k projections of the attention blocks scaled down so the normaliser is
    small. Reference: timm with the original constants patched in.
    """
    torch.manual_seed(11)
    tm = randomize_(timm.create_model("efficientvit_l1", pretrained=False), seed=11)
    dim = 32
    with torch.no_grad():
        head_bn = tm.head.in_conv.norm
        head_bn.running_var.copy_(torch.rand(head_bn.running_var.shape) * 1e-6 + 1e-8)
        for block in tm.stages[3].blocks[1:]:
            w = block.context_module.main.qkv.conv.weight  # (3 * heads * dim, C, 1, 1)
            per_head = w.view(-1, 3 * dim, *w.shape[1:])
            per_head[:, : 2 * dim] *= 1e-3  # q and k rows of every head; v unchanged
    x = _input(1, 224, 224, seed=2)
    ref_timm = torch_forward(tm, x)
    for m in tm.modules():
        if type(m).__name__ == "LiteMLA":
            m.eps = 1e-15
    head_bn.eps = 1e-7
    ref_orig = torch_forward(tm, x)

    path = str(tmp_path / "l1_original.safetensors")
    save_file(_to_original_keys(tm.state_dict(), "l1"), path)
    model = create_model("efficientvit_l1", pretrained=path)
    assert model.arch_args["attention_eps"] == 1e-15
    out = np.array(model(mx.array(x)))
    print(f"L1 original layout: max |diff| {_max_diff(out, ref_orig):.2e}")
    np.testing.assert_allclose(out, ref_orig, **TOL)

    # Each constant on its own changes the result beyond the tolerance.
    for overrides in ({"attention_eps": 1e-5}, {"head_norm_eps": 1e-5}):
        other = create_model("efficientvit_l1", pretrained=path, **overrides)
        assert _max_diff(other(mx.array(x)), ref_orig) > 1e-2, overrides
    # The registry defaults are timm's constants: timm's layout reproduces timm itself.
    timm_model = build_model("efficientvit_l1").eval()
    assert load_state_dict(timm_model, state_dict_numpy(tm)) is TIMM_LAYOUT
    np.testing.assert_allclose(np.array(timm_model(mx.array(x))), ref_timm, **TOL)


# ---------------------------------------------------------------------------
# Errors, dtypes, training
# ---------------------------------------------------------------------------


def test_checkpoint_for_other_variant_is_refused(zoo):
    model = build_model("efficientvit_b0")
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict(model, zoo.state("b1"), source="b1.safetensors")
    msg = str(info.value)
    assert "b1.safetensors" in msg and "efficientvit_b0" in msg
    assert "stem.in_conv.conv.weight: checkpoint (16, 3, 3, 3) vs model (8, 3, 3, 3)" in msg
    assert "stages.1.blocks.2.main.inverted_conv.conv.weight" in info.value.unexpected


def test_truncated_checkpoint_names_missing_keys(zoo):
    state = dict(zoo.state("b0"))
    gone = ("head.classifier.4.bias", "stages.2.blocks.1.context_module.main.aggreg.0.1.weight")
    for k in gone:
        del state[k]
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict(build_model("efficientvit_b0"), state)
    msg = str(info.value)
    assert "missing keys" in msg and all(k in msg for k in gone)
    assert sorted(info.value.missing) == sorted(gone)


def test_wrong_shape_names_the_key():
    state = _original_b0_state()
    key = "backbone.stages.3.op_list.1.context_module.main.qkv.conv.weight"
    state = {k: v.numpy() for k, v in state.items()}
    state[key] = state[key][:-16]
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict(build_model("efficientvit_b0"), state)
    msg = str(info.value)
    assert key in msg and "stages.3.blocks.1.context_module.main.qkv.conv.weight" in msg
    assert "checkpoint (368, 128) vs model (384, 128)" in msg


def test_unknown_layout_is_refused():
    with pytest.raises(CheckpointMismatchError, match="none of the known layouts"):
        load_state_dict(build_model("efficientvit_b0"), {"patch_embed.0.c.weight": np.zeros((1,))})


def test_input_validation_names_the_problem():
    model = build_model("efficientvit_b0").eval()
    with pytest.raises(ValueError, match="NCHW"):
        model(mx.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="4-D"):
        model(mx.zeros((64, 64, 3)))


def test_half_precision_keeps_attention_in_float32(zoo):
    """float16 model, original eps 1e-15 (zero in float16), qkv weights scaled x10.

    The attention sums then exceed float16's range (a float16 core gives NaN);
    the float32 core stays finite and close to the float32 model.
    """
    state = {k: v * 10 if k.endswith("qkv.conv.weight") else v for k, v in zoo.state("b0").items()}
    x = mx.array(_input(2, 224, 224))
    model = build_model("efficientvit_b0", attention_eps=1e-15)
    load_state_dict(model, state)
    ref = np.array(model.eval()(x))
    model.set_dtype(mx.float16)
    out = model(x.astype(mx.float16))
    assert out.dtype == mx.float16
    out = np.array(out.astype(mx.float32))
    assert np.isfinite(out).all()
    assert _max_diff(out, ref) < 0.02 * np.abs(ref).max()


def test_features_without_classifier_and_training_step(zoo):
    """num_classes=0 gives pre-logits features; the unfused model trains (BN stats frozen)."""
    feats_model = build_model("efficientvit_b0", num_classes=0)
    assert feats_model.num_features == 1280
    assert feats_model(mx.zeros((1, 64, 64, 3))).shape == (1, 1280)

    model = build_model("efficientvit_b0", num_classes=10)
    model.train()
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert not any(k.endswith(("running_mean", "running_var")) for k in trainable)
    x = mx.array(_input(2, 64, 64))
    y = mx.array([1, 7])

    def loss_fn(m):
        return nn.losses.cross_entropy(m(x), y).mean()

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    grads = dict(tree_flatten(grads))
    assert np.isfinite(loss.item())
    assert set(grads) == set(trainable)
    qkv = grads["stages.3.blocks.1.context_module.main.qkv.conv.weight"]
    assert float(mx.abs(qkv).max()) > 0
