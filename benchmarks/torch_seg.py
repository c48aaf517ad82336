"""EfficientViT-Seg in plain PyTorch (eager, NCHW): the benchmark's PyTorch side, written here.

The original code (mit-han-lab/efficientvit) is not installable from a
package index, so this is the same architecture written the usual PyTorch
way. Module names follow the original's state-dict keys
(``backbone.input_stem.op_list.0.conv.weight``, ``head.input_ops.0.op_list.0.*``,
...), so an original checkpoint, or the synthetic one the fixtures were made
with, loads with ``load_state_dict(strict=True)``. ``tests/test_seg_torch_reference.py``
checks it against the fixtures computed by the original code.

    model = build("efficientvit_seg_b0_cityscapes").eval()
    model.load_state_dict(state_dict)          # original keys
    logits = model(x_nchw)                     # (B, classes, H / 8, W / 8)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as tnn
import torch.nn.functional as F

__all__ = ["EfficientViTSegTorch", "build", "CONFIGS"]

ATTENTION_EPS = 1e-15


def _act(name: Optional[str]) -> tnn.Module:
    if name is None:
        return tnn.Identity()
    return {"hswish": tnn.Hardswish(), "gelu": tnn.GELU(approximate="tanh")}[name]


class ConvLayer(tnn.Module):
    """conv (k, stride, k // 2 padding, groups, bias) -> optional BN -> optional activation."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, bias=False, norm=True, act=None, eps=1e-5):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)
        self.norm = tnn.BatchNorm2d(cout, eps=eps) if norm else None
        self.act = _act(act)

    def forward(self, x):
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x)


class Residual(tnn.Module):
    def __init__(self, main: tnn.Module, shortcut: bool):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x):
        return self.main(x) + x if self.shortcut else self.main(x)


class DSConv(tnn.Module):
    def __init__(self, c, act, eps):
        super().__init__()
        self.depth_conv = ConvLayer(c, c, 3, groups=c, act=act, eps=eps)
        self.point_conv = ConvLayer(c, c, 1, eps=eps)

    def forward(self, x):
        return self.point_conv(self.depth_conv(x))


class ResBlock(tnn.Module):
    def __init__(self, c, act, eps):
        super().__init__()
        self.conv1 = ConvLayer(c, c, 3, act=act, eps=eps)
        self.conv2 = ConvLayer(c, c, 3, eps=eps)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class MBConv(tnn.Module):
    def __init__(self, cin, cout, stride, expand, act, eps, fewer_norm=False):
        super().__init__()
        mid = round(cin * expand)
        self.inverted_conv = ConvLayer(cin, mid, 1, bias=fewer_norm, norm=not fewer_norm, act=act, eps=eps)
        self.depth_conv = ConvLayer(mid, mid, 3, stride, groups=mid, bias=fewer_norm, norm=not fewer_norm,
                                    act=act, eps=eps)
        self.point_conv = ConvLayer(mid, cout, 1, eps=eps)

    def forward(self, x):
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class FusedMBConv(tnn.Module):
    def __init__(self, cin, cout, stride, expand, act, eps):
        super().__init__()
        mid = round(cin * expand)
        self.spatial_conv = ConvLayer(cin, mid, 3, stride, act=act, eps=eps)
        self.point_conv = ConvLayer(mid, cout, 1, eps=eps)

    def forward(self, x):
        return self.point_conv(self.spatial_conv(x))


class LiteMLA(tnn.Module):
    """Multi-scale ReLU linear attention (one 5x5 aggregation scale), float32 inside."""

    def __init__(self, c, dim, eps):
        super().__init__()
        heads = c // dim
        total = heads * dim
        self.dim = dim
        self.qkv = ConvLayer(c, 3 * total, 1, norm=False)
        self.aggreg = tnn.ModuleList([tnn.Sequential(
            tnn.Conv2d(3 * total, 3 * total, 5, padding=2, groups=3 * total, bias=False),
            tnn.Conv2d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
        )])
        self.proj = ConvLayer(2 * total, c, 1, eps=eps)

    def forward(self, x):
        B, _, H, W = x.shape
        qkv = self.qkv(x)
        ms = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)
        ms = ms.reshape(B, -1, 3 * self.dim, H * W).float()  # (B, G, 3d, N)
        q, k, v = ms.split(self.dim, dim=2)
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 0, 0, 1), value=1.0)  # a row of ones: the normaliser
        kv = v @ k.transpose(-1, -2)  # (B, G, d + 1, d)
        out = kv @ q  # (B, G, d + 1, N)
        out = out[:, :, :-1] / (out[:, :, -1:] + ATTENTION_EPS)
        out = out.to(x.dtype).reshape(B, -1, H, W)
        return self.proj(out)


class EfficientViTBlock(tnn.Module):
    def __init__(self, c, dim, expand, act, eps):
        super().__init__()
        self.context_module = Residual(LiteMLA(c, dim, eps), True)
        self.local_module = Residual(MBConv(c, c, 1, expand, act, eps, fewer_norm=True), True)

    def forward(self, x):
        return self.local_module(self.context_module(x))


class OpList(tnn.Module):
    def __init__(self, ops: Sequence[tnn.Module]):
        super().__init__()
        self.op_list = tnn.ModuleList(ops)

    def forward(self, x):
        for op in self.op_list:
            x = op(x)
        return x


class Upsample(tnn.Module):
    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.factor, mode="bicubic", align_corners=False)


