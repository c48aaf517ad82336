"""EfficientViT-SAM (mlx_evit.sam) against the original code's fixtures and key lists.

Fixtures (tests/data/fixtures, computed by mit-han-lab/efficientvit with
segment-anything 1.0 on synthetic weights): ``sam_decoder_l0`` (prompt
encoder and mask decoder alone), ``sam_l0_predictor_480x640`` (the whole
predictor) and ``sam_xl0_encoder_512``. Tolerances from the fixtures'
README: float32 arrays within 1e-5 of their max, IoU 1e-5 absolute, masks
at most 0.1% flipped pixels.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

import synthetic
from precision import tol
from mlx_evit.models.registry import build_model, list_models
from mlx_evit.sam import MaskDecoder, PromptEncoder
from mlx_evit.models.sam_model import ORIGINAL_LAYOUT, resize_matrix
from mlx_evit.tasks.sam_predictor import postprocess_matrices, preprocess_shape
from mlx_evit.models.keymap import KeyMap, load_state_dict, map_state_dict

VARIANTS = {"efficientvit_sam_l0": "efficientvit-sam-l0", "efficientvit_sam_l1": "efficientvit-sam-l1",
            "efficientvit_sam_l2": "efficientvit-sam-l2", "efficientvit_sam_xl0": "efficientvit-sam-xl0",
            "efficientvit_sam_xl1": "efficientvit-sam-xl1"}


def rel(a, ref) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def nchw(x) -> np.ndarray:
    return np.moveaxis(np.asarray(x), -1, 1)


def sub_model(module, prefix: str, keys: dict):
    """Load the ``prefix``-keys of a synthetic checkpoint into ``module`` (a part of the model)."""
    state = synthetic.state_dict({k: v for k, v in keys.items() if k.startswith(prefix)})
    load_state_dict(module, state, layout=KeyMap("part", "", rules=(("^" + prefix.replace(".", r"\."), ""),)))
    return module


def sam_model(variant: str, **overrides):
    model = build_model(variant, **overrides)
    load_state_dict(model, synthetic.state_dict(synthetic.keys_file(VARIANTS[variant])))
    return model.eval()


# ---------------------------------------------------------------------------
# Registry and key layout
# ---------------------------------------------------------------------------


def test_registry_entries():
    assert set(list_models("efficientvit_sam_*")) == set(VARIANTS)
    assert {build_model(v).image_size for v in VARIANTS} == {512, 1024}
    assert build_model("efficientvit_sam_xl0").image_size == 1024


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_upstream_key_maps_to_one_parameter(variant):
    """Each key of the released layout names exactly one parameter, with the right (converted) shape."""
    keys = synthetic.keys_file(VARIANTS[variant])
    model = build_model(variant)
    # Zero-stride views: shapes without materialising the weights.
    state = {k: np.broadcast_to(np.zeros((), np.dtype(d.replace("torch.", ""))), s) for k, (s, d) in keys.items()}
    params, origin = map_state_dict(model, state, ORIGINAL_LAYOUT)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert sorted(params) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in params.items()} == expected
    dropped = [k for k in keys if ORIGINAL_LAYOUT.target(k) is None]
    assert all(k.endswith("num_batches_tracked") for k in dropped)
    assert len(origin) + len(dropped) == len(keys)
    n = sum(int(np.prod(s)) for k, (s, d) in keys.items() if not k.endswith("num_batches_tracked"))
    assert n == sum(int(np.prod(s)) for s in expected.values())


def test_strict_load_reports_missing_and_wrong_shapes():
    keys = synthetic.keys_file("efficientvit-sam-l0")
    state = {k: np.zeros(s, np.float32) for k, (s, d) in keys.items() if "num_batches" not in k}
    model = build_model("efficientvit_sam_l0")
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.output_upscaling.0.weight"] = np.zeros((64, 256, 2, 2), np.float32)
    with pytest.raises(ValueError) as e:
        load_state_dict(model, state)
    assert "mask_decoder.iou_token.weight" in str(e.value) and "output_upscaling.0.weight" in str(e.value)


# ---------------------------------------------------------------------------
# Resizing helpers (torch's index arithmetic)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("n_in,n_out", [(256, 1024), (16, 64), (48, 64), (768, 480), (37, 101)])
def test_resize_matrix_matches_torch(mode, n_in, n_out):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((1, 1, n_in, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(n_out, 3), mode=mode,
                                          align_corners=False).numpy()[0, 0]
    ours = resize_matrix(n_in, n_out, mode) @ x[0, 0]
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


def test_odd_size_crop_rule():
    """The crop size comes from the 1024 frame, not from twice the 512 frame (101x1000: 52x512 vs 103x1024)."""
    assert preprocess_shape(101, 1000, 512) == (52, 512)
    assert preprocess_shape(101, 1000, 1024) == (103, 1024)
    mh, mw = postprocess_matrices((103, 1024), (101, 1000))
    assert mh.shape == (101, 256) and mw.shape == (1000, 256)
    # Each output row is a convex combination of low-res rows (weights sum to one).
    np.testing.assert_allclose(mh.sum(1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------
# Decoder alone: sam_decoder_l0
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_parts():
    keys = synthetic.keys_file("efficientvit-sam-l0")
    return sub_model(PromptEncoder(), "prompt_encoder.", keys), sub_model(MaskDecoder(), "mask_decoder.", keys)


@pytest.mark.parity
def test_decoder_l0_fixture(decoder_parts):
    pe, md = decoder_parts
    f = synthetic.fixture("sam_decoder_l0")
    emb = synthetic.synthetic_normal("input/sam_decoder_l0/embedding", (1, 256, 64, 64))
    mask_in = synthetic.synthetic_normal("input/sam_decoder_l0/mask_input", (1, 1, 256, 256))
    assert synthetic.crc32(emb) == f["embedding_crc32"] and synthetic.crc32(mask_in) == f["mask_input_crc32"]
    dense_pe = pe.dense_pe()
    assert rel(nchw(dense_pe)[..., ::3, ::3], f["dense_pe_s3"]) <= tol(1e-5)
    for case, multimask in (("points_multi", True), ("point_box_mask_single", False)):
        points = (mx.array(f[f"{case}_points"][None]), mx.array(f[f"{case}_labels"][None]))
        box = mx.array(f[f"{case}_box"][None]) if f"{case}_box" in f else None
        masks = mx.array(synthetic.nhwc(mask_in)) if "mask" in case else None
        sparse, dense = pe(points, box, masks)
        assert sparse.shape == (1, 3, 256)
        assert rel(sparse, f[f"{case}_sparse"]) <= tol(1e-5), case
        if masks is not None:
            assert rel(nchw(dense)[..., ::6, ::6], f[f"{case}_dense_s6"]) <= tol(1e-5)
        low, iou = md(mx.array(synthetic.nhwc(emb)), dense_pe, sparse, dense, multimask)
        assert low.shape == f[f"{case}_lowres"].shape
        assert rel(low, f[f"{case}_lowres"]) <= tol(1e-5), case
        assert np.abs(np.asarray(iou) - f[f"{case}_iou"]).max() <= tol(1e-5), case


@pytest.mark.parity
def test_decoder_batch_equals_single_prompts(decoder_parts):
    """B prompt sets in one call give each set's own result (no mixing across the batch)."""
    pe, md = decoder_parts
    emb = mx.array(synthetic.nhwc(synthetic.synthetic_normal("input/sam_decoder_l0/embedding", (1, 256, 64, 64))))
    boxes = mx.array(np.array([[10, 20, 500, 700], [300, 300, 900, 1000], [0, 0, 1023, 1023]], np.float32))
    sparse, dense = pe(None, boxes, None)
    low, iou = md(emb, pe.dense_pe(), sparse, dense, True)
    for i in range(3):
        s1, d1 = pe(None, boxes[i : i + 1], None)
        l1, i1 = md(emb, pe.dense_pe(), s1, d1, True)
        np.testing.assert_allclose(np.asarray(low[i]), np.asarray(l1[0]), atol=1e-4)
        np.testing.assert_allclose(np.asarray(iou[i]), np.asarray(i1[0]), atol=1e-5)
