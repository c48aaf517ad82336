"""EfficientViT-SAM's prompt encoder and mask decoder (Meta's Segment Anything modules), NHWC.

Random Fourier positional encoding of points and boxes, a small convolutional
mask encoder, and the two-way transformer with its hypernetwork mask head;
exact GELU and every norm at eps 1e-6 as in the released models. The image
encoder and the whole model are in :mod:`mlx_evit.models.sam_model`; the
parameter paths below ``prompt_encoder.`` and ``mask_decoder.`` are the
released checkpoint's keys.

Attention runs in float32 also for half-precision models (:func:`attention_core`),
as the reference does under autocast.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_evit.ops import layers as L
from mlx_evit.ops.backend import use_native

__all__ = ["PromptEncoder", "MaskDecoder", "TwoWayTransformer", "LayerNorm", "GELU", "attention_core",
           "EMBED_SIZE", "PROMPT_FRAME"]

EMBED_SIZE = 64  # the image embedding is always 64x64
PROMPT_FRAME = 1024  # prompt coordinates and the mask postprocess live in a 1024 frame for every variant


# ---------------------------------------------------------------------------
# Small modules
# ---------------------------------------------------------------------------


class GELU(nn.Module):
    """Exact (erf) GELU as a parameterless module (keeps the original list indices)."""

    def __call__(self, x: mx.array) -> mx.array:
        return L.gelu(x)


class LayerNorm(nn.LayerNorm):
    """Last-axis LayerNorm computed in float32 (also for float16/bfloat16 models); Meta's LayerNorm2d in NHWC."""

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.fast.layer_norm(x.astype(mx.float32), self.weight.astype(mx.float32),
                               self.bias.astype(mx.float32), self.eps)
        return y.astype(x.dtype)


class ConvTranspose2x2(nn.Module):
    """2x2 stride-2 transposed convolution: ``(B, H, W, I) -> (B, 2H, 2W, O)``.

    Weight ``(O, 2, 2, I)`` (``nn.ConvTranspose2d`` layout); PyTorch stores
    ``(I, O, 2, 2)``, converted by :meth:`torch_to_mlx`. The taps do not
    overlap, so the CPU path runs it as one GEMM ``(B H W, I) @ (I, 4 O)``
    followed by a pixel shuffle: MLX's CPU ``mx.conv_transpose2d`` convolves
    the zero-dilated input (4x the multiply-adds), 4.5 s against 56 ms for
    the GEMM at 1x64x64x256 -> 64 on this x86 CPU (``gpu_bench.py --device
    cpu --quick``, ops "convT 2x2 s2"). The native path keeps the built-in:
    on an H200 (MLX CUDA, TF32) it takes 0.11 ms against 0.14 ms for the GEMM
    and shuffle at the same shape (``gpu_bench.py`` op table). Apple GPU: not
    measured.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        scale = 1.0 / math.sqrt(4 * in_channels)
        # From scratch the four taps start equal (nearest-neighbour upsampling, then one linear map), as
        # Aitken et al.'s "ICNR" initialisation does for sub-pixel convolutions: independent random taps
        # would give each of the 2x2 output phases its own random features, a checkerboard pattern.
        tap = mx.random.uniform(-scale, scale, (out_channels, 1, 1, in_channels))
        self.weight = mx.tile(tap, (1, 2, 2, 1))
        self.bias = mx.zeros((out_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        if use_native():
            return mx.conv_transpose2d(x, self.weight, stride=2) + self.bias
        B, H, W, C = x.shape
        O = self.weight.shape[0]
        w = self.weight.transpose(3, 1, 2, 0).reshape(C, 4 * O)  # (I, (u, v, O))
        y = (x.reshape(B * H * W, C) @ w).reshape(B, H, W, 2, 2, O)
        y = y.transpose(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, O)
        return y + self.bias

    @staticmethod
    def torch_to_mlx(leaf: str, value):
        """PyTorch ``(I, O, kh, kw)`` -> ``(O, kh, kw, I)``."""
        return value.transpose(1, 2, 3, 0) if leaf == "weight" and value.ndim == 4 else value


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (child ``layers``)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, num_layers: int):
        super().__init__()
        dims = [dim_in] + [hidden] * (num_layers - 1) + [dim_out]
        self.layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]

    def __call__(self, x: mx.array) -> mx.array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = mx.maximum(x, 0)
        return x


def attention_core(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Softmax attention in float32: ``(B, h, Nq, d), (B, h, Nk, d), (B, h, Nk, d) -> (B, h, Nq, d)``.

    Written out as two GEMMs around a softmax on every device; batch
    dimensions broadcast inside the GEMMs (the predictor attends many
    prompts to one image). On an H200 (MLX CUDA, TF32) this form takes
    0.28 ms against 0.37 ms for ``mx.fast.scaled_dot_product_attention``
    (which needs the broadcast batch copied) at the decoder's image-to-token
    shape 4x8x4096x16 with 7 keys (``gpu_bench.py`` op table, "sam
    image->token attn"). Native: MLX's softmax; CPU path: this package's
    exact exp (:func:`mlx_evit.ops.layers.softmax`).
    """
    q, k, v = (t.astype(mx.float32) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q * scale) @ k.swapaxes(-1, -2)
    weights = mx.softmax(scores, axis=-1) if use_native() else L.softmax(scores, axis=-1)
    return weights @ v


