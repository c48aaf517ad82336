"""EfficientViT-SAM (Zhang et al., 2024) in MLX, NHWC: image encoder, prompt encoder, mask decoder.

* Image encoder: an EfficientViT L backbone (5 stages, SAM L0-L2) or the
  6-stage XL backbone (SAM XL0/XL1: depth-0 stem in XL0, fused-MBConv
  stage 3, 3x3 attention aggregation, stride 64), a "SamNeck" (three 1x1
  projections upsampled bicubically to 64x64 and summed, FusedMBConv blocks,
  a 1x1 output conv) and a channel LayerNorm: ``(B, R, R, 3) -> (B, 64, 64, 256)``.
* Prompt encoder and mask decoder: Meta's Segment Anything modules, in
  :mod:`mlx_evit.models.sam_decoder` (imported here: the three networks share
  the released checkpoint's key layout, which is declared in this module).

MLX parameter paths are the original state-dict keys (``image_encoder.backbone.stages.0.op_list.0.conv.weight``,
``mask_decoder.transformer.layers.0.self_attn.q_proj.weight``), so the released ``.pt`` files load through one
:class:`~mlx_evit.models.keymap.KeyMap` (:data:`ORIGINAL_LAYOUT`) without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_evit.ops import layers as L
from mlx_evit.ops.layers import ConvNorm
from mlx_evit.ops.resampling import resize_by_matrix, resize_matrix
from mlx_evit.models.sam_decoder import EMBED_SIZE, PROMPT_FRAME, LayerNorm, MaskDecoder, PromptEncoder
from mlx_evit.models.mit import EfficientViTBlock, FusedMBConv, MBConv, ResBlock, Residual
from mlx_evit.models.metadata import Described
from mlx_evit.models.specs import ModelEntry, PretrainedCfg
from mlx_evit.models.keymap import KeyMap

__all__ = [
    "EfficientViTSam",
    "SamImageEncoder",
    "PromptEncoder",
    "MaskDecoder",
    "ORIGINAL_LAYOUT",
    "MODELS",
    "SAM_MEAN",
    "SAM_STD",
    "resize_matrix",
]

SAM_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
__all__ += ["PROMPT_FRAME", "EMBED_SIZE"]  # re-exported: the task code's frame constants


# ---------------------------------------------------------------------------
# Small modules
# ---------------------------------------------------------------------------


class OpSequential(nn.Module):
    """Modules applied in order, as the original ``OpSequential`` (child ``op_list``)."""

    def __init__(self, ops: list):
        super().__init__()
        self.op_list = ops

    def __call__(self, x: mx.array) -> mx.array:
        for op in self.op_list:
            x = op(x)
        return x


# ---------------------------------------------------------------------------
# Image encoder
# ---------------------------------------------------------------------------


class SamBackbone(nn.Module):
    """The original ``EfficientViTLargeBackbone``: ``stages.0`` is the stem, each later stage starts stride 2.

    ``blocks``: per stage ``"res"``, ``"fmb"``, ``"mb"`` or ``"att"``;
    ``kernel``: the attention aggregation kernel (5 for L, 3 for XL).
    Returns every stage output (stage k at stride ``2 ** (k + 1)``).
    """

    def __init__(self, widths: Sequence[int], depths: Sequence[int], blocks: Sequence[str],
                 expands: Sequence[float], fewer_norm: Sequence[bool], kernel: int = 5,
                 qkv_dim: int = 32, eps: float = 1e-6, attention_eps: float = 1e-15):
        super().__init__()
        act = L.gelu_tanh
        stem = [ConvNorm(3, widths[0], 3, 2, act=act, eps=eps)]
        stem += [Residual(self._local(blocks[0], widths[0], widths[0], 1, expands[0], fewer_norm[0], act, eps), True)
                 for _ in range(depths[0])]
        self.stages = [OpSequential(stem)]
        cin = widths[0]
        for i in range(1, len(widths)):
            w, kind = widths[i], blocks[i]
            down = self._local(kind if kind in ("mb", "fmb") else "mb", cin, w, 2, expands[i] * 4, fewer_norm[i],
                               act, eps)
            ops = [Residual(down, shortcut=False)]
            for _ in range(depths[i]):
                if kind == "att":
                    ops.append(EfficientViTBlock(w, qkv_dim, expands[i], act, eps, attention_eps, kernel))
                else:
                    ops.append(Residual(self._local(kind, w, w, 1, expands[i], fewer_norm[i], act, eps), True))
            self.stages.append(OpSequential(ops))
            cin = w

    @staticmethod
    def _local(kind, cin, cout, stride, expand, fewer_norm, act, eps) -> nn.Module:
        if kind == "mb":
            return MBConv(cin, cout, stride, expand, act, eps, fewer_norm=fewer_norm)
        if fewer_norm:
            raise ValueError(f"fewer-norm {kind!r} blocks are not used by any EfficientViT-SAM model")
        if kind == "fmb":
            return FusedMBConv(cin, cout, stride, expand, act, eps)
        if kind == "res":
            return ResBlock(cin, cout, stride, act, eps)
        raise ValueError(f"unknown block type {kind!r}")

    def __call__(self, x: mx.array) -> list[mx.array]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class SamNeck(nn.Module):
    """Project the chosen stage maps to 256 channels, bicubic-resize each to 64x64, sum, refine, 1x1 out."""

    def __init__(self, in_channels: Sequence[int], depth: int, expand: float, width: int = 256,
                 out_dim: int = 256, eps: float = 1e-6):
        super().__init__()
        self.input_ops = [OpSequential([ConvNorm(c, width, 1, eps=eps)]) for c in in_channels]
        self.middle = OpSequential([Residual(FusedMBConv(width, width, 1, expand, L.gelu_tanh, eps), True)
                                    for _ in range(depth)])
        self.output_ops = [OpSequential([ConvNorm(width, out_dim, 1, bias=True, norm=False)])]

    def __call__(self, feats: Sequence[mx.array]) -> mx.array:
        x = None
        for op, f in zip(self.input_ops, feats):
            y = resize_by_matrix(op(f), (EMBED_SIZE, EMBED_SIZE), "bicubic")
            x = y if x is None else x + y
        return self.output_ops[0](self.middle(x))


class SamImageEncoder(nn.Module):
    """Backbone + neck + LayerNorm: ``(B, R, R, 3)`` normalised images -> ``(B, 64, 64, 256)``.

    ``neck_stages``: indices of the backbone stages fed to the neck, in the
    original order (deepest first).
    """

    def __init__(self, backbone: SamBackbone, neck: SamNeck, neck_stages: Sequence[int], eps: float = 1e-6):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.neck_stages = tuple(neck_stages)
        self.norm = LayerNorm(256, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        L.check_image_input(x, 3)
        feats = self.backbone(x)
        return self.norm(self.neck([feats[i] for i in self.neck_stages]))


# ---------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------


class EfficientViTSam(Described, nn.Module):
    """EfficientViT-SAM: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``.

    ``image_size``: the encoder input R (512 for L0-L2, 1024 for XL0/XL1);
    images are resized so their long side is R and zero-padded to R x R.
    Prompts and the mask postprocess use the 1024 frame for every variant.
    Use :class:`mlx_evit.sam.SamPredictor` for images in pixels.
    """

    checkpoint_layouts: tuple[KeyMap, ...] = ()  # set below
    mask_threshold = 0.0

    def __init__(self, widths: Sequence[int], depths: Sequence[int], blocks: Sequence[str],
                 expands: Sequence[float], fewer_norm: Sequence[bool], neck_stages: Sequence[int],
                 neck_depth: int, neck_expand: float, kernel: int = 5, image_size: int = 512,
                 norm_eps: float = 1e-6, attention_eps: float = 1e-15, num_classes: Optional[int] = None):
        super().__init__()
        if num_classes:
            raise ValueError("EfficientViT-SAM has no classifier; num_classes must be 0 or None")
        n = len(widths)
        if not (len(depths) == len(blocks) == len(expands) == len(fewer_norm) == n):
            raise ValueError("widths, depths, blocks, expands and fewer_norm need one entry per stage")
        self.image_size = int(image_size)
        self.num_classes = 0
        backbone = SamBackbone(widths, depths, blocks, expands, fewer_norm, kernel, eps=norm_eps,
                               attention_eps=attention_eps)
        neck = SamNeck([widths[i] for i in neck_stages], neck_depth, neck_expand, eps=norm_eps)
        self.image_encoder = SamImageEncoder(backbone, neck, neck_stages, eps=norm_eps)
        self.prompt_encoder = PromptEncoder()
        self.mask_decoder = MaskDecoder()

    def __call__(self, x: mx.array) -> mx.array:
        """Normalised, padded ``(B, R, R, 3)`` images -> embeddings ``(B, 64, 64, 256)``."""
        return self.image_encoder(x)

    def fuse(self) -> "EfficientViTSam":
        """Fold the image encoder's BatchNorms into its convolutions (inference; in place)."""
        L.fuse_modules(self.image_encoder)
        return self


