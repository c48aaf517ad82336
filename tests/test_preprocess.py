"""Preprocessing equals timm's eval transform; bad image files fail clearly."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_evit
from mlx_evit.tasks.transforms import (
    CROP_MODES,
    EvalTransform,
    ImageLoadError,
    eval_transform,
    load_image,
    preprocess,
    preprocess_batch,
    to_rgb,
)
from mlx_evit.models.registry import get_pretrained_cfg

torch = pytest.importorskip("torch")
timm_data = pytest.importorskip("timm.data")
torch.set_num_threads(2)

PHOTOS = Path(__file__).resolve().parent / "data" / "images"
PHOTO_NAMES = ("cat.png", "coffee.png", "rocket.jpg")

# The distinct timm eval configs of the EfficientViT tags (input size, crop_pct),
# plus non-default paths of timm's eval transform: a non-square size (ResizeKeepRatio),
# crop_pct > 1 (zero padding), squash and border modes, other filters and stats.
EXPLICIT_CFGS = {
    "224-0.95": {"input_size": (3, 224, 224), "crop_pct": 0.95},
    "256-1.0": {"input_size": (3, 256, 256), "crop_pct": 1.0},
    "288-1.0": {"input_size": (3, 288, 288), "crop_pct": 1.0},
    "224-1.0": {"input_size": (3, 224, 224), "crop_pct": 1.0},
    "320-1.0": {"input_size": (3, 320, 320), "crop_pct": 1.0},
    "384-1.0": {"input_size": (3, 384, 384), "crop_pct": 1.0},
    "224-0.875": {"input_size": (3, 224, 224), "crop_pct": 0.875},
    "256x192-bilinear": {"input_size": (3, 256, 192), "crop_pct": 0.9, "interpolation": "bilinear"},
    "160-pad-nearest": {"input_size": (3, 160, 160), "crop_pct": 1.3, "interpolation": "nearest"},
    "squash-lanczos": {"input_size": (3, 200, 232), "crop_pct": 0.9, "crop_mode": "squash", "interpolation": "lanczos"},
    "border-stats": {
        "input_size": (3, 224, 224),
        "crop_pct": 0.8,
        "crop_mode": "border",
        "interpolation": "hamming",
        "mean": (0.5, 0.25, 0.75),
        "std": (0.5, 0.3, 0.2),
    },
    "border-box": {"input_size": (3, 192, 256), "crop_pct": 1.0, "crop_mode": "border", "interpolation": "box"},
}


def _registered_cfgs() -> dict[str, dict]:
    """Registered pretrained tags whose preprocessing no explicit config covers (keyed by tag).

    Every registered tag is thereby tested: either through an identical explicit
    config or through its own entry here.
    """
    seen = {eval_transform(cfg) for cfg in EXPLICIT_CFGS.values()}
    cfgs = {}
    for name in mlx_evit.list_models(pretrained=True):
        cfg = get_pretrained_cfg(name).to_dict()
        if cfg.get("crop_mode", "center") not in CROP_MODES:
            continue  # a dense-prediction tag (segmentation's "resize"): its own transform, tested with it
        transform = eval_transform(cfg)
        if transform not in seen:
            seen.add(transform)
            cfgs[name] = cfg
    return cfgs


ALL_CFGS = {**EXPLICIT_CFGS, **_registered_cfgs()}
# Image modes do not interact with the config, sizes do through the resize rule:
# odd files go through one config per resize/crop path.
ODD_CFGS = ("224-0.95", "384-1.0", "256x192-bilinear", "160-pad-nearest", "squash-lanczos", "border-stats")


@functools.cache
def _timm_transform(cfg_id: str):
    data_config = timm_data.resolve_data_config(pretrained_cfg=dict(ALL_CFGS[cfg_id]))
    return timm_data.create_transform(**data_config, is_training=False)


def _timm(cfg_id: str, image: Image.Image) -> np.ndarray:
    """timm's eval output for an already-loaded RGB image, as (H, W, 3)."""
    return _timm_transform(cfg_id)(image).permute(1, 2, 0).numpy()