# ---------------------------------------------------------------------------
# Prompt encoder
# ---------------------------------------------------------------------------


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of coordinates in [0, 1]: ``[sin, cos](2 pi (2c - 1) G)``, G ``(2, 128)``."""

    def __init__(self, num_feats: int = 128):
        super().__init__()
        self.positional_encoding_gaussian_matrix = mx.random.normal((2, num_feats))

    def encode(self, coords: mx.array) -> mx.array:
        """``(..., 2)`` normalised (x, y) -> ``(..., 2 * num_feats)`` float32."""
        c = (2.0 * coords.astype(mx.float32) - 1.0) @ self.positional_encoding_gaussian_matrix.astype(mx.float32)
        c = (2.0 * math.pi) * c
        return mx.concatenate([mx.sin(c), mx.cos(c)], axis=-1)

    def dense(self, h: int, w: int) -> mx.array:
        """``(h, w, 2 * num_feats)``: the encoding of every cell centre."""
        ys = (mx.arange(h, dtype=mx.float32) + 0.5) / h
        xs = (mx.arange(w, dtype=mx.float32) + 0.5) / w
        grid = mx.stack([mx.broadcast_to(xs[None, :], (h, w)), mx.broadcast_to(ys[:, None], (h, w))], axis=-1)
        return self.encode(grid)


class PromptEncoder(nn.Module):
    """Points, boxes and a low-res mask -> sparse ``(B, N, 256)`` and dense ``(B, 64, 64, 256)`` embeddings.

    Without a mask the dense embedding is the same for every prompt and has batch 1.

    Coordinates are pixels of the 1024 frame. Point labels: 1 foreground,
    0 background, 2/3 box corners, -1 padding (its positional encoding is dropped).
    """

    def __init__(self, embed_dim: int = 256, embed_size: int = EMBED_SIZE, frame: int = PROMPT_FRAME,
                 mask_in_chans: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.embed_size = embed_size
        self.frame = frame
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = [nn.Embedding(1, embed_dim) for _ in range(4)]
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        c = mask_in_chans
        self.mask_downscaling = [
            L.Conv2d(1, c // 4, 2, 2), LayerNorm(c // 4, eps=1e-6), GELU(),
            L.Conv2d(c // 4, c, 2, 2), LayerNorm(c, eps=1e-6), GELU(),
            L.Conv2d(c, embed_dim, 1),
        ]

    def dense_pe(self) -> mx.array:
        """``(1, 64, 64, 256)`` positional encoding of the image embedding grid."""
        return self.pe_layer.dense(self.embed_size, self.embed_size)[None]

    def embed_points(self, points: mx.array, labels: mx.array, pad: bool) -> mx.array:
        points = points.astype(mx.float32) + 0.5
        labels = labels.astype(mx.int32)
        if pad:
            B = points.shape[0]
            points = mx.concatenate([points, mx.zeros((B, 1, 2), mx.float32)], axis=1)
            labels = mx.concatenate([labels, -mx.ones((B, 1), mx.int32)], axis=1)
        pe = self.pe_layer.encode(points / self.frame)
        lab = labels[..., None]
        pe = mx.where(lab == -1, self.not_a_point_embed.weight[0], pe)
        for i, embedding in enumerate(self.point_embeddings):  # 0 bg, 1 fg, 2/3 box corners (Meta's ONNX)
            pe = pe + mx.where(lab == i, embedding.weight[0], 0.0)
        return pe

    def embed_boxes(self, boxes: mx.array) -> mx.array:
        corners = (boxes.astype(mx.float32) + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.encode(corners / self.frame)
        corner = mx.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
        return pe + corner

    def embed_masks(self, masks: mx.array) -> mx.array:
        """``(B, 256, 256, 1)`` logits -> ``(B, 64, 64, 256)``."""
        x = masks.astype(mx.float32)
        for layer in self.mask_downscaling:
            x = layer(x)
        return x

    def __call__(self, points: Optional[tuple[mx.array, mx.array]] = None, boxes: Optional[mx.array] = None,
                 masks: Optional[mx.array] = None) -> tuple[mx.array, mx.array]:
        if points is not None:
            B = points[0].shape[0]
        elif boxes is not None:
            B = boxes.shape[0]
        elif masks is not None:
            B = masks.shape[0]
        else:
            B = 1
        sparse = [mx.zeros((B, 0, self.embed_dim), mx.float32)]
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        sparse = mx.concatenate(sparse, axis=1)
        if masks is not None:
            dense = self.embed_masks(masks)
        else:  # the same for every prompt: batch 1, broadcast by the decoder
            s = self.embed_size
            dense = mx.broadcast_to(self.no_mask_embed.weight.reshape(1, 1, 1, -1), (1, s, s, self.embed_dim))
        return sparse, dense


# ---------------------------------------------------------------------------
# Mask decoder
# ---------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with projections to ``dim // downsample_rate`` channels."""

    def __init__(self, dim: int, heads: int, downsample_rate: int = 1):
        super().__init__()
        inner = dim // downsample_rate
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def __call__(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """``q (1 or B, Nq, C)``, ``k``/``v`` ``(1 or B, Nk, C)`` (batch 1 broadcasts) -> ``(B, Nq, C)``."""
        Nq = q.shape[1]
        h = self.heads

        def split(x):
            return x.reshape(x.shape[0], x.shape[1], h, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
        out = attention_core(q, k, v).astype(q.dtype)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(out.shape[0], Nq, -1))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.lin2(mx.maximum(self.lin1(x), 0))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image, MLP, image-to-token (each residual, post-norm)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample_rate)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = LayerNorm(dim, eps=1e-6)
        self.norm4 = LayerNorm(dim, eps=1e-6)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = 2, dim: int = 256, heads: int = 8, mlp_dim: int = 2048,
                 downsample_rate: int = 2):
        super().__init__()
        self.layers = [TwoWayAttentionBlock(dim, heads, mlp_dim, downsample_rate, i == 0) for i in range(depth)]
        self.final_attn_token_to_image = Attention(dim, heads, downsample_rate)
        self.norm_final_attn = LayerNorm(dim, eps=1e-6)

    def __call__(self, image: mx.array, image_pe: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """``image``/``image_pe`` ``(B, HW, C)``, ``tokens`` ``(B, N, C)`` -> (tokens, image) after attention."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder(nn.Module):
    """Two-way transformer over [IoU token, 4 mask tokens, prompts] and the image; 256x256 mask logits.

    ``__call__(image_embeddings (1 or B, 64, 64, 256), image_pe (1, 64, 64, 256), sparse (B, N, 256),
    dense (B, 64, 64, 256), multimask_output)`` -> (low-res logits ``(B, C, 256, 256)``, IoU ``(B, C)``),
    C = 3 (masks 1-3), 1 (mask 0) or 4 (all, ``multimask_output=None``).
    """

    def __init__(self, dim: int = 256, num_multimask_outputs: int = 3, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256):
        super().__init__()
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(dim=dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = [
            ConvTranspose2x2(dim, dim // 4), LayerNorm(dim // 4, eps=1e-6), GELU(),
            ConvTranspose2x2(dim // 4, dim // 8), GELU(),
        ]
        self.output_hypernetworks_mlps = [MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)]
        self.iou_prediction_head = MLP(dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def __call__(self, image_embeddings: mx.array, image_pe: mx.array, sparse: mx.array, dense: mx.array,
                 multimask_output: bool) -> tuple[mx.array, mx.array]:
        B, N, C = sparse.shape
        out_tokens = mx.concatenate([self.iou_token.weight, self.mask_tokens.weight], axis=0)
        tokens = mx.concatenate([mx.broadcast_to(out_tokens[None], (B,) + out_tokens.shape),
                                 sparse.astype(out_tokens.dtype)], axis=1)
        _, h, w, _ = image_embeddings.shape
        # Batch 1 while the image side is the same for every prompt (one embedding, no mask input): the
        # first layer's image-side projections then run once, and attention broadcasts over the prompts.
        src = (image_embeddings + dense).astype(tokens.dtype)
        src = src.reshape(src.shape[0], h * w, C)
        pos = image_pe.astype(tokens.dtype).reshape(image_pe.shape[0], h * w, C)
        hs, src = self.transformer(src, pos, tokens)
        if src.shape[0] != B:  # no prompt reached the image side (cannot happen with tokens)
            src = mx.broadcast_to(src, (B,) + src.shape[1:])
        n = self.num_mask_tokens  # multimask None: all n masks (export); True: masks 1..n-1; False: mask 0
        first, count = (0, n) if multimask_output is None else (1, n - 1) if multimask_output else (0, 1)
        x = src.reshape(B, h, w, C)
        for layer in self.output_upscaling:
            x = layer(x)
        _, H, W, c = x.shape
        hyper = mx.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(first, first + count)],
                         axis=1)  # (B, count, c)
        masks = (hyper.astype(mx.float32) @ x.reshape(B, H * W, c).astype(mx.float32).swapaxes(1, 2))
        iou = self.iou_prediction_head(hs[:, 0]).astype(mx.float32)[:, first:first + count]
        return masks.reshape(B, count, H, W), iou
