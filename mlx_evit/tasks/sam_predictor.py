"""SamPredictor: encode an image once, decode any number of prompts (Segment Anything's API, NHWC inside).

Pre- and postprocessing follow the original EfficientViT-SAM predictor
exactly: the long side is resized to the encoder size R (512 or 1024) with
Pillow's bilinear filter, ``int(x + 0.5)`` rounding, SAM's normalisation,
zero padding to R x R; prompts are scaled into the 1024 frame (whose size is
computed from the original image, not from the R frame); the 256x256 mask
logits are resized bilinearly to 1024, cropped to that 1024-frame size and
resized to the image, then thresholded at 0.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from mlx_evit.errors import ImageNotSetError, InputTypeError, SamError
from mlx_evit.models.sam_model import PROMPT_FRAME, SAM_MEAN, SAM_STD, EfficientViTSam, resize_matrix
from mlx_evit.ops.layers import fuse_modules
from mlx_evit.tasks.images import ImageLike, describe_type, rgb_array
from mlx_evit.tasks.pretrained import load_for_task

__all__ = ["DEFAULT_MODEL", "SamPredictor", "SamError", "preprocess_shape", "preprocess_image",
           "postprocess_matrices"]

DEFAULT_MODEL = "efficientvit_sam_l0"
"""The smallest EfficientViT-SAM (512 px encoder input)."""


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Size with the long side scaled to ``long_side``, each side rounded as ``int(x + 0.5)``."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def as_rgb_uint8(image: ImageLike, image_format: str = "RGB") -> np.ndarray:
    """One image (path, PIL image, uint8 or [0, 1] float array; BGR arrays with ``image_format="BGR"``) as
    ``(H, W, 3)`` uint8 RGB; :class:`SamError` for an unusable array, ``TypeError`` for another type."""
    if isinstance(image, (list, tuple)):
        raise InputTypeError(f"image must be one image (a file path, a PIL image or an (H, W, 3) array), "
                             f"got a {describe_type(image)}; call once per image")
    return rgb_array(image, image_format=image_format, error=SamError)


def preprocess_image(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 ``(H, W, 3)`` -> (resized uint8, normalised and zero-padded float32 ``(size, size, 3)``)."""
    h, w = image.shape[:2]
    if max(h, w) != size:
        nh, nw = preprocess_shape(h, w, size)
        resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    else:
        resized = image
    x = resized.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(SAM_MEAN, np.float32)) / np.asarray(SAM_STD, np.float32)
    out = np.zeros((size, size, 3), np.float32)
    out[: x.shape[0], : x.shape[1]] = x
    return resized, out