def _timm_loaded(path: Path) -> Image.Image:
    """The image the way timm's ImageDataset hands it to the transform."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's note on palette alpha tables
        with Image.open(path) as img:
            return img.convert("RGB")


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: (height, width, 3) uint8 with detail for the filters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> dict[str, Path]:
    """Files in the sizes and modes that take the less common paths through loading."""
    root = tmp_path_factory.mktemp("odd")
    rgb = _pattern(61, 45, 0)
    files = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        files[name] = root / name
        image.save(files[name], **kwargs)

    save("tiny-5x7.png", Image.fromarray(_pattern(5, 7, 1)))
    save("wide-1000x20.png", Image.fromarray(_pattern(1000, 20, 2)))
    save("tall-20x300.png", Image.fromarray(_pattern(20, 300, 3)))
    save("gray-L.png", Image.fromarray(rgb[..., 0], mode="L"))
    save("bilevel-1.png", Image.fromarray(rgb[..., 1] > 127))
    palette = Image.fromarray(rgb).quantize(colors=37)
    save("palette-P.png", palette, transparency=3)
    save("palette-alpha-P.png", palette, transparency=bytes(range(0, 256, 7)))
    rgba = np.concatenate([rgb, _pattern(61, 45, 4)[..., :1]], -1)
    save("rgba.png", Image.fromarray(rgba, mode="RGBA"))
    save("gray-alpha-LA.png", Image.fromarray(rgba[..., 1:3], mode="LA"))
    save("cmyk.tiff", Image.fromarray(rgba, mode="RGBA").convert("CMYK"))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=90)
    return files


def _photo(name: str) -> Path:
    return PHOTOS / name


# ---------------------------------------------------------------- parity with timm


@pytest.mark.parametrize("cfg_id", list(ALL_CFGS))
@pytest.mark.parametrize("photo", PHOTO_NAMES)
def test_photos_match_timm(cfg_id, photo):
    path = _photo(photo)
    ours = preprocess(path, ALL_CFGS[cfg_id])
    expected = _timm(cfg_id, _timm_loaded(path))
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-5


ODD_NAMES = (
    "tiny-5x7.png",
    "wide-1000x20.png",
    "tall-20x300.png",
    "gray-L.png",
    "bilevel-1.png",
    "palette-P.png",
    "palette-alpha-P.png",
    "rgba.png",
    "gray-alpha-LA.png",
    "cmyk.tiff",
    "cmyk.jpg",
)


@pytest.mark.parametrize("cfg_id", ODD_CFGS)
@pytest.mark.parametrize("odd", ODD_NAMES)
def test_odd_sizes_and_modes_match_timm(odd_images, cfg_id, odd):
    path = odd_images[odd]
    ours = preprocess(path, ALL_CFGS[cfg_id])
    expected = _timm(cfg_id, _timm_loaded(path))
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-5


def test_palette_alpha_table_loads_without_warning(odd_images):
    path = odd_images["palette-alpha-P.png"]
    with Image.open(path) as img:
        assert img.mode == "P" and isinstance(img.info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).mode == "RGB"


def test_alpha_is_dropped_like_timm(odd_images):
    """RGBA keeps the stored colour under transparent pixels (no compositing)."""
    path = odd_images["rgba.png"]
    with Image.open(path) as img:
        stored = np.asarray(img)[..., :3]
    assert np.array_equal(np.asarray(load_image(path)), stored)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    """I;16 maps 0..65535 onto 0..255 (Pillow's own convert would clip everything above 255)."""
    values = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 54).astype(np.uint16)
    values[0, :3] = (0, 257 * 128, 65535)
    path = tmp_path / "deep16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")
    loaded = np.asarray(load_image(path))
    gray = np.rint(values / 257.0).astype(np.uint8)
    assert loaded.shape == (30, 40, 3)
    assert np.array_equal(loaded, np.repeat(gray[..., None], 3, -1))
    assert tuple(loaded[0, :3, 0]) == (0, 128, 255)
    # Through the transform: identical to timm on the correctly scaled gray image.
    expected = _timm("224-0.95", Image.fromarray(gray, mode="L").convert("RGB"))
    assert np.abs(preprocess(path, ALL_CFGS["224-0.95"]) - expected).max() <= 1e-5


