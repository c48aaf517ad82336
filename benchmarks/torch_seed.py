"""The seed model in plain PyTorch (eager), for the benchmark's PyTorch and ONNX Runtime baselines.

timm has no seed model, so this is what a PyTorch user of the seed design
would run: the same architecture as :mod:`mlx_evit.models.seed`, written the usual
PyTorch way (NCHW convolutions, ``nn.Linear``/``nn.LayerNorm`` on channels-last
tokens). Module names equal the MLX parameter paths, so
:func:`load_mlx_weights` copies an MLX model's weights over by name
(convolutions OHWI -> OIHW); the benchmark checks that both give the same
logits before timing them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

ATTN_EPS = 1e-6  # mlx_evit.models.seed.ATTN_EPS


def _phi(x: torch.Tensor) -> torch.Tensor:
    """ELU + 1, the positive feature map of the linear attention."""
    return F.elu(x) + 1.0


class CascadedGroupLinearAttention(tnn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkvs = tnn.ModuleList(tnn.Linear(self.head_dim, 3 * self.head_dim) for _ in range(num_heads))
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        d = self.head_dim
        slices = x.split(d, dim=-1)
        outs = []
        for i, qkv in enumerate(self.qkvs):
            h = slices[i] if i == 0 else slices[i] + outs[-1]
            q, k, v = qkv(h).float().split(d, dim=-1)
            q, k = _phi(q), _phi(k)
            v1 = F.pad(v, (0, 1), value=1.0)  # ones column: the normaliser
            out = q @ (k.transpose(-1, -2) @ v1)
            outs.append((out[..., :-1] / (out[..., -1:] + ATTN_EPS)).to(x.dtype))
        return self.proj(torch.cat(outs, dim=-1))


class ConvFFN(tnn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = tnn.Linear(dim, hidden)
        self.dw = tnn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = tnn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        x = F.gelu(self.fc1(x))
        x = self.dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(F.gelu(x))


class SeedBlock(tnn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim)
        self.attn = CascadedGroupLinearAttention(dim, num_heads)
        self.norm2 = tnn.LayerNorm(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.attn(self.norm1(x).reshape(B, H * W, C)).reshape(B, H, W, C)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(tnn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = tnn.Conv2d(in_channels, dim, patch, stride=patch)
        self.norm = tnn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW image -> NHWC tokens
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Downsample(tnn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = tnn.LayerNorm(dim)
        self.conv = tnn.Conv2d(dim, out_dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SeedStage(tnn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, downsample: bool):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else None
        self.blocks = tnn.ModuleList(SeedBlock(dim, num_heads, mlp_ratio) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class SeedEfficientViT(tnn.Module):
    """``(B, C, H, W)`` images -> logits ``(B, num_classes)`` (or pooled features)."""

    def __init__(self, in_channels: int = 3, patch_size: int = 16, embed_dim: int = 64,
                 depths: Sequence[int] = (1, 2, 3), num_heads: Sequence[int] = (4, 4, 4),
                 mlp_ratio: float = 4.0, num_classes: int = 1000):
        super().__init__()
        widths = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size)
        self.stages = tnn.ModuleList(
            SeedStage(widths[max(i - 1, 0)], widths[i], depths[i], num_heads[i], mlp_ratio, downsample=i > 0)
            for i in range(len(widths))
        )
        self.norm = tnn.LayerNorm(widths[-1])
        self.head = tnn.Linear(widths[-1], num_classes) if num_classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.stages:
            x = stage(x)
        x = self.norm(x).mean(dim=(1, 2))
        return self.head(x) if self.head is not None else x


def from_mlx_config(arch_args: Mapping) -> SeedEfficientViT:
    """A PyTorch seed model with the architecture arguments of an MLX seed model (``model.arch_args``)."""
    return SeedEfficientViT(
        in_channels=arch_args.get("in_channels", 3),
        patch_size=arch_args.get("patch_size", 16),
        embed_dim=arch_args.get("embed_dim", 64),
        depths=tuple(arch_args.get("depths", (1, 2, 3))),
        num_heads=tuple(arch_args.get("num_heads", (4, 4, 4))),
        mlp_ratio=arch_args.get("mlp_ratio", 4.0),
        num_classes=arch_args.get("num_classes") or 0,
    )


def load_mlx_weights(model: SeedEfficientViT, params: Mapping[str, np.ndarray]) -> SeedEfficientViT:
    """Copy flattened MLX seed parameters (name -> numpy) into ``model``; 4-D weights OHWI -> OIHW."""
    state = model.state_dict()
    missing = sorted(set(state) - set(params))
    unexpected = sorted(set(params) - set(state))
    if missing or unexpected:
        raise KeyError(f"seed weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    converted = {}
    for key, value in params.items():
        value = np.asarray(value, dtype=np.float32)
        if value.ndim == 4:
            value = value.transpose(0, 3, 1, 2)
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"{key}: MLX shape {value.shape} vs PyTorch {tuple(state[key].shape)}")
        converted[key] = torch.from_numpy(np.ascontiguousarray(value))
    model.load_state_dict(converted)
    return model.eval()


if __name__ == "__main__":  # a quick self-check against mlx_evit (needs both installed)
    import mlx_evit  # noqa: F401
    import mlx.core as mx
    from mlx.utils import tree_flatten

    mlx_model = mlx_evit.create_model("efficientvit_seed", num_classes=1000)
    tm = load_mlx_weights(from_mlx_config(mlx_model.arch_args), {k: np.array(v) for k, v in tree_flatten(mlx_model.parameters())})
    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    out = np.array(mlx_model(mx.array(x)))
    print("max |diff|", float(np.abs(out - ref).max()), "max |logit|", float(np.abs(ref).max()))
