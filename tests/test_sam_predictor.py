"""SamPredictor: the original predictor's fixture, and the upstream code run live (efficientsam 1.0.0).

``efficientsam`` is a verbatim repackaging of mit-han-lab's EfficientViT-SAM
(with Meta's segment_anything inside); it is run here on the same synthetic
weights at encoder sizes and image sizes the fixtures do not cover. Its
weight-downloading helper is never imported.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import mlx.core as mx

import synthetic
from precision import tol
from mlx_evit.models.registry import build_model
from mlx_evit.sam import SamPredictor
from mlx_evit.tasks.sam_predictor import preprocess_image
from mlx_evit.models.keymap import KeyMap, load_state_dict


def rel(a, ref) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def nchw(x) -> np.ndarray:
    return np.moveaxis(np.asarray(x), -1, 1)


def sam_model(variant: str, state: dict, **overrides):
    model = build_model(variant, **overrides)
    load_state_dict(model, state)
    return model.eval()


def check_outputs(ours, ref, what: str, iou_tol: float = 1e-5):
    (m, iou, low), (m_ref, iou_ref, low_ref) = ours, ref
    assert m.shape == m_ref.shape and m.dtype == np.bool_, what
    assert low.shape == low_ref.shape and iou.shape == iou_ref.shape, what
    assert np.abs(iou - iou_ref).max() <= tol(iou_tol), what
    assert rel(low, low_ref) <= tol(1e-5), what
    assert (m != m_ref).mean() <= 1e-3, what


# ---------------------------------------------------------------------------
# Fixture: the original predictor on L0, 480x640
# ---------------------------------------------------------------------------

L0_CASES = {
    "p1_multi": lambda f: dict(point_coords=f["points_xy"][:1], point_labels=f["point_labels"][:1]),
    "p2_single": lambda f: dict(point_coords=f["points_xy"], point_labels=f["point_labels"], multimask_output=False),
    "box_single": lambda f: dict(box=f["box_xyxy"], multimask_output=False),
    "box_p1_single": lambda f: dict(box=f["box_xyxy"], point_coords=f["points_xy"][:1],
                                    point_labels=f["point_labels"][:1], multimask_output=False),
    "refine": lambda f: dict(point_coords=f["points_xy"][:1], point_labels=f["point_labels"][:1],
                             mask_input=f["p1_multi_lowres"][np.argmax(f["p1_multi_iou"])][None],
                             multimask_output=False),
}


@pytest.fixture(scope="module")
def l0_predictor():
    f = synthetic.fixture("sam_l0_predictor_480x640")
    model = sam_model("efficientvit_sam_l0", synthetic.state_dict(synthetic.keys_file("efficientvit-sam-l0")))
    image = synthetic.synthetic_image("input/sam_l0_predictor_480x640/image", 480, 640)
    assert synthetic.crc32(image) == f["image_crc32"]
    predictor = SamPredictor(model)
    predictor.set_image(image)
    return predictor, image, f


def test_l0_preprocessing_fixture():
    f = synthetic.fixture("sam_l0_predictor_480x640")
    image = synthetic.synthetic_image("input/sam_l0_predictor_480x640/image", 480, 640)
    resized, x = preprocess_image(image, 512)
    np.testing.assert_array_equal(resized, f["resized_uint8"])
    assert x.shape == (512, 512, 3)
    assert abs(x.astype(np.float64).sum() / f["preprocessed_sum"] - 1) <= tol(1e-5)
    assert abs(np.abs(x).astype(np.float64).sum() / f["preprocessed_abssum"] - 1) <= tol(1e-5)


@pytest.mark.parity
@pytest.mark.slow
def test_l0_predictor_fixture(l0_predictor):
    predictor, _, f = l0_predictor
    assert predictor.input_size == tuple(f["input_size"]) and predictor.original_size == (480, 640)
    assert rel(nchw(predictor.get_image_embedding())[..., ::3, ::3], f["embedding_s3"]) <= tol(1e-5)
    for case, kwargs in L0_CASES.items():
        out = predictor.predict(**kwargs(f))
        check_outputs(out, (f[f"{case}_mask"], f[f"{case}_iou"], f[f"{case}_lowres"]), case)
    logits, _, _ = predictor.predict(**L0_CASES["p1_multi"](f), return_logits=True)
    assert logits.dtype == np.float32 and logits.shape == (3, 480, 640)
    assert rel(logits[:, ::4, ::4], f["p1_multi_logits_s4"]) <= tol(1e-5)


@pytest.mark.slow
def test_l0_image_formats_and_batch(l0_predictor):
    """BGR and PIL inputs give the same embedding; predict_batch equals one predict per box."""
    predictor, image, f = l0_predictor
    emb = np.asarray(predictor.get_image_embedding())
    boxes = np.array([f["box_xyxy"], [10, 30, 300, 200], [400, 100, 639, 479]], np.float64)
    masks, iou, low = predictor.predict_batch(boxes=boxes, multimask_output=True)
    assert masks.shape == (3, 3, 480, 640) and iou.shape == (3, 3) and low.shape == (3, 3, 256, 256)
    for i, box in enumerate(boxes):
        m1, i1, l1 = predictor.predict(box=box)
        np.testing.assert_allclose(i1, iou[i], atol=1e-5)
        assert rel(l1, low[i]) <= tol(1e-5) and (m1 != masks[i]).mean() <= 1e-4
    other = SamPredictor(predictor.model)  # same (already fused) model
    other.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    assert rel(other.get_image_embedding(), emb) <= tol(1e-6)
    other.set_image(Image.fromarray(image))
    assert rel(other.get_image_embedding(), emb) <= tol(1e-6)
    other.reset_image()
    with pytest.raises(RuntimeError, match="set_image"):
        other.predict(box=boxes[0])


def test_bad_inputs_are_one_line_errors():
    model = build_model("efficientvit_sam_l0", image_size=64)
    predictor = SamPredictor(model, compile=False)
    with pytest.raises(ValueError, match="uint8"):  # floats are [0, 1]; 0-255 values go in a uint8 array
        predictor.set_image(np.full((10, 10, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        predictor.set_image(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(ValueError, match="image_format"):
        predictor.set_image(np.zeros((10, 10, 3), np.uint8), image_format="RGBA")
    predictor.set_image(np.zeros((30, 50, 3), np.uint8))
    with pytest.raises(ValueError, match="point_labels"):
        predictor.predict(point_coords=np.array([[1, 2]]))
    with pytest.raises(ValueError, match="point_labels must be 1"):
        predictor.predict(point_coords=np.array([[1, 2]]), point_labels=np.array([2]))
    with pytest.raises(ValueError, match="boxes"):
        predictor.predict_batch(boxes=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="mask_input"):
        predictor.predict(point_coords=[[1, 2]], point_labels=[1], mask_input=np.zeros((64, 64)))
    with pytest.raises(ValueError, match="same batch size"):
        predictor.predict_batch(boxes=np.zeros((2, 4)), point_coords=np.zeros((3, 1, 2)),
                                point_labels=np.ones((3, 1)))


# ---------------------------------------------------------------------------
# Fixture: the XL0 image encoder at 512
# ---------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.slow
def test_xl0_encoder_fixture():
    f = synthetic.fixture("sam_xl0_encoder_512")
    keys = {k: v for k, v in synthetic.keys_file("efficientvit-sam-xl0").items() if k.startswith("image_encoder.")}
    encoder = build_model("efficientvit_sam_xl0").image_encoder.eval()
    load_state_dict(encoder, synthetic.state_dict(keys), layout=KeyMap("encoder", "", rules=((r"^image_encoder\.", ""),)))
    x = synthetic.synthetic_normal("input/sam_xl0_encoder_512/x", (1, 3, 512, 512))
    assert synthetic.crc32(x) == f["input_crc32"]
    emb = np.asarray(encoder(mx.array(synthetic.nhwc(x))))
    assert emb.shape == (1, 64, 64, 256)
    assert rel(nchw(emb)[..., ::3, ::3], f["embedding_s3"]) <= tol(1e-5)
    assert abs(emb.astype(np.float64).sum() / f["embedding_sum"] - 1) <= tol(1e-5)
    assert abs(np.abs(emb).astype(np.float64).sum() / f["embedding_abssum"] - 1) <= tol(1e-5)


# ---------------------------------------------------------------------------
# Live: the upstream code (efficientsam 1.0.0) on the same weights, other sizes and prompts
# ---------------------------------------------------------------------------

LIVE = {
    # variant: (upstream builder, encoder size, image height, width)
    "l0": ("efficientvit_sam_l0", 128, 99, 131),
    "l1": ("efficientvit_sam_l1", 192, 151, 233),  # neck: 24 -> 64, a non-integer bicubic factor
    "xl1": ("efficientvit_sam_xl1", 128, 101, 90),
}


def upstream_predictor(builder_name: str, size: int, state: dict):
    torch = pytest.importorskip("torch")
    pytest.importorskip("efficientsam")
    from efficientsam.models.efficientvit import sam as upstream
    from efficientsam.models.nn.norm import set_norm_eps

    torch.set_num_threads(2)
    model = getattr(upstream, builder_name)(image_size=size)
    set_norm_eps(model, 1e-6)  # as the upstream model zoo does for every SAM variant
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return upstream.EfficientViTSamPredictor(model.eval())


@pytest.mark.parity
# L0 (quick), L1 and XL1 (20-50 s each on shared cores: slow)
@pytest.mark.parametrize("variant", ["l0", pytest.param("l1", marks=pytest.mark.slow),
                                     pytest.param("xl1", marks=pytest.mark.slow)])
def test_live_against_upstream(variant):
    torch = pytest.importorskip("torch")
    builder, size, h, w = LIVE[variant]
    state = synthetic.state_dict(synthetic.keys_file(f"efficientvit-sam-{variant}"))
    ref = upstream_predictor(builder, size, state)
    # Eager (mx.compile's first trace of each prompt kind costs seconds on the CPU; the compiled
    # path is checked on the fixtures and in test_compiled_equals_eager).
    ours = SamPredictor(sam_model(f"efficientvit_sam_{variant}", state, image_size=size), compile=False)
    image = synthetic.synthetic_image(f"input/test_sam_live/{variant}", h, w)
    ref.set_image(image)
    ours.set_image(image)
    assert ours.input_size == tuple(ref.input_size) and ours.original_size == tuple(ref.original_size)
    assert rel(nchw(ours.get_image_embedding()), ref.features.numpy()) <= tol(1e-5)

    pts = np.array([[0.3 * w, 0.6 * h], [0.8 * w, 0.2 * h], [0.5 * w, 0.5 * h]])
    box = np.array([0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h])
    cases = [
        dict(point_coords=pts, point_labels=np.array([1, 0, 1])),
        dict(point_coords=pts[:2], point_labels=np.array([1, 1]), box=box, multimask_output=False),
        dict(box=box),
    ]
    for i, kw in enumerate(cases):
        check_outputs(ours.predict(**kw), ref.predict(**kw), f"{variant} case {i}")
    _, iou, low = ref.predict(**cases[0])
    refine = dict(point_coords=pts[:1], point_labels=np.array([1]), mask_input=low[np.argmax(iou)][None],
                  multimask_output=False)
    check_outputs(ours.predict(**refine), ref.predict(**refine), f"{variant} refine")

    boxes = np.array([box, [0, 0, w - 1, h - 1], [0.5 * w, 0.1 * h, 0.95 * w, 0.6 * h]])
    with torch.no_grad():
        tb = torch.from_numpy(ref.apply_boxes(boxes)).float()
        m_ref, iou_ref, low_ref = ref.predict_torch(boxes=tb, multimask_output=True)
    check_outputs(ours.predict_batch(boxes=boxes), (m_ref.numpy(), iou_ref.numpy(), low_ref.numpy()),
                  f"{variant} batch of boxes")


@pytest.mark.parity
def test_compiled_equals_eager():
    """The compiled encoder and decoder give the eager results (L0 at a 128 encoder size, BN folded)."""
    state = synthetic.state_dict(synthetic.keys_file("efficientvit-sam-l0"))
    image = synthetic.synthetic_image("input/test_sam/compiled", 90, 128)
    results = []
    for compile in (False, True):
        p = SamPredictor(sam_model("efficientvit_sam_l0", state, image_size=128), compile=compile,
                         fuse=compile)
        p.set_image(image)
        results.append((np.asarray(p.get_image_embedding()),
                        p.predict(point_coords=[[30, 40], [100, 60]], point_labels=[1, 0], box=[5, 5, 120, 80])))
    (e0, out0), (e1, out1) = results
    assert rel(e1, e0) <= tol(1e-5)
    check_outputs(out1, out0, "compiled vs eager")