def postprocess_matrices(input_size: tuple[int, int], original_size: tuple[int, int],
                         low_res: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(H, low_res)`` and ``(W, low_res)`` float32 maps of the whole postprocess resize chain.

    Each composes the bilinear resize to 1024, the crop to the 1024-frame
    ``input_size`` and the bilinear resize to ``original_size`` (torch's
    index arithmetic), so full-size logits are ``Mh @ low @ Mw.T``.
    """
    mats = []
    for crop, out in zip(input_size, original_size):
        up = resize_matrix(low_res, PROMPT_FRAME, "bilinear")[:crop].astype(np.float64)
        down = resize_matrix(crop, out, "bilinear").astype(np.float64)
        mats.append((down @ up).astype(np.float32))
    return mats[0], mats[1]


def _param_dtype(model: nn.Module) -> mx.Dtype:
    """The floating dtype of the model's weights (float32 if it has none)."""
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


class SamPredictor:
    """Segment Anything's predictor for an :class:`~mlx_evit.sam.EfficientViTSam` model.

    ``dtype``: float32 (default), float16 or bfloat16 weights and
    activations (attention cores and LayerNorms stay float32). ``fuse``:
    fold the encoder's BatchNorms into its convolutions (modifies the model
    in place). ``compile``: run the encoder and decoder through ``mx.compile``.
    """

    def __init__(self, model: EfficientViTSam, dtype: Optional[Any] = None, fuse: bool = True,
                 compile: bool = True):
        if not isinstance(model, EfficientViTSam):
            raise InputTypeError(f"SamPredictor needs an EfficientViT-SAM model, got {describe_type(model)}")
        model.eval()
        if dtype is not None:
            from mlx_evit.ops.dtypes import cast_model, parse_dtype

            dtype = parse_dtype(dtype)
            cast_model(model, dtype)
        if fuse:
            fuse_modules(model.image_encoder)
        self.model = model
        self.dtype = dtype or _param_dtype(model)
        self.compile = compile
        self._decoders: dict[tuple, Any] = {}
        encoder = model.image_encoder
        self._encode = mx.compile(lambda x: encoder(x), inputs=model.state) if compile else encoder
        self._matrices: dict[tuple, tuple[mx.array, mx.array]] = {}
        self._dense_pe = model.prompt_encoder.dense_pe().astype(self.dtype)  # constant: computed once
        mx.eval(self._dense_pe)
        self.reset_image()

    @classmethod
    def from_pretrained(cls, name_or_path: Optional[Union[str, os.PathLike]] = None, *,
                        weights: Optional[Union[str, os.PathLike]] = None, dtype: Optional[Any] = None,
                        compile: bool = True, revision: str = "main",
                        log: Optional[Callable[[str], None]] = None) -> "SamPredictor":
        """A predictor from a registered SAM name (``efficientvit_sam_l0``, ... ; the released weights,
        converted once and cached by :func:`mlx_evit.load`) or a local ``.pt`` / checkpoint / converted
        folder; default :data:`DEFAULT_MODEL`. ``weights``: a local file or folder, with ``name_or_path``
        the name it must hold. A classification or segmentation name is refused before any download.
        Raises :class:`SamError` and :class:`~mlx_evit.errors.HubError`."""
        net, _ = load_for_task(name_or_path, kind="SAM", error=SamError, default=DEFAULT_MODEL, weights=weights,
                               dtype=dtype, revision=revision, log=log)
        return cls(net, compile=compile)

    # -- image ---------------------------------------------------------------------------------

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features: Optional[mx.array] = None
        self.original_size: Optional[tuple[int, int]] = None
        self.input_size: Optional[tuple[int, int]] = None

    def set_image(self, image: ImageLike, image_format: str = "RGB") -> None:
        """Encode one image: a file path, a PIL image, an ``(H, W, 3)`` uint8 (or ``[0, 1]`` float) array,
        RGB, or BGR with ``image_format="BGR"`` (:mod:`mlx_evit.tasks.images`)."""
        rgb = as_rgb_uint8(image, image_format)
        self.reset_image()
        _, x = preprocess_image(rgb, self.model.image_size)
        features = self._encode(mx.array(x[None]).astype(self.dtype))
        mx.eval(features)
        self.features = features
        self.original_size = tuple(int(s) for s in rgb.shape[:2])
        self.input_size = preprocess_shape(*self.original_size, PROMPT_FRAME)
        self.is_image_set = True

    def get_image_embedding(self) -> mx.array:
        """The current image's embedding, ``(1, 64, 64, 256)`` NHWC."""
        self._require_image()
        return self.features

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise ImageNotSetError("an image must be set with set_image(...) before mask prediction")

    # -- prompts -------------------------------------------------------------------------------

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Pixel (x, y) coordinates of the original image -> the 1024 frame (float64)."""
        (oh, ow), (nh, nw) = self.original_size, self.input_size
        coords = np.array(coords, dtype=np.float64)
        coords[..., 0] *= nw / ow
        coords[..., 1] *= nh / oh
        return coords

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """``(..., 4)`` XYXY pixel boxes -> the 1024 frame."""
        boxes = np.asarray(boxes, dtype=np.float64)
        return self.apply_coords(boxes.reshape(-1, 2, 2)).reshape(-1, 4)

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt set on the current image.

        ``point_coords`` ``(N, 2)`` (x, y) pixels with ``point_labels`` ``(N,)``
        (1 foreground, 0 background); ``box`` ``(4,)`` XYXY pixels;
        ``mask_input`` ``(1, 256, 256)`` low-res logits from an earlier call.
        Returns numpy ``masks (C, H, W)`` (bool, or float32 logits with
        ``return_logits``), ``iou (C,)`` and ``low_res (C, 256, 256)``;
        C = 3 with ``multimask_output`` else 1.
        """
        points = labels = None
        if point_coords is not None:
            if point_labels is None:
                raise SamError("point_labels must be given with point_coords")
            points = np.asarray(point_coords, dtype=np.float64).reshape(1, -1, 2)
            labels = np.asarray(point_labels).reshape(1, -1)
        boxes = None if box is None else np.asarray(box, dtype=np.float64).reshape(1, 4)
        masks = None if mask_input is None else np.asarray(mask_input, dtype=np.float32)[None]
        m, iou, low = self.predict_batch(points, labels, boxes, masks, multimask_output, return_logits)
        return m[0], iou[0], low[0]

    def predict_batch(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        boxes: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B prompt sets on the current image in one decoder call (pixel coordinates).

        ``point_coords (B, N, 2)`` + ``point_labels (B, N)``, ``boxes (B, 4)``,
        ``mask_input (B, 1, 256, 256)``; any subset, with one B. Returns
        ``masks (B, C, H, W)``, ``iou (B, C)``, ``low_res (B, C, 256, 256)``.
        """
        self._require_image()
        points = self._check_points(point_coords, point_labels)
        boxes_1024 = None
        if boxes is not None:
            b = np.asarray(boxes, dtype=np.float64)
            if b.ndim == 1:
                b = b[None]
            if b.ndim != 2 or b.shape[1] != 4 or not np.isfinite(b).all():
                raise SamError(f"boxes must be finite (B, 4) XYXY pixels, got shape {b.shape}")
            boxes_1024 = mx.array(self.apply_boxes(b).astype(np.float32))
        masks = None
        if mask_input is not None:
            mi = np.asarray(mask_input, dtype=np.float32)
            if mi.ndim != 4 or mi.shape[1:] != (1, 256, 256):
                raise SamError(f"mask_input must be (B, 1, 256, 256) low-res logits, got shape {mi.shape}")
            masks = mx.array(np.ascontiguousarray(mi.transpose(0, 2, 3, 1)))
        sizes = {len(x) for x in (points[0] if points else None, boxes_1024, masks) if x is not None}
        if len(sizes) > 1:
            raise SamError(f"point_coords, boxes and mask_input must have the same batch size, got {sorted(sizes)}")
        low, iou = self.decode(points, boxes_1024, masks, multimask_output)
        full = self.postprocess(low)
        if not return_logits:
            full = full > self.model.mask_threshold
        mx.eval(full, iou, low)
        return np.array(full), np.array(iou), np.array(low)

    def _check_points(self, coords, labels) -> Optional[tuple[mx.array, mx.array]]:
        if coords is None:
            if labels is not None:
                raise SamError("point_coords must be given with point_labels")
            return None
        if labels is None:
            raise SamError("point_labels must be given with point_coords")
        c = np.asarray(coords, dtype=np.float64)
        lab = np.asarray(labels)
        if c.ndim == 2:
            c, lab = c[None], lab.reshape(1, -1)
        if c.ndim != 3 or c.shape[2] != 2 or lab.shape != c.shape[:2]:
            raise SamError(f"point_coords (B, N, 2) and point_labels (B, N) do not match: {c.shape}, {lab.shape}")
        if not np.isfinite(c).all():
            raise SamError("point_coords must be finite")
        if not np.isin(lab, (-1, 0, 1)).all():
            raise SamError(f"point_labels must be 1 (foreground), 0 (background) or -1 (padding), "
                             f"got {sorted(set(np.unique(lab).tolist()))}")
        return mx.array(self.apply_coords(c).astype(np.float32)), mx.array(lab.astype(np.int32))

    # -- decoder -------------------------------------------------------------------------------

    def decode(self, points: Optional[tuple[mx.array, mx.array]], boxes: Optional[mx.array],
               masks: Optional[mx.array], multimask_output: bool = True) -> tuple[mx.array, mx.array]:
        """Prompts already in the 1024 frame -> (low-res logits ``(B, C, 256, 256)``, IoU ``(B, C)``)."""
        self._require_image()
        key = (points is not None, boxes is not None, masks is not None, bool(multimask_output))
        fn = self._decoders.get(key)
        if fn is None:
            fn = self._decoders[key] = self._decoder(*key)
        args = [self.features, self._dense_pe]
        if points is not None:
            args += list(points)
        if boxes is not None:
            args.append(boxes)
        if masks is not None:
            args.append(masks)
        return fn(*args)

    def _decoder(self, has_points: bool, has_box: bool, has_mask: bool, multimask: bool):
        model = self.model
        dtype = self.dtype

        def run(features, dense_pe, *args):
            args = list(args)
            points = (args.pop(0), args.pop(0)) if has_points else None
            boxes = args.pop(0) if has_box else None
            masks = args.pop(0) if has_mask else None
            pe = model.prompt_encoder
            sparse, dense = pe(points, boxes, masks)
            low, iou = model.mask_decoder(features, dense_pe, sparse.astype(dtype),
                                          dense.astype(dtype), multimask)
            return low, iou

        return mx.compile(run, inputs=model.state) if self.compile else run

    def postprocess(self, low_res: mx.array) -> mx.array:
        """``(B, C, 256, 256)`` logits -> ``(B, C, H, W)`` float32 logits at the original image size."""
        key = (self.input_size, self.original_size)
        if key not in self._matrices:
            mh, mw = postprocess_matrices(self.input_size, self.original_size, low_res.shape[-1])
            self._matrices = {key: (mx.array(mh), mx.array(mw.T.copy()))}
        mh, mwt = self._matrices[key]
        return (mh @ low_res.astype(mx.float32)) @ mwt