class Backbone(tnn.Module):
    """B series (``input_stem`` + 4 stages) or L series (5 stages, stage 0 the stem); returns stages 2-4."""

    def __init__(self, widths, depths, dim, large, eps):
        super().__init__()
        act = "gelu" if large else "hswish"
        self.large = large
        stem = [ConvLayer(3, widths[0], 3, 2, act=act, eps=eps)]
        block = ResBlock if large else DSConv
        stem += [Residual(block(widths[0], act, eps), True) for _ in range(depths[0])]
        stages = []
        cin = widths[0]
        for i, (w, d) in enumerate(zip(widths[1:], depths[1:])):
            if large:
                if i < 2:
                    ops = [Residual(FusedMBConv(cin, w, 2, 16, act, eps), False)]
                    ops += [Residual(FusedMBConv(w, w, 1, 4, act, eps), True) for _ in range(d)]
                elif i == 2:
                    ops = [Residual(MBConv(cin, w, 2, 16, act, eps, True), False)]
                    ops += [Residual(MBConv(w, w, 1, 4, act, eps, True), True) for _ in range(d)]
                else:
                    ops = [Residual(MBConv(cin, w, 2, 24, act, eps, True), False)]
                    ops += [EfficientViTBlock(w, dim, 6, act, eps) for _ in range(d)]
            elif i < 2:
                ops = [Residual(MBConv(cin, w, 2, 4, act, eps), False)]
                ops += [Residual(MBConv(w, w, 1, 4, act, eps), True) for _ in range(d - 1)]
            else:
                ops = [Residual(MBConv(cin, w, 2, 4, act, eps, True), False)]
                ops += [EfficientViTBlock(w, dim, 4, act, eps) for _ in range(d)]
            stages.append(OpList(ops))
            cin = w
        if large:
            self.stages = tnn.ModuleList([OpList(stem), *stages])
        else:
            self.input_stem = OpList(stem)
            self.stages = tnn.ModuleList(stages)

    def forward(self, x):
        feats = []
        x = x if self.large else self.input_stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats[-3:]  # strides 8, 16, 32


class SegHead(tnn.Module):
    def __init__(self, in_channels, width, depth, middle, expand, final_expand, classes, act, eps):
        super().__init__()
        ops = []
        for c, factor in zip(in_channels, (4, 2, 1)):  # stride 32, 16, 8
            conv = ConvLayer(c, width, 1, eps=eps)
            ops.append(OpList([conv, Upsample(factor)]) if factor > 1 else conv)
        self.input_ops = tnn.ModuleList(ops)
        if middle == "mbconv":
            blocks = [MBConv(width, width, 1, expand, act, eps) for _ in range(depth)]
        else:
            blocks = [FusedMBConv(width, width, 1, expand, act, eps) for _ in range(depth)]
        self.middle = OpList([Residual(b, True) for b in blocks])
        out = []
        if final_expand:
            out.append(ConvLayer(width, width * final_expand, 1, act=act, eps=eps))
        out.append(ConvLayer(width * (final_expand or 1), classes, 1, bias=True, norm=False))
        self.output_ops = tnn.ModuleList([OpList(out)])

    def forward(self, s8, s16, s32):
        a, b, c = (op(f) for op, f in zip(self.input_ops, (s32, s16, s8)))
        return self.output_ops[0](self.middle(a + (b + c)))


class EfficientViTSegTorch(tnn.Module):
    def __init__(self, widths, depths, dim, large, head_width, head_depth, middle, expand, final_expand, classes):
        super().__init__()
        eps = 1e-7 if large else 1e-5
        act = "gelu" if large else "hswish"
        self.backbone = Backbone(widths, depths, dim, large, eps)
        self.head = SegHead(tuple(widths[4:1:-1]), head_width, head_depth, middle, expand, final_expand, classes,
                            act, eps)

    def forward(self, x):
        return self.head(*self.backbone(x))


_BACKBONES = {
    "b0": ((8, 16, 32, 64, 128), (1, 2, 2, 2, 2), 16, False),
    "b1": ((16, 32, 64, 128, 256), (1, 2, 3, 3, 4), 16, False),
    "b2": ((24, 48, 96, 192, 384), (1, 3, 4, 4, 6), 32, False),
    "b3": ((32, 64, 128, 256, 512), (1, 4, 6, 6, 9), 32, False),
    "l1": ((32, 64, 128, 256, 512), (1, 1, 1, 6, 6), 32, True),
    "l2": ((32, 64, 128, 256, 512), (1, 2, 2, 8, 8), 32, True),
}
_HEADS = {  # head_width, depth, middle, expand, final_expand, classes
    "b0_cityscapes": (32, 1, "mbconv", 4, 4, 19), "b1_cityscapes": (64, 3, "mbconv", 4, 4, 19),
    "b2_cityscapes": (96, 3, "mbconv", 4, 4, 19), "b3_cityscapes": (128, 3, "mbconv", 4, 4, 19),
    "l1_cityscapes": (256, 3, "fmbconv", 1, None, 19), "l2_cityscapes": (256, 5, "fmbconv", 1, None, 19),
    "b1_ade20k": (64, 3, "mbconv", 4, None, 150), "b2_ade20k": (96, 3, "mbconv", 4, None, 150),
    "b3_ade20k": (128, 3, "mbconv", 4, None, 150), "l1_ade20k": (128, 3, "fmbconv", 4, 8, 150),
    "l2_ade20k": (128, 3, "fmbconv", 4, 8, 150),
}
CONFIGS = {f"efficientvit_seg_{k}": (*_BACKBONES[k[:2]], *v) for k, v in _HEADS.items()}


def build(name: str) -> EfficientViTSegTorch:
    """The PyTorch model of a registered name (``efficientvit_seg_b0_cityscapes``), random weights."""
    return EfficientViTSegTorch(*CONFIGS[name])