def test_int32_and_float_modes():
    small = np.array([[0, 7, 255]], dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(small, mode="I")))[0, :, 0].tolist() == [0, 7, 255]
    deep = np.array([[0, 257, 65535, 70000, -5]], dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(deep, mode="I")))[0, :, 0].tolist() == [0, 1, 255, 255, 0]
    unit = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(unit, mode="F")))[0, :, 0].tolist() == [0, 128, 255, 0]
    byte_range = np.array([[0.0, 100.4, 300.0]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(byte_range, mode="F")))[0, :, 0].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6 (stored rotated; display turns it 90 degrees clockwise)."""
    stored = np.full((40, 64, 3), 255, dtype=np.uint8)
    stored[:16, :16] = (255, 0, 0)  # red block at the stored top-left corner
    stored[24:, 48:] = (0, 0, 255)  # blue block at the stored bottom-right corner
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    upright = load_image(path)
    assert upright.size == (40, 64)  # (W, H): the 64-wide stored image now stands upright
    pixels = np.asarray(upright).astype(int)
    # Turning clockwise brings the stored top-left to the top-right, bottom-right to bottom-left.
    assert np.abs(pixels[3, 36] - (255, 0, 0)).max() < 40
    assert np.abs(pixels[60, 3] - (0, 0, 255)).max() < 40

    with Image.open(path) as img:
        manual = img.convert("RGB").rotate(-90, expand=True)  # clockwise
    for cfg_id in ("224-0.95", "256x192-bilinear"):
        expected = _timm(cfg_id, manual)
        assert np.abs(preprocess(path, ALL_CFGS[cfg_id]) - expected).max() <= 1e-5


def test_batch_stacks_single_images(odd_images):
    paths = [odd_images["gray-L.png"], odd_images["wide-1000x20.png"]]
    cfg = ALL_CFGS["256x192-bilinear"]
    batch = preprocess_batch([paths[0], load_image(paths[1])], cfg)
    assert batch.shape == (2, 256, 192, 3) and batch.dtype == np.float32
    assert np.array_equal(batch[0], preprocess(paths[0], cfg))
    assert np.array_equal(batch[1], preprocess(paths[1], cfg))
    with pytest.raises(ValueError, match="at least one image"):
        preprocess_batch([], cfg)


def test_transform_from_pretrained_cfg_and_model_dict():
    """A PretrainedCfg, its dict and a timm data config give the same transform."""
    cfg = mlx_evit.models.registry.PretrainedCfg(tag="x", input_size=(3, 288, 288), crop_pct=1.0)
    transform = eval_transform(cfg)
    assert transform == eval_transform(cfg.to_dict())
    assert transform == eval_transform(timm_data.resolve_data_config(pretrained_cfg=cfg.to_dict()))
    assert transform.size == (288, 288) and transform.scale_size == (288, 288)
    assert eval_transform({"input_size": 224}).size == (224, 224)
    assert eval_transform({}) == EvalTransform(size=(224, 224))  # timm's defaults


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"interpolation": "cubic"}, "unknown interpolation 'cubic'"),
        ({"crop_mode": "middle"}, "unknown crop_mode 'middle'"),
        ({"input_size": (1, 224, 224)}, "3 channels"),
        ({"input_size": (224, -1)}, "positive integers"),
        ({"input_size": "224"}, "input_size must be"),
        ({"crop_pct": -0.5}, "crop_pct must be a positive number"),
        ({"mean": (0.5, 0.5)}, "mean must be 3 finite numbers"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be non-zero"),
    ],
)
def test_bad_config_is_named(cfg, message):
    with pytest.raises(ValueError, match=message):
        eval_transform(cfg)


def test_non_image_argument_is_a_type_error():
    with pytest.raises(TypeError, match="PIL image or a file path"):
        preprocess(np.zeros((8, 8, 3), np.uint8), ALL_CFGS["224-0.95"])


REGISTERED = [n for n in mlx_evit.list_models(pretrained=True)  # image classification tags (see _registered_cfgs)
              if get_pretrained_cfg(n).to_dict().get("crop_mode", "center") in CROP_MODES]


@functools.cache
def _timm_pretrained() -> frozenset[str]:
    return frozenset(pytest.importorskip("timm.models").list_pretrained())


@pytest.mark.parametrize("name", REGISTERED or [pytest.param("-", marks=pytest.mark.skip("no registered tags yet"))])
def test_registered_tag_is_tested_and_matches_timm(name):
    """Each tag's preprocessing went through the parity tests above, and equals timm's cfg."""
    transform = eval_transform(get_pretrained_cfg(name))
    assert transform in {eval_transform(cfg) for cfg in ALL_CFGS.values()}
    if name not in _timm_pretrained():
        pytest.skip(f"timm has no pretrained cfg for {name}")
    timm_cfg = pytest.importorskip("timm.models").get_pretrained_cfg(name).to_dict()
    assert transform == eval_transform(timm_data.resolve_data_config(pretrained_cfg=timm_cfg))


# ---------------------------------------------------------------- bad files


def _assert_load_error(path: Path, fragment: str) -> None:
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message
    with pytest.raises(ImageLoadError):
        preprocess(path, ALL_CFGS["224-0.95"])


def test_missing_file(tmp_path):
    _assert_load_error(tmp_path / "nope.jpg", "no such file")


def test_directory(tmp_path):
    _assert_load_error(tmp_path, "is a directory")


def test_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    _assert_load_error(path, "not an image file")


def test_truncated_jpeg(tmp_path):
    whole = tmp_path / "whole.jpg"
    Image.fromarray(_pattern(128, 96, 5)).save(whole, quality=90)
    data = whole.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    _assert_load_error(path, "cannot decode image")


def test_decompression_bomb(tmp_path, monkeypatch):
    """Over the limit warns in Pillow (error here); over twice the limit Pillow refuses."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 50):  # 1600 pixels (warning), 2500 pixels (error)
        path = tmp_path / f"bomb{side}.png"
        Image.new("RGB", (side, side)).save(path)
        _assert_load_error(path, "too large")
    small = tmp_path / "small.png"
    Image.new("RGB", (30, 30)).save(small)
    assert load_image(small).size == (30, 30)


def test_transform_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        eval_transform({}).crop_pct = 1.0  # type: ignore[misc]
