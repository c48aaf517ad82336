"""Layers shared by every EfficientViT family in this package (all NHWC).

Everything a family module needs and that is not specific to it lives here:
activations, convolution + BatchNorm (+ activation) with inference-time BN
folding, a depthwise convolution, the grouped 1x1 convolution used by
LiteMLA's multi-scale aggregation, the linear-attention kernels, and input
validation.

Backend: each op with a CPU formulation dispatches in one line on
:func:`mlx_evit.ops.backend.use_native` (``MLX_EVIT_KERNELS``): MLX's built-in
kernel (what runs on the Apple GPU) or :mod:`mlx_evit.ops.cpu_kernels`.

Layout conventions (MLX): activations are ``(B, H, W, C)``; convolution
weights are ``(O, kH, kW, I / groups)``; pointwise (1x1, stride 1, groups 1)
convolutions are ``nn.Linear`` layers over the channel axis, with weights
``(O, I)``, so they run as one GEMM and can be quantized with ``nn.quantize``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_evit.ops import cpu_kernels
from mlx_evit.ops.backend import exact_float32_on_cuda, use_native

Activation = Optional[Callable[[mx.array], mx.array]]

# ---------------------------------------------------------------------------
# Elementwise math: MLX's built-ins or the CPU forms (mlx_evit.ops.backend decides)
# ---------------------------------------------------------------------------


def exp(x: mx.array) -> mx.array:
    """``e**x`` with the argument clamped to ``[-88, 88]`` on both paths.

    Native: ``mx.exp`` of the clamped argument; CPU: the float32 polynomial
    :func:`mlx_evit.ops.cpu_kernels.exp` (relative error < 1e-7). Both saturate
    at ``e**88`` = 1.65e38 instead of overflowing. The one difference: below
    about ``e**-87.3`` the CPU form flushes to zero where ``mx.exp`` may
    return a float32 subnormal (< 1.2e-38).
    """
    if use_native():
        return mx.exp(mx.clip(x, -cpu_kernels.EXP_CLAMP, cpu_kernels.EXP_CLAMP))
    return cpu_kernels.exp(x)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax along ``axis`` (``mx.softmax``, or the max-shifted CPU :func:`exp` form)."""
    return mx.softmax(x, axis=axis) if use_native() else cpu_kernels.softmax(x, axis)


def sigmoid(x: mx.array) -> mx.array:
    """``1 / (1 + e**-x)`` (``mx.sigmoid``, or via the CPU :func:`exp`)."""
    return mx.sigmoid(x) if use_native() else cpu_kernels.sigmoid(x)


def normal_cdf(x: mx.array) -> mx.array:
    """Standard normal CDF ``0.5 * (1 + erf(x / sqrt 2))`` (``mx.erf``, or a rational approximation, error < 1e-7)."""
    return 0.5 * (1.0 + mx.erf(x * (1.0 / math.sqrt(2.0)))) if use_native() else cpu_kernels.normal_cdf(x)


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def hardswish(x: mx.array) -> mx.array:
    """``x * relu6(x + 3) / 6`` (torch.nn.Hardswish), used by the MIT B series."""
    return x * mx.clip(x + 3.0, 0.0, 6.0) / 6.0


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (torch ``approximate="tanh"``), MIT L series.

    ``0.5 x (1 + tanh(u)) = x * sigmoid(2u)``; the second (same function)
    form is the CPU one, where ``mx.tanh`` is slow.
    """
    if not use_native():
        return cpu_kernels.gelu_tanh(x)
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, ``x * Phi(x)``."""
    return nn.gelu(x) if use_native() else cpu_kernels.gelu(x)


def relu(x: mx.array) -> mx.array:
    return mx.maximum(x, 0.0)


def elu_plus_one(x: mx.array) -> mx.array:
    """phi(x) = ELU(x) + 1 > 0: the feature map of the seed model's linear attention."""
    return mx.where(x > 0, x + 1.0, exp(mx.minimum(x, 0.0)))


ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "relu": relu,
    "hswish": hardswish,
    "gelu_tanh": gelu_tanh,
    "gelu": gelu,
}