# The released checkpoints: the original module tree, which is this one's.
ORIGINAL_LAYOUT = KeyMap(
    name="mit-han-lab EfficientViT-SAM",
    marker=r"^(image_encoder\.(backbone\.stages|neck)|prompt_encoder|mask_decoder)\.",
)
EfficientViTSam.checkpoint_layouts = (ORIGINAL_LAYOUT,)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

HF_HUB_REPO = "mit-han-lab/efficientvit-sam"

_L = dict(widths=(32, 64, 128, 256, 512), blocks=("res", "fmb", "fmb", "mb", "att"), expands=(1, 4, 4, 4, 6),
          fewer_norm=(False, False, False, True, True), neck_stages=(4, 3, 2), neck_expand=1, kernel=5,
          image_size=512)
_XL = dict(widths=(32, 64, 128, 256, 512, 1024), blocks=("res", "fmb", "fmb", "fmb", "att", "att"),
           expands=(1, 4, 4, 4, 4, 6), fewer_norm=(False, False, False, False, True, True),
           neck_stages=(5, 4, 3), neck_expand=4, kernel=3, image_size=1024)



@dataclass(frozen=True)
class SamPretrainedCfg(PretrainedCfg):
    """A released EfficientViT-SAM checkpoint: ``hf_filename`` in ``hf_hub_id`` (the original ``.pt``).

    Preprocessing: long side to ``input_size[1]`` (Pillow bilinear), SAM's
    mean/std, zero padding to a square (see :mod:`mlx_evit.tasks.sam_predictor`).
    """

    hf_filename: Optional[str] = None


def _entry(variant: str, base: dict, depths, neck_depth) -> ModelEntry:
    name = f"efficientvit_sam_{variant}"
    size = base["image_size"]
    cfg = SamPretrainedCfg(tag="sa1b", input_size=(3, size, size), crop_pct=1.0, interpolation="bilinear",
                           crop_mode="pad", mean=SAM_MEAN, std=SAM_STD, num_classes=0, hf_hub_id=HF_HUB_REPO,
                           hf_filename=f"{name}.pt")
    return ModelEntry(name, "sam", EfficientViTSam, dict(base, depths=depths, neck_depth=neck_depth), (cfg,))


MODELS: tuple[ModelEntry, ...] = (
    _entry("l0", _L, (1, 1, 1, 4, 4), 4),
    _entry("l1", _L, (1, 1, 1, 6, 6), 8),
    _entry("l2", _L, (1, 2, 2, 8, 8), 12),
    _entry("xl0", _XL, (0, 1, 1, 2, 3, 3), 6),
    _entry("xl1", _XL, (1, 2, 2, 4, 6, 6), 12),
)
