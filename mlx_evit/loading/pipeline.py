"""The one loading pipe: a source in, a ready model (and a report) out, top to bottom once.

1. **resolve** the source: a local path (checkpoint file, timm Hub folder,
   MLX model folder), or a registered name that is not a local path, whose
   Hub weights :func:`pretrained_dir` fetches (:mod:`.hub` only locates and
   downloads; this module converts and writes the cache);
2. **read** tensors: :func:`~.checkpoint.read_checkpoint` (PyTorch zip,
   safetensors) or, for an MLX model folder, its validated ``config.json``
   (:func:`~.model_dir.read_config`) and its weights;
3. **identify** the architecture and key layout: :func:`~.identify.identify`,
   a pure function of key names and shapes (or :func:`~.identify.verify` of a
   requested name);
4. **build** the model (:func:`~mlx_evit.models.registry.build_model`);
5. **map** keys (:func:`~mlx_evit.models.keymap.map_state_dict`) and let the
   family's ``adapt_checkpoint`` hook fit them;
6. **strict load** (:func:`~mlx_evit.models.keymap.load_params`);
7. **metadata**: tag, preprocessing and class names (timm's config.json or
   ours).

What the hook and the pipe have to say comes back as data
(:attr:`Loaded.notes`); :mod:`mlx_evit.api` turns it into Python warnings,
the commands print it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_evit.errors import ConversionError, HubError, mismatch_parts, one_line
from mlx_evit.loading import hub, identify as ident
from mlx_evit.loading.checkpoint import CheckpointInfo, read_checkpoint
from mlx_evit.loading.model_dir import WEIGHTS_NAME, ModelDirConfig, mlx_config_path, read_config, save_model
from mlx_evit.outputs import OutputDir
from mlx_evit.models.keymap import adapt_params, fit_report, load_params, map_state_dict
from mlx_evit.models.metadata import set_model_info
from mlx_evit.models.registry import PREPROCESSING_KEYS, build_model, get_entry, registry_name, split_name
from mlx_evit.ops.dtypes import cast_model

__all__ = ["Loaded", "registry_name", "hub_name", "resolve", "open_model", "save_loaded", "pretrained_dir"]

PathLike = Union[str, os.PathLike]
Log = Optional[Callable[[str], None]]
_HUB_PREFIX = "timm/"


@dataclass(frozen=True)
class Loaded:
    """A source turned into an unfused model (eval mode), with what ``config.json`` of a conversion records.

    ``layout``: the key layout read (``"mlx"`` for a model folder);
    ``notes``: what the load has to report (resized tables, folded heads).
    """

    model: nn.Module
    layout: str
    info: CheckpointInfo
    labels: Optional[list[str]] = None
    notes: tuple[str, ...] = field(default=())


def hub_name(name: Any) -> Optional[str]:
    """The registered name ``name`` stands for (``timm/<tag>`` accepted), or None if it is not one."""
    if not isinstance(name, str):
        return None
    bare = name[len(_HUB_PREFIX):] if name.startswith(_HUB_PREFIX) else name
    try:
        get_entry(bare)
    except ValueError:
        return None
    return bare


# ---------------------------------------------------------------- 1. resolve


def resolve(source: PathLike, *, revision: str = "main", log: Log = None) -> PathLike:
    """``source`` itself when it is a local path (or no model name), else its cached Hub weights."""
    if not isinstance(source, str) or os.path.exists(source) or hub_name(source) is None:
        return source  # a local path, or not a model name either: the reader reports the missing file
    return pretrained_dir(hub_name(source), revision=revision, log=log)


def pretrained_dir(name: str, *, revision: str = hub.DEFAULT_REVISION, cache_dir: Optional[os.PathLike] = None,
                   endpoint: Optional[str] = None, offline: bool = False, log: Log = None) -> Path:
    """The converted MLX model folder of a registered tag's Hub weights (downloaded and converted once).

    :func:`.hub.locate` finds our converted copy or downloads the upstream
    files; this function converts them into the cache and records the commit.
    Raises :class:`~mlx_evit.errors.HubError` (offline with nothing cached,
    unknown repository or file, failed download or conversion) and
    ``ValueError`` for an unknown name.
    """
    spot = hub.locate(hub_name(name) or name, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                      offline=offline)
    if spot.converted is None:
        if log is not None:
            log(f"converting {spot.repo_id}@{spot.commit[:12]} to MLX in {spot.target}")
        try:
            save_loaded(open_model(spot.files, spot.name, sha256=True), spot.target)
        except Exception as e:
            if not hub.is_converted(spot.target):  # else another process finished the same conversion first
                raise HubError(f"cannot convert {spot.files} for {spot.name}: {one_line(e)}") from None
    hub.record(spot)
    return spot.target


# ---------------------------------------------------------------- 2-7. read, identify, build, map, load, metadata


def open_model(source: PathLike, name: Optional[str] = None, num_classes: Optional[int] = None,
               overrides: Optional[Mapping[str, Any]] = None, *, sha256: bool = False, log: Log = None) -> Loaded:
    """The unfused model (eval mode) of a local checkpoint or MLX model folder, with its provenance.

    ``name``: registry name to verify against (default: identified from the
    keys). ``num_classes``/``overrides``: architecture arguments (default:
    the checkpoint's classifier width, the layout's defaults). ``sha256``:
    hash the weights file (conversion records it).
    """
    config_path = mlx_config_path(source)
    if config_path is not None:
        return _open_model_dir(config_path, name, num_classes, overrides, sha256)
    return _open_checkpoint(source, name, num_classes, overrides, sha256, log)


def _open_model_dir(config_path: Path, name: Optional[str], num_classes: Optional[int],
                    overrides: Optional[Mapping[str, Any]], sha256: bool) -> Loaded:
    config: ModelDirConfig = read_config(config_path)
    if name is not None and split_name(name)[0] != config.architecture:
        raise ConversionError(f"{config_path.parent} holds {config.architecture}, not {split_name(name)[0]}")
    args = dict(config.arch_args)
    args.update(overrides or {})
    if num_classes is not None:
        args["num_classes"] = num_classes
    try:
        model = build_model(config.architecture, **args)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{config_path}: arch_args do not build {config.architecture}: {one_line(e, 200)}") \
            from None
    cast_model(model, config.dtype)
    weights = config_path.parent / WEIGHTS_NAME
    tensors, info = read_checkpoint(weights, sha256=sha256)
    params, notes = adapt_params(model, dict(tensors))  # already MLX paths and layouts
    load_params(model, params, source=str(weights), adapted=True)
    set_model_info(model, pretrained_cfg=config.pretrained_cfg, labels=config.labels)
    model.eval()
    return Loaded(model, "mlx", info, model.labels, notes)


def _open_checkpoint(path: PathLike, name: Optional[str], num_classes: Optional[int],
                     overrides: Optional[Mapping[str, Any]], sha256: bool, log: Log) -> Loaded:
    tensors, info = read_checkpoint(path, sha256=sha256)
    if info.metadata.get("format") == "mlx":
        raise ConversionError(f"{info.path}: MLX weights without the config.json of an MLX model directory; "
                              "load the directory that save_model/convert wrote")
    if log:
        log(f"read {len(tensors)} tensors ({info.format}) from {info.path}")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if name is not None:  # verify the requested model: its layout, then the strict check below
        arch, tag = split_name(name)
        layout = ident.verify(name, shapes, source=info.path)
        found = ident.match(arch, shapes, layout) if num_classes is None else None
    else:
        found = ident.identify_checkpoint(shapes, info.config, source=info.path, config_path=info.config_path)
        arch, tag, layout = found.arch, None, found.layout
    if num_classes is None and found is not None:
        num_classes = found.num_classes
    args = {k: v for k, v in layout.defaults.items() if k not in (overrides or {})}
    args.update(overrides or {})
    model = build_model(arch, num_classes=num_classes, **args)
    params, origin = map_state_dict(model, tensors, layout)
    params, notes = adapt_params(model, params)
    missing, unexpected, mismatched = fit_report(model, params, origin)
    if missing or unexpected or mismatched:
        parts = [f"{layout.name} layout", *mismatch_parts(missing, unexpected, mismatched)]
        raise ConversionError(f"{info.path} does not fit {arch} ({', '.join(parts)})"
                              f"{ident.looks_like(shapes, arch)}")
    load_params(model, params, origin=origin, source=str(path), layout=layout.name, adapted=True)
    tag = tag or ident.config_tag(info.config, arch)
    cfg = get_entry(arch).cfg(tag)
    set_model_info(model, pretrained_cfg=cfg.to_dict() if cfg is not None else None)
    labels = _timm_config(model, info, tagged=tag is not None) if info.config else None
    if model.pretrained_cfg is not None:
        set_model_info(model, pretrained_cfg=dict(model.pretrained_cfg, num_classes=model.num_classes))
    set_model_info(model, labels=labels)
    model.eval()
    if log:
        log(f"model {registry_name(arch, model.pretrained_cfg)} ({layout.name} layout, {model.num_classes} classes)")
    return Loaded(model, layout.name, info, labels, notes)


def _timm_config(model: nn.Module, info: CheckpointInfo, tagged: bool) -> Optional[list[str]]:
    """Take preprocessing (for a tag the registry lacks) and label names from timm's config.json."""
    config = info.config or {}
    cfg = config.get("pretrained_cfg")
    own = model.pretrained_cfg
    if isinstance(cfg, dict) and not tagged and own is not None and isinstance(cfg.get("tag"), str):
        updated = dict(own, tag=cfg["tag"], hf_hub_id=None)
        for key in PREPROCESSING_KEYS:
            if key in cfg and isinstance(cfg[key], (list, float, int, str)):
                updated[key] = cfg[key]
        set_model_info(model, pretrained_cfg=updated)
    labels = config.get("label_names")  # a list, or {"0": name, ...} (timm allows both)
    n = model.num_classes or 0
    if isinstance(labels, dict) and set(labels) == {str(i) for i in range(n)}:
        labels = [labels[str(i)] for i in range(n)]
    if isinstance(labels, list) and len(labels) == n and all(isinstance(s, str) for s in labels):
        return labels
    return None


# ---------------------------------------------------------------- writing a conversion


def save_loaded(loaded: Loaded, out_dir: Union[PathLike, OutputDir], dtype: Union[str, mx.Dtype] = "float32",
                force: bool = False) -> Path:
    """Write a converted :class:`Loaded` in ``dtype``, recording where it came from.

    ``config.json`` gets ``source``: the file name, its SHA-256 (computed
    when the checkpoint was read for conversion), format, layout and the
    wrapper key the state dict sat under.
    """
    info = loaded.info
    record = {
        "file": os.path.basename(info.path),
        "sha256": info.sha256,
        "format": "mlx" if loaded.layout == "mlx" else info.format,
        "layout": loaded.layout,
    }
    if info.wrapper:
        record["wrapper"] = info.wrapper
    cast_model(loaded.model, dtype)
    return save_model(loaded.model, out_dir, labels=loaded.labels, source=record, force=force)