def get_act(name: Optional[str]) -> Activation:
    """Activation function by name (``None`` -> no activation)."""
    if name is None:
        return None
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


# ---------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------


def _scale_rows(w: mx.array, s: mx.array) -> mx.array:
    """Multiply ``w`` by ``s`` along its first (output-channel) axis."""
    return w * s.reshape((-1,) + (1,) * (w.ndim - 1)).astype(w.dtype)


class DepthwiseConv2d(nn.Module):
    """k x k convolution with ``groups == channels`` and symmetric ``k // 2`` padding.

    Weight ``(C, k, k, 1)`` as for ``nn.Conv2d(groups=C)``. Native: MLX's
    grouped conv (a dedicated depthwise kernel on the GPU). MLX's CPU backend
    runs grouped convolutions as a naive scalar loop, so the CPU path
    (:func:`mlx_evit.ops.cpu_kernels.depthwise_conv2d`) writes the convolution
    with other ops, exactly: small maps as one
    strided ``(B, Ho, Wo, k, k, C)`` view of the padded input, scaled and
    summed over the taps (a handful of graph nodes); large maps as a sum of
    ``k * k`` shifted, per-channel-scaled views, which ``mx.compile`` fuses
    into a few passes (:attr:`TAPS_PER_KERNEL` taps each) without
    materialising the ``k * k`` copies.

    Per backend, measured: on an H200 (MLX CUDA) the built-in depthwise kernel
    takes 0.68 ms at 256x56x56x256 (3x3) and 0.39 ms at 256x14x14x768 (5x5),
    against 3.1-3.5 and 1.9 ms for the shifted sums, so the native path keeps
    ``mx.conv2d`` (the Apple GPU has its own depthwise kernel too). On MLX's
    CPU backend the shifted sums win (whole models, x86; numbers above).
    """

    # CPU choice between the two forms by the number of tap products B * Ho * Wo * C * k * k,
    # measured on x86 in whole models: the strided view materialises the products, the shifted
    # sum costs about 2 k**2 graph nodes and a scalar fused kernel.
    STRIDED_VIEW_MAX = 1_000_000
    # Taps summed per fused kernel in the shifted form. MLX's CPU JIT turns a fused chain into one
    # strided loop with a pointer per input; past about 8 inputs (x tap + weight row per term) it
    # runs several times slower per element, so the sum is cut into kernels of 3 taps
    # (see :func:`mlx_evit.ops.cpu_kernels.fusion_boundary`).
    # Measured on x86 in whole models at batch 16: B0 1.75x, B1 1.9x faster than one 9-tap kernel.
    TAPS_PER_KERNEL = 3

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, bias: bool = False):
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        scale = 1.0 / math.sqrt(kernel_size * kernel_size)
        self.weight = mx.random.uniform(-scale, scale, (channels, kernel_size, kernel_size, 1))
        if bias:
            self.bias = mx.zeros((channels,))

    def _extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, bias={'bias' in self}"

    def __call__(self, x: mx.array) -> mx.array:
        k, s = self.kernel_size, self.stride
        if use_native() or k == 1:
            y = mx.conv2d(x, self.weight, stride=s, padding=k // 2, groups=self.channels)
        else:
            y = cpu_kernels.depthwise_conv2d(x, self.weight, s, self.STRIDED_VIEW_MAX, self.TAPS_PER_KERNEL)
        if "bias" in self:
            y = y + self.bias
        return y

    @staticmethod
    def torch_to_mlx(leaf: str, value):
        """PyTorch ``(C, 1, k, k)`` -> ``(C, k, k, 1)``."""
        return value.transpose(0, 2, 3, 1) if leaf == "weight" and value.ndim == 4 else value


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and semantics) that runs 1x1 and narrow dense convolutions as one GEMM.

    1x1 (stride 1, no padding, ungrouped) convolutions are a matmul on every
    device (see :meth:`__call__` for the measurement).

    For ``groups == 1`` and no dilation with ``in_channels * out_channels``
    at most :attr:`IM2COL_MAX_CHANNELS`, the CPU path builds the
    ``(B * Ho * Wo, k * k * C)`` patch matrix from one strided view of the
    padded input and multiplies it by the weight; that copy is faster than
    the one inside MLX's CPU convolution, which matters when the GEMM is
    small (stems, patch embeddings). Wider convolutions and the native path
    use ``mx.conv2d``.
    """

    IM2COL_MAX_CHANNELS = 64 * 128  # measured crossover of in * out channels on x86
    # MLX 0.32.4's CUDA backend with TF32 off segfaults (illegal memory access) on the 3x3 convolution
    # 1x64x64x256 -> 1024 of EfficientViT-SAM XL's neck (also at batch 2), and runs 64x64x256 -> 512,
    # 64x64x128 -> 1024, 32x32x256 -> 1024 and the same conv split in two halves of 512 output channels
    # (H200, benchmarks/gpu_diag.py "crash"; reproducer: benchmarks/xl_crash_repro.py). In that mode
    # wider convolutions run in chunks of this many output channels: the same sums per output, exact.
    CUDA_FLOAT32_MAX_OUT = 512

    def __call__(self, x: mx.array) -> mx.array:
        O, kh, kw, C = self.weight.shape
        dilation = (self.dilation,) * 2 if isinstance(self.dilation, int) else tuple(self.dilation)
        if self.groups != 1 or dilation != (1, 1):
            return super().__call__(x)
        if (kh, kw) == (1, 1) and tuple(self.stride) == (1, 1) and tuple(self.padding) == (0, 0):
            # A 1x1 convolution is a GEMM over the channels, on every device: on an H200 (MLX CUDA,
            # 256x28x28x128 -> 512) x @ W.T takes 0.79 ms against 1.25 ms for mx.conv2d.
            w = self.weight.reshape(O, C).T
            y = x.reshape(-1, C)
            y = mx.addmm(self.bias, y, w) if "bias" in self else y @ w
            return y.reshape(*x.shape[:-1], O)
        if use_native() or C * O > self.IM2COL_MAX_CHANNELS:
            step = self.CUDA_FLOAT32_MAX_OUT
            if O > step and x.dtype == mx.float32 and exact_float32_on_cuda():
                return mx.concatenate([self._chunk(x, lo, min(O, lo + step)) for lo in range(0, O, step)], axis=-1)
            return super().__call__(x)
        return cpu_kernels.im2col_conv2d(x, self.weight, self.get("bias"), self.stride, self.padding)


    def _chunk(self, x: mx.array, lo: int, hi: int) -> mx.array:
        """Output channels ``lo:hi`` of the convolution."""
        y = mx.conv2d(x, self.weight[lo:hi], self.stride, self.padding, self.dilation)
        return y + self.bias[lo:hi] if "bias" in self else y


class GroupedPointwise(nn.Module):
    """1x1 convolution with ``groups`` groups, no bias: ``(B, H, W, C) -> (B, H, W, O)``.

    Weight ``(O, 1, 1, C / groups)`` (MLX conv layout). On every device and in
    both kernel modes it runs as one batched matmul over the groups
    (:meth:`per_group`), never as a grouped ``mx.conv2d``. Measured at
    LiteMLA's shapes: on an H200 (MLX CUDA, float32 without TF32)
    ``mx.conv2d(groups=24)`` at 256x14x14x768 takes 6.22 ms, the batched
    matmul 0.59 ms (groups 48 at 256x7x7x1536: 3.69 vs 0.28 ms; with TF32,
    MLX's default, 6.13 vs 0.47 ms, PyTorch's grouped conv 6.22 ms); on MLX's
    CPU backend grouped convolutions are a scalar loop (x86, 4x14x14x768,
    groups 24: 272 ms against 13 ms; ``gpu_bench.py --device cpu --quick``,
    a loaded machine). The Apple GPU runs the same generic grouped-conv
    kernel as CUDA; that it gains there too is expected, not measured.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.groups = groups
        scale = 1.0 / math.sqrt(in_channels // groups)
        self.weight = mx.random.uniform(-scale, scale, (out_channels, 1, 1, in_channels // groups))

    def per_group(self, x: mx.array) -> mx.array:
        """``(B, H, W, C) -> (B, groups, H * W, O / groups)``: group ``g``'s output channels, contiguous.

        The layout LiteMLA attends in (one group per q, k or v of a head), so
        it needs no transpose of the output.
        """
        B, H, W, C = x.shape
        g, O = self.groups, self.weight.shape[0]
        xg = x.reshape(B, H * W, g, C // g).transpose(0, 2, 1, 3)  # (B, g, N, C/g), a strided view
        return xg @ self.weight.reshape(g, O // g, C // g).transpose(0, 2, 1)  # (g, C/g, O/g) broadcast over B

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, _ = x.shape
        y = self.per_group(x)
        return y.transpose(0, 2, 1, 3).reshape(B, H, W, -1)

    @staticmethod
    def torch_to_mlx(leaf: str, value):
        return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def torch_to_mlx(module: nn.Module, leaf: str, value):
    """Convert one PyTorch tensor (numpy array) for parameter ``leaf`` of ``module``.

    Decided by the type of the receiving module, never by shape: convolution
    weights go from OIHW to OHWI, pointwise convolutions that are ``nn.Linear``
    here drop their trailing 1x1, everything else is unchanged.
    """
    hook = getattr(module, "torch_to_mlx", None)
    if hook is not None:
        return hook(leaf, value)
    if isinstance(module, nn.Conv2d) and leaf == "weight" and value.ndim == 4:
        return value.transpose(0, 2, 3, 1)
    if isinstance(module, nn.Linear) and leaf == "weight" and value.ndim == 4:
        if value.shape[2:] != (1, 1):
            raise ValueError(f"expected a 1x1 convolution weight, got shape {tuple(value.shape)}")
        return value.reshape(value.shape[0], value.shape[1])
    return value


class ConvNorm(nn.Module):
    """Convolution, optional BatchNorm, optional activation (``conv``, ``norm`` children).

    The convolution is ``nn.Linear`` for 1x1/stride-1/ungrouped kernels,
    :class:`DepthwiseConv2d` when ``groups == in == out``, otherwise
    ``nn.Conv2d`` with symmetric ``k // 2`` padding (PyTorch semantics).
    :meth:`fuse` folds the BatchNorm into the convolution for inference.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm: bool = True,
        act: Activation = None,
        eps: float = 1e-5,
    ):
        super().__init__()
        if kernel_size == 1 and stride == 1 and groups == 1:
            self.conv = nn.Linear(in_channels, out_channels, bias=bias)
        elif groups == in_channels == out_channels:
            self.conv = DepthwiseConv2d(in_channels, kernel_size, stride, bias=bias)
        elif groups == 1:
            self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=bias)
        else:
            raise ValueError(f"unsupported grouped convolution: groups={groups}, {in_channels}->{out_channels}")
        self.norm = nn.BatchNorm(out_channels, eps=eps) if norm else None
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x

    def fuse(self) -> None:
        """Fold the eval-mode BatchNorm into the convolution (exact up to rounding)."""
        if self.norm is None:
            return
        scale, shift = bn_scale_shift(self.norm)
        conv = self.conv
        bias = conv.bias if "bias" in conv else mx.zeros_like(shift)
        conv.weight = _scale_rows(conv.weight, scale)
        conv.bias = (bias * scale + shift).astype(conv.weight.dtype)
        self.norm = None


def bn_scale_shift(bn: nn.BatchNorm) -> tuple[mx.array, mx.array]:
    """Eval-mode BatchNorm as an affine map ``y = x * scale + shift`` (float32)."""
    var = bn.running_var.astype(mx.float32)
    mean = bn.running_mean.astype(mx.float32)
    scale = mx.rsqrt(var + bn.eps)
    if "weight" in bn:
        scale = scale * bn.weight.astype(mx.float32)
    shift = -mean * scale
    if "bias" in bn:
        shift = shift + bn.bias.astype(mx.float32)
    return scale, shift


def fuse_modules(model: nn.Module) -> nn.Module:
    """Call ``fuse()`` on every sub-module that has one (BN folding for inference).

    Returns ``model``, modified in place; call it on an eval-mode model.
    """
    for _, module in model.named_modules():
        if module is not model and callable(getattr(module, "fuse", None)):
            module.fuse()
    return model


# ---------------------------------------------------------------------------
# Linear attention
# ---------------------------------------------------------------------------


def linear_attention(q: mx.array, k: mx.array, v: mx.array, eps: float) -> mx.array:
    """Kernelised attention in O(N): ``q (k^T v) / (q . sum_n k_n + eps)``, in float32.

    ``q, k``: ``(..., N, d)`` non-negative feature maps (already passed through
    the kernel function); ``v``: ``(..., N, dv)``. Returns ``(..., N, dv)`` in
    float32. Products in the O(N d dv) order: ``k^T v`` is one ``(d, dv)``
    matrix per head, so no ``N x N`` array is ever formed.

    The normaliser is the GEMM ``q @ sum_n k_n``, not the reference code's
    column of ones appended to ``v`` (``k^T [v | 1]``), which copies ``v``
    into a new ``(..., N, dv + 1)`` array and gives every GEMM an odd width.
    Same sums, float32 rounding aside (4e-7 relative). Measured on this x86
    CPU (2 cores shared with other jobs, so within about 20%; compiled,
    medians): (16, 16, 196, 16) 22.4 ms against 31.1 ms with the ones column,
    (16, 32, 49, 16) 15.4 against 17.6 ms, and 1.2 against 1.8 s at
    (1, 16, 1024, 32). On an H200 (MLX CUDA, TF32; ``gpu_bench.py`` op
    table, "relu linear attention"): 0.63 ms against 0.58 ms with the ones
    column at (256, 16, 196, 16), under 10% in one run, taken as a tie; the
    form without the copy stays on both paths.
    """
    q = q.astype(mx.float32)
    k = k.astype(mx.float32)
    v = v.astype(mx.float32)
    kv = k.swapaxes(-1, -2) @ v  # (..., d, dv)
    den = q @ k.sum(axis=-2)[..., None]  # (..., N, 1)
    return (q @ kv) / (den + eps)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def check_image_input(x: mx.array, in_channels: int, multiple: int = 1, min_size: int = 1) -> None:
    """Raise ``ValueError`` unless ``x`` is an NHWC batch the model can take.

    ``multiple``: height and width must be divisible by it (the total stride of
    models that need it); ``min_size``: smallest height/width accepted.
    """
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 4:
        raise ValueError(
            f"expected a 4-D NHWC input (batch, height, width, {in_channels}), got shape {shape}"
        )
    B, H, W, C = shape
    if C != in_channels:
        hint = ""
        if H == in_channels:
            hint = " It looks like NCHW; transpose it with x.transpose(0, 2, 3, 1)."
        raise ValueError(
            f"expected {in_channels} channels in the last axis (NHWC), got shape {shape}.{hint}"
        )
    if H < min_size or W < min_size:
        raise ValueError(f"input {H}x{W} is too small: height and width must be at least {min_size}")
    if multiple > 1 and (H % multiple or W % multiple):
        raise ValueError(
            f"input height and width must be multiples of {multiple}, got {H}x{W}"
        )
