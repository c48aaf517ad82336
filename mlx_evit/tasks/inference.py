"""The default inference path: a model prepared once, then called like a function.

:func:`prepare` turns any family's model into a :class:`Predictor`:

1. eval mode, BatchNorms folded into the convolutions (``model.fuse()``);
2. optionally half precision (``dtype``; attention cores stay float32) and
   weight quantization of the ``nn.Linear`` layers (``quantize`` = 4 or 8
   bits; pointwise convolutions are ``nn.Linear`` here, so they are covered);
3. parameters evaluated;
4. the forward pass wrapped in ``mx.compile`` (elementwise chains such as
   bias + activation + residual, or the shifted multiply-adds of the CPU
   depthwise convolution, become single fused kernels).

When to compile (``compile="auto"``, the default): on a GPU device at once.
On the CPU backend a fused kernel is C++ that MLX compiles with ``g++`` the
first time it is seen (then cached in ``$TMPDIR/mlx``): with an empty cache
that costs about 10 s for one model, far more than a small job gains (one
224x224 image: 0.6 s eager). So the CPU predictor runs eagerly until it has
seen ``COMPILE_AFTER_PIXELS`` input pixels (about 80 images at 224x224, two
at 1024x2048), a job large enough to repay the compilation, and compiled
from then on. ``compile=True`` compiles from the first call (benchmarks,
and jobs that need every call computed the same way), ``False`` never.

The compiled function takes the model's state as an explicit input
(``mx.compile(..., inputs=model.state)``), so weights loaded or changed after
:func:`prepare` are used, not stale copies. MLX retraces on every new input
shape, dtype and default device, so one predictor serves several resolutions
and follows ``mx.set_default_device``; the backend-specific formulations in
:mod:`mlx_evit.ops.layers` (native grouped convolutions on the GPU, shifted
multiply-adds and batched matmuls on the CPU; see :mod:`mlx_evit.ops.backend`)
are chosen at trace time.

On the CPU backend two more things matter. Fusion needs a C++ compiler
(``g++``) at run time: without one, MLX's compile silently fuses nothing,
so the predictor runs eagerly instead (``predictor.compiled`` says which).
And MLX runs each CPU stream's non-BLAS work on one thread, so a batch may
be split across CPU streams (default: up to 2) that run concurrently; every
image is computed exactly as it would be alone. Whether that pays depends on
the model (GEMM-heavy ones gain nothing), so by default the first calls with
a new input shape try both ways and the faster one is kept. While a
split batch runs, the OpenBLAS that :mod:`mlx_evit.ops.blas` loaded gets
``threads // streams`` threads (restored afterwards; the setting is
process-wide), so streams and BLAS together use the cores once, and the
result is evaluated before the call returns.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import time
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_evit.ops.backend import default_device_is_gpu
from mlx_evit.ops.dtypes import cast_model, model_dtype, parse_dtype

__all__ = ["Predictor", "prepare", "quantizable", "parameter_bytes", "cpu_compile_available"]

DTypeLike = Union[None, str, mx.Dtype]

QUANT_BITS = (4, 8)
CACHE_LIMIT = 1 << 30  # bytes of freed buffers MLX may keep for reuse (see prepare)
COMPILE_AFTER_PIXELS = 4_000_000  # CPU, compile="auto": eager until this many input pixels (module docstring)


@functools.cache
def cpu_compile_available() -> bool:
    """True when MLX's CPU backend can JIT-compile fused kernels (it shells out to ``g++``).

    Looked up once per process: the predictor asks on every call.
    """
    return shutil.which("g++") is not None


def quantizable(group_size: int):
    """``nn.quantize`` predicate: every ``nn.Linear`` whose input width is a multiple of ``group_size``.

    Narrower layers (e.g. the 8- and 16-channel pointwise convolutions of
    EfficientViT-B0's stem) stay in floating point.
    """

    def predicate(path: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0

    return predicate


def _is_fused(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.BatchNorm) for _, m in model.named_modules())


class Predictor:
    """A prepared model: ``predictor(x)`` -> float32 outputs ``(B, num_classes)`` (or features).

    ``x``: ``(B, H, W, C)`` NHWC images (``mx.array`` or numpy), normalized;
    cast to the predictor's ``dtype``. Build it with :func:`prepare`.
    Attributes: ``model`` (the prepared module, fused, in eval mode),
    ``dtype``, ``bits`` (``None`` or the quantization bits), ``compiled``
    (whether the forward pass is fused on the current device), ``streams``
    (the most CPU streams a batch is split across), ``split_plan`` (per
    input shape, the number of streams chosen by timing, when tuning: the
    first six calls with a shape alternate between running it whole and
    split, the last four timed; no call is repeated for the measurement)
    and ``last_split`` (how many parts the last call ran in; 1: whole).
    """

    def __init__(self, model: nn.Module, dtype: mx.Dtype, bits: Optional[int], compile: Union[bool, str],
                 streams: int, tune: bool):
        self.model = model
        self.dtype = dtype
        self.bits = bits
        self._want_compile = bool(compile)
        self._compile_when_large = compile == "auto"
        self.pixels_seen = 0  # input pixels (B * H * W) of all calls so far
        self.streams = streams
        self.tune = tune
        self.split_plan: dict[tuple, int] = {}
        self.last_split = 0  # no call yet
        self._trial_times: dict[tuple, list] = {}
        self._cpu_streams: list = []
        self._blas = _OpenBLASThreads.open()
        self._forward = self._build_forward() if compile else model

    def _build_forward(self):
        model = self.model

        def forward(x: mx.array) -> mx.array:
            return model(x)

        return mx.compile(forward, inputs=model.state)

    @property
    def compiled(self) -> bool:
        """True when calls run through ``mx.compile`` with kernel fusion on the current device."""
        if not self._want_compile:
            return False
        if default_device_is_gpu():
            return True
        if self._compile_when_large and self.pixels_seen < COMPILE_AFTER_PIXELS:
            return False
        return cpu_compile_available()

    def _run(self, x: mx.array) -> mx.array:
        fn = self._forward if self.compiled else self.model
        return fn(x)

    def __call__(self, x) -> mx.array:
        if self.model.training:
            raise RuntimeError(
                "the model was switched to training mode after prepare(); call model.eval() "
                "(or prepare() again) before predicting"
            )
        if not isinstance(x, mx.array):
            x = mx.array(x)
        if mx.issubdtype(x.dtype, mx.floating) and x.dtype != self.dtype:
            x = x.astype(self.dtype)
        was_compiled = self.compiled
        if x.ndim == 4:
            self.pixels_seen += int(x.shape[0] * x.shape[1] * x.shape[2])
        if self.compiled != was_compiled:  # switching to the compiled forward: split timings start over
            self.split_plan.clear()
            self._trial_times.clear()
        n = self._split_count(x.shape)
        if n > 1 and self.tune:
            key = self._key(x)
            plan = self.split_plan.get(key)
            if plan is None:
                return self._trial(key, x, n)
            n = plan
        return self._predict(x, n)

    # Online choice of the batch split: the first calls with a new shape run it whole and split,
    # alternating, first once each untimed (tracing, JIT compilation), then timed; later calls use
    # the faster (best of its timed calls). Every call returns its answer: nothing is repeated.
    _TRIALS = ((False, False), (True, False), (False, True), (True, True), (False, True), (True, True))

    def _trial(self, key: tuple, x: mx.array, n: int) -> mx.array:
        times = self._trial_times.setdefault(key, [])
        split, timed = self._TRIALS[len(times)]
        start = time.perf_counter()
        out = self._predict(x, n if split else 1)
        if timed:
            mx.eval(out)
        times.append((split, time.perf_counter() - start if timed else None))
        if len(times) == len(self._TRIALS):
            whole = min(t for s, t in times if t is not None and not s)
            parts = min(t for s, t in times if t is not None and s)
            self.split_plan[key] = n if parts < whole else 1
            del self._trial_times[key]
        return out

    def tuning(self, x) -> bool:
        """True while the batch split for inputs like ``x`` is still being chosen.

        Benchmarks call the predictor until this is False before timing it.
        """
        x = x if isinstance(x, mx.array) else mx.array(x)
        return self.tune and self._split_count(x.shape) > 1 and self._key(x) not in self.split_plan

    def _key(self, x: mx.array) -> tuple:
        dtype = self.dtype if mx.issubdtype(x.dtype, mx.floating) else x.dtype
        return (tuple(x.shape), str(dtype), str(mx.default_device()))

    def _predict(self, x: mx.array, n: int) -> mx.array:
        self.last_split = max(n, 1)
        if n <= 1:
            return self._run(x).astype(mx.float32)
        # Data parallel over CPU streams: each stream has its own worker thread.
        if len(self._cpu_streams) < n:
            self._cpu_streams += [mx.new_stream(mx.cpu) for _ in range(n - len(self._cpu_streams))]
        bounds = [round(i * x.shape[0] / n) for i in range(n + 1)]
        outs = []
        for stream, lo, hi in zip(self._cpu_streams, bounds[:-1], bounds[1:]):
            with mx.stream(stream):
                outs.append(self._run(x[lo:hi]))
        out = mx.concatenate(outs, axis=0).astype(mx.float32)
        # The streams already use the cores: their GEMMs share the BLAS threads while they run.
        blas = self._blas
        threads = blas.get() if blas is not None else 1
        if threads > 1:
            blas.set(max(1, threads // n))
        try:
            mx.eval(out)
        finally:
            if threads > 1:
                blas.set(threads)
        return out

    def _split_count(self, shape: tuple) -> int:
        """Streams a batch of this shape is split across when splitting (1: not splittable)."""
        if self.streams <= 1 or len(shape) != 4 or shape[0] < 2:
            return 1
        if default_device_is_gpu():
            return 1
        return min(self.streams, shape[0])

    def __repr__(self) -> str:
        name = getattr(self.model, "arch_name", type(self.model).__name__)
        bits = f", bits={self.bits}" if self.bits else ""
        return f"Predictor({name}, dtype={self.dtype}{bits}, compiled={self.compiled}, streams={self.streams})"


class _OpenBLASThreads:
    """Get/set the thread count of the OpenBLAS that :mod:`mlx_evit.ops.blas` loaded for MLX."""

    def __init__(self, lib: ctypes.CDLL, prefix: str = ""):
        self._get = getattr(lib, prefix + "openblas_get_num_threads")  # prefix: "scipy_" for scipy-openblas32
        self._set = getattr(lib, prefix + "openblas_set_num_threads")
        self._get.restype = ctypes.c_int
        self._set.argtypes = [ctypes.c_int]

    @classmethod
    def open(cls) -> Optional["_OpenBLASThreads"]:
        from mlx_evit.ops.blas import blas_info

        state = blas_info()
        if not state.fast or not state.library:
            return None
        try:
            return cls(ctypes.CDLL(state.library), state.prefix)
        except (OSError, AttributeError):  # not OpenBLAS (MLX_EVIT_BLAS pointed elsewhere)
            return None

    def get(self) -> int:
        return int(self._get())

    def set(self, n: int) -> None:
        self._set(int(n))


def _default_streams() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def prepare(
    model: nn.Module,
    *,
    compile: Union[bool, str] = "auto",
    dtype: DTypeLike = None,
    quantize: Optional[int] = None,
    group_size: int = 64,
    streams: Optional[int] = None,
    cache_limit: Optional[int] = CACHE_LIMIT,
) -> Predictor:
    """Prepare ``model`` for fast inference; returns a :class:`Predictor`.

    The model is modified in place: eval mode, BatchNorms folded (if not
    already), optionally cast to ``dtype`` (``"float32"``, ``"float16"`` or
    ``"bfloat16"``; weights and activations, attention cores in float32;
    default: keep the model's dtype, inputs are cast to it) and its
    ``nn.Linear`` layers quantized to ``quantize`` bits (4 or 8, affine,
    groups of ``group_size`` input channels; layers narrower than a group
    stay in floating point). ``compile``: ``"auto"`` (default: on the CPU,
    eager until the job is large enough to repay MLX's kernel compilation;
    see the module docstring), ``True`` (compiled from the first call) or
    ``False`` (eager, for debugging). ``streams``: the most CPU streams a batch is split across;
    by default ``min(2, cpu_count)``, with the choice between splitting and
    not made per input shape by timing the first calls (see
    :class:`Predictor`); an explicit number always splits that far (1:
    never). The GPU never splits.
    ``cache_limit``: MLX's buffer cache is raised to at least this many bytes
    (process-wide; never lowered; ``None`` leaves it alone). MLX's CPU
    default of 32 MB returns every larger activation buffer to the operating
    system after each use, and the next call pays page faults for it again
    (B1 at 1024x1024 ran 1.4x faster with the cache; the Metal default is
    already larger).

    Half precision is for the GPU: the MLX CPU backend has no fast float16
    or bfloat16 arithmetic and runs them several times slower than float32.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare() expects an mlx.nn.Module, got {type(model).__name__}")
    target = model_dtype(model) if dtype is None else parse_dtype(dtype)
    if quantize is not None and quantize not in QUANT_BITS:
        raise ValueError(f"quantize must be None or one of {QUANT_BITS} bits, got {quantize!r}")
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size!r}")
    tune = streams is None
    if streams is None:
        streams = _default_streams()
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
        raise ValueError(f"streams must be a positive integer, got {streams!r}")
    if cache_limit is not None and (isinstance(cache_limit, bool) or not isinstance(cache_limit, int) or cache_limit < 0):
        raise ValueError(f"cache_limit must be None or a number of bytes, got {cache_limit!r}")
    if cache_limit is not None:
        previous = mx.set_cache_limit(cache_limit)
        if previous > cache_limit:
            mx.set_cache_limit(previous)

    fuse = getattr(model, "fuse", None)
    if not callable(fuse) and not _is_fused(model):
        raise ValueError(f"{type(model).__name__} has BatchNorm layers but no fuse() method")
    model.eval()
    if callable(fuse):
        fuse()  # idempotent: folds BatchNorms once, refreshes inference caches
    cast = target != model_dtype(model)
    if cast:
        cast_model(model, target)
    if quantize is not None:
        nn.quantize(model, group_size=group_size, bits=quantize, class_predicate=quantizable(group_size))
    if callable(fuse) and (cast or quantize is not None):
        fuse()  # caches derived from parameters (e.g. gathered attention biases) follow the new ones
    mx.eval(model.parameters())
    return Predictor(model, target, quantize, compile, streams, tune)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters (quantized weights count their packed size, scales and biases)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
