"""The public entry points: :func:`create_model`, :func:`load`, :func:`convert`, :func:`save_model`.

Thin over the one loading pipe (:mod:`mlx_evit.loading.pipeline`): every
source a caller names, a local path or a registered pretrained name
(``efficientvit_b1.r224_in1k``, ``timm/efficientvit_b1.r224_in1k``), goes
through :func:`~mlx_evit.loading.pipeline.resolve` and
:func:`~mlx_evit.loading.pipeline.open_model`. What the pipe reports
(:attr:`~mlx_evit.loading.pipeline.Loaded.notes`) is issued here as Python
warnings, once.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_evit.loading.model_dir import check_target, save_model
from mlx_evit.loading.pipeline import Loaded, hub_name, open_model, pretrained_dir, resolve, save_loaded
from mlx_evit.models.registry import build_model, registry_name
from mlx_evit.ops.dtypes import cast_model, dtype_name, parse_dtype

__all__ = [
    "ConversionResult",
    "create_model",
    "load",
    "load_into",
    "convert",
    "save_model",
    "pretrained_weights",
    "hub_name",
]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert` did.

    ``model``: registry name written to ``config.json`` (with its tag when
    known); ``layout``: source layout (``timm``, ``mit-han-lab (B series)``,
    ``mlx``, ...); ``num_params``: learnable parameters (BatchNorm running
    statistics excluded, as timm counts); ``size_bytes``: both files on disk.
    """

    out_dir: Path
    model: str
    architecture: str
    layout: str
    source_format: str
    sha256: str
    dtype: str
    num_classes: Optional[int]
    num_params: int
    size_bytes: int
    warnings: tuple[str, ...] = ()


def pretrained_weights(name: str, *, revision: str = "main", log: Optional[Callable[[str], None]] = None) -> Path:
    """The converted MLX directory of a registered name's Hub weights (``timm/<tag>`` accepted).

    The one route to the Hub for the library and the commands
    (:func:`mlx_evit.loading.hub.pretrained_dir`: downloaded once, cached converted).
    """
    return pretrained_dir(hub_name(name) or name, revision=revision, log=log)


def _warn(loaded: Loaded) -> Loaded:
    for note in loaded.notes:
        warnings.warn(note, stacklevel=3)
    return loaded


def load(
    path: PathLike,
    *,
    dtype: Union[str, mx.Dtype, None] = None,
    fuse: bool = True,
    model: Optional[str] = None,
) -> nn.Module:
    """A ready-to-run model (eval mode, parameters evaluated) from ``path``.

    ``path``: an MLX model directory (written by :func:`convert` or
    :func:`save_model`), any checkpoint :func:`convert` accepts, which is
    then detected and converted in memory, or a registered pretrained name
    (``"efficientvit_b1.r224_in1k"``, also as ``"timm/efficientvit_b1.r224_in1k"``)
    that is not a local path: its timm weights are fetched from the Hugging
    Face Hub and cached converted (:func:`mlx_evit.loading.hub.pretrained_dir`).
    ``dtype``: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (default: the
    directory's dtype, float32 for checkpoints); attention cores run in
    float32 regardless. ``fuse``: fold every BatchNorm into its convolution,
    which makes inference faster and is exact up to rounding; pass
    ``fuse=False`` to fine-tune or save (the unfused model is trainable).
    ``model``: expected registry name, checked against the file. The model
    takes NHWC float32 normalized images and carries ``.arch_name``,
    ``.pretrained_cfg`` (preprocessing; dict or None) and ``.labels`` (class
    names or None).
    """
    target = parse_dtype(dtype)
    net = _warn(open_model(resolve(path), model)).model
    if target is not None:
        cast_model(net, target)
    net.eval()
    if fuse:
        net.fuse()
    mx.eval(net.parameters())
    return net


def load_into(name: str, path: PathLike, num_classes: Optional[int] = None, **overrides: Any) -> nn.Module:
    """Build ``name`` and load the checkpoint or MLX model directory at ``path`` (eval, unfused).

    Used by ``create_model(name, pretrained=path)``. Architecture defaults
    implied by the checkpoint's layout (e.g. the original MIT code's
    attention eps) apply unless overridden; ``num_classes`` defaults to the
    checkpoint's classifier width.
    """
    net = _warn(open_model(path, name, num_classes, overrides)).model
    mx.eval(net.parameters())
    return net


def create_model(
    name: str,
    num_classes: Optional[int] = None,
    pretrained: Union[bool, PathLike, None] = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally with pretrained weights (as ``timm.create_model``).

    ``name``: architecture or tagged name (``efficientvit_b1.r288_in1k``, or
    ``timm/efficientvit_b1.r288_in1k``; the tag selects
    ``model.pretrained_cfg``, the preprocessing). ``num_classes`` and
    ``overrides`` change the architecture arguments. ``pretrained``:
    ``True`` loads the tag's Hub weights (the default tag for a bare
    architecture; downloaded once, cached converted); a path loads a
    checkpoint in any supported layout (MLX directory, timm safetensors,
    PyTorch pickle); ``False``/``None``: random weights. With weights the
    model is returned in eval mode, unfused (trainable), taking NHWC float32
    normalized images and returning logits.
    """
    bare = hub_name(name) or name
    if pretrained is None or pretrained is False:
        return build_model(bare, num_classes=num_classes, **overrides)
    if pretrained is True:
        pretrained = pretrained_weights(bare)
    return load_into(bare, pretrained, num_classes=num_classes, **overrides)


def convert(
    src: PathLike,
    out_dir: PathLike,
    *,
    model: Optional[str] = None,
    dtype: str = "float32",
    force: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> ConversionResult:
    """Convert the checkpoint ``src`` into the MLX model directory ``out_dir``.

    ``src``: PyTorch zip checkpoint (``.pt``/``.pth``/``.bin``),
    ``.safetensors`` file, timm Hub-layout folder, or an MLX model directory
    (re-saved, e.g. in another dtype). ``model``: registry name to verify
    against (default: detected from keys, shapes and timm's config.json; a
    tag selects the preprocessing). ``dtype``: parameter dtype of the output
    (BatchNorm statistics stay float32). ``force``: replace an existing
    ``out_dir``. ``log``: receives progress lines. Raises
    :class:`~mlx_evit.errors.ConversionError`,
    :class:`~mlx_evit.errors.CheckpointError` or
    :class:`~mlx_evit.errors.CheckpointMismatchError` with a message naming
    the problem; nothing is written then.
    """
    target = parse_dtype(dtype)
    out = Path(out_dir)
    checked = check_target(out, force, inputs=[src])  # fail before the expensive part; never over SRC
    source = open_model(src, model, log=log, sha256=True)
    if log:
        log(f"writing {out} ({dtype_name(target)})")
    save_loaded(source, checked, target, force=force)
    net, info = source.model, source.info
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return ConversionResult(
        out_dir=out,
        model=registry_name(net.arch_name, net.pretrained_cfg),
        architecture=net.arch_name,
        layout=source.layout,
        source_format=info.format,
        sha256=info.sha256,
        dtype=dtype_name(target),
        num_classes=net.num_classes,
        num_params=sum(v.size for _, v in tree_flatten(net.trainable_parameters())),
        size_bytes=size,
        warnings=source.notes,
    )
