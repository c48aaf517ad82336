"""Export a model for apps: ``.mlxfn`` functions that C++ and Swift load with MLX, and ``export.json``.

:func:`export_model` writes one folder per model:

* classification: ``model.mlxfn``, preprocessed NHWC float32 images ``(B, H, W, 3)`` -> logits ``(B, classes)``;
* segmentation: ``model.mlxfn``, preprocessed images -> stride-8 logits ``(B, H/8, W/8, classes)``;
* Segment Anything: ``image_encoder.mlxfn``, the padded normalised image ``(1, S, S, 3)`` -> embeddings
  ``(1, 64, 64, 256)``, and one ``prompt_decoder_<N>.mlxfn`` per prompt length N in the convention of
  Meta's ONNX decoder (``segment_anything/utils/onnx.py``): inputs ``image_embeddings``, ``point_coords
  (1, N, 2)`` in the 1024 prompt frame, ``point_labels (1, N)`` (1 fg, 0 bg, 2/3 box corners, -1
  padding), ``mask_input (1, 256, 256, 1)``, ``has_mask_input (1,)``; outputs every mask token before
  any selection: ``masks (1, 4, 256, 256)`` low-resolution logits and ``iou_predictions (1, 4)``
  (index 0 the single-mask output, 1-3 the multimask outputs).

Every input and output is float32 whatever ``dtype`` the model runs in (cast inside). ``export.json``
names each function's inputs and outputs with shapes and dtypes, and every step an app does around them
(:mod:`mlx_evit.tasks.app_spec`). Shapes are fixed: these models cannot be exported shapeless, so each
function serves one input size (and one N).

The export checks itself before the folder appears: a fresh Python process that imports only
``mlx.core`` imports every file and runs it on inputs the library has answered (decoders: several prompt
sets, with and without a box and a mask input, compared as single-mask and multimask outputs); the
largest difference relative to the largest output is written to ``export.json`` (``check``). That process
uses MLX's bundled BLAS, this one may use OpenBLAS (:func:`mlx_evit.blas_info`), so the two agree to
float32 round-off, not bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_evit.api import load
from mlx_evit.models.sam_model import PROMPT_FRAME, SAM_MEAN, SAM_STD, EfficientViTSam
from mlx_evit.models.seg_model import EfficientViTSeg
from mlx_evit.ops.dtypes import DTYPE_NAMES
from mlx_evit.outputs import atomic_directory, check_output_dir
from mlx_evit.tasks import app_spec
from mlx_evit.tasks.inference import QUANT_BITS, prepare
from mlx_evit.tasks.labels import imagenet_labels
from mlx_evit.tasks.transforms import eval_transform
from mlx_evit.tasks.sam_predictor import SamPredictor, preprocess_image, preprocess_shape
from mlx_evit.version import __version__

__all__ = ["ExportError", "export_model", "FAMILIES", "TOLERANCE", "DEFAULT_POINTS", "relative_error"]

FAMILIES = ("classification", "segmentation", "sam")
FORMAT = "mlx_evit-export/1"
DEFAULT_POINTS = (2,)
"""One click (with the padding point) or one box: the two prompts an app needs first."""
TOLERANCE = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 3e-2}
"""The largest ``max|imported - library| / max|library|`` the self-check accepts, by dtype: the fresh
process runs MLX's own BLAS (float32 round-off, grown by the depth of the network; measured 1e-6 to
4e-6 for SAM L0 and Seg B0); half precision rounds those differences to 8-11 bits."""
QUANTIZED_TOLERANCE = 3e-2
MAX_POINTS = 64
LOW_RES = 256  # the decoder's masks: the 64x64 embedding upscaled 4x
CHECK_FILE = "check.safetensors"

ModelLike = Union[nn.Module, str, os.PathLike]
SizeLike = Union[None, int, Sequence[int]]


class ExportError(ValueError):
    """The model, an option or the check of an export failed; the message says which."""


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """``max|got - expected| / max|expected|`` in float64 (0 when both are zero)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        return float("inf")
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    diff = float(np.abs(got - expected).max()) if expected.size else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


@dataclass
class _Function:
    """One exported function: its file, the traced callable, example inputs and output names."""

    name: str
    file: str
    fn: Callable[..., tuple]
    inputs: list[tuple[str, mx.array]]
    outputs: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Check:
    """One check call: inputs by name, the library's answer per output index (or slice of one)."""

    function: str
    inputs: dict[str, np.ndarray]
    expected: list[tuple[int, Optional[slice], np.ndarray]]


def _family(model: nn.Module) -> str:
    if isinstance(model, EfficientViTSam):
        return "sam"
    if isinstance(model, EfficientViTSeg):
        return "segmentation"
    if getattr(model, "num_classes", 0):
        return "classification"
    raise ExportError(f"{getattr(model, 'arch_name', type(model).__name__)} has no classifier "
                      "(num_classes 0): nothing an app could use to export")


def _size(image_size: SizeLike) -> Optional[tuple[int, int]]:
    if image_size is None:
        return None
    sizes = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(sizes) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
        raise ExportError(f"image_size must be a positive integer or (height, width), got {image_size!r}")
    return int(sizes[0]), int(sizes[1])


def _spec(name: str, a: Union[mx.array, np.ndarray]) -> dict[str, Any]:
    return {"name": name, "shape": list(a.shape), "dtype": str(np.dtype(np.array(a).dtype))}


def _class_names(model: nn.Module) -> Optional[list[str]]:
    if getattr(model, "labels", None):
        return list(model.labels)
    return [label.name for label in imagenet_labels()] if model.num_classes == 1000 else None


# ------------------------------------------------------------------------------ families


def _dense(model: nn.Module, family: str, size: Optional[tuple[int, int]], batch: int, dtype: Optional[str],
           quantize: Optional[int], rng: np.random.Generator) -> tuple[list[_Function], list[_Check], dict, dict]:
    """Classification or segmentation: one function, preprocessed images -> logits."""
    cfg = dict(model.pretrained_cfg or {})
    if family == "classification":
        if size is not None:
            cfg["input_size"] = (3, *size)
        try:
            transform = eval_transform(cfg)
        except ValueError as e:
            raise ExportError(f"preprocessing: {e}") from None
        size = transform.size
    elif size is None:
        if not cfg.get("input_size"):
            raise ExportError(f"{model.arch_name} names no input size; pass image_size")
        size = tuple(int(s) for s in cfg["input_size"][1:])
    predictor = prepare(model, dtype=dtype, quantize=quantize, streams=1, compile=False)
    net, net_dtype = predictor.model, predictor.dtype

    def forward(x: mx.array) -> tuple:
        return (net(x.astype(net_dtype)).astype(mx.float32),)

    x = mx.array(rng.standard_normal((batch, *size, 3)).astype(np.float32))
    try:
        expected = np.array(predictor(x))
    except ValueError as e:  # a size the model cannot take fails here, with the model's message
        raise ExportError(f"cannot run {model.arch_name} at {size[0]}x{size[1]}: {e}") from None
    output = "logits"
    fn = _Function("model", "model.mlxfn", forward, [("images", x)], [output])
    describe: dict[str, Any]
    if family == "classification":
        describe = app_spec.classification_steps(cfg, size, transform)
        describe["classes"] = _class_names(model)
    else:
        from mlx_evit.tasks.seg_datasets import get_dataset

        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        describe = app_spec.segmentation_steps(cfg, size, mean, std)
        dataset = cfg.get("dataset") or getattr(model, "dataset", None)
        if dataset:
            data = get_dataset(dataset)
            describe.update(dataset=dataset, classes=list(data.classes), palette=data.palette.tolist())
        describe["output_stride"] = 8
    describe["input_size"] = list(size)
    return [fn], [_Check("model", {"images": np.array(x)}, [(0, None, expected)])], describe, {}


def _sam(model: EfficientViTSam, size: Optional[tuple[int, int]], dtype: Optional[str], points: Sequence[int],
         rng: np.random.Generator) -> tuple[list[_Function], list[_Check], dict, dict]:
    """Segment Anything: the image encoder and one prompt decoder per prompt length."""
    if size is not None:
        if size[0] != size[1]:
            raise ExportError(f"the SAM encoder takes a square input; got image_size {size[0]}x{size[1]}")
        model.image_size = size[0]
    S = model.image_size
    predictor = SamPredictor(model, dtype=dtype, compile=False)
    run_dtype = predictor.dtype
    encoder, prompts, decoder = model.image_encoder, model.prompt_encoder, model.mask_decoder
    dense_pe = predictor._dense_pe  # the constant positional encoding, as the predictor computed it

    def encode(image: mx.array) -> tuple:
        return (encoder(image.astype(run_dtype)).astype(mx.float32),)

    def decode(embeddings, coords, labels, mask_input, has_mask_input) -> tuple:
        sparse = prompts.embed_points(coords, labels, pad=False)
        has = has_mask_input.astype(mx.float32).reshape(1, 1, 1, 1)
        no_mask = prompts.no_mask_embed.weight.astype(mx.float32).reshape(1, 1, 1, -1)
        dense = has * prompts.embed_masks(mask_input) + (1 - has) * no_mask
        low, iou = decoder(embeddings.astype(run_dtype), dense_pe, sparse.astype(run_dtype),
                           dense.astype(run_dtype), None)
        return low.astype(mx.float32), iou.astype(mx.float32)

    # The library's answers on a synthetic photo (not square, so padding and the frame matter).
    h, w = max(1, (3 * S) // 4), S
    ramp = (np.arange(h)[:, None, None] * 100 // h + np.arange(w)[None, :, None] * 100 // w)
    rgb = (rng.integers(0, 156, (h, w, 3)) + ramp).astype(np.uint8)
    _, x = preprocess_image(rgb, S)
    predictor.set_image(rgb)
    features = predictor.get_image_embedding()
    embeddings = np.array(features.astype(mx.float32))
    image = mx.array(x[None])
    functions = [_Function("image_encoder", "image_encoder.mlxfn", encode, [("image", image)],
                           ["image_embeddings"])]
    checks = [_Check("image_encoder", {"image": x[None]}, [(0, None, embeddings)])]
    nh, nw = preprocess_shape(h, w, PROMPT_FRAME)
    low_res = LOW_RES
    for n in points:
        name = f"prompt_decoder_{n}"
        zeros = mx.zeros((1, low_res, low_res, 1))
        example = [("image_embeddings", mx.array(embeddings)), ("point_coords", mx.zeros((1, n, 2))),
                   ("point_labels", mx.zeros((1, n))), ("mask_input", zeros), ("has_mask_input", mx.zeros((1,)))]
        functions.append(_Function(name, f"{name}.mlxfn", decode, example, ["masks", "iou_predictions"],
                                   {"points": n}))
        checks += _decoder_checks(predictor, name, n, embeddings, (nh, nw), low_res, rng)
    describe = app_spec.sam_steps(S, PROMPT_FRAME, SAM_MEAN, SAM_STD, low_res, float(model.mask_threshold))
    describe["input_size"] = [S, S]
    sample = {"image/rgb": rgb, "image/original_size": np.array([h, w], np.int32)}
    return functions, checks, describe, sample


def _decoder_checks(predictor: SamPredictor, name: str, n: int, embeddings: np.ndarray, frame: tuple[int, int],
                    low_res: int, rng: np.random.Generator) -> list[_Check]:
    """Prompt sets of length ``n``: clicks + padding point (no mask, and a mask input), clicks + box."""
    nh, nw = frame
    checks = []

    def clicks(k: int) -> tuple[np.ndarray, np.ndarray]:
        xy = rng.uniform(0, 1, (1, k, 2)) * np.array([nw - 1, nh - 1])
        return xy.astype(np.float32), (np.arange(k) % 2 == 0).astype(np.float32)[None]  # 1, 0, 1, ...

    def add(coords, labels, mask, library_args) -> None:
        points, box, masks = library_args
        expected = []
        for mm, part in ((False, slice(0, 1)), (True, slice(1, 4))):
            low, iou = predictor.decode(points, box, masks, multimask_output=mm)
            expected += [(0, part, np.array(low)), (1, part, np.array(iou))]
        has = np.ones(1, np.float32) if masks is not None else np.zeros(1, np.float32)
        checks.append(_Check(name, {"image_embeddings": embeddings, "point_coords": coords,
                                    "point_labels": labels, "mask_input": mask, "has_mask_input": has}, expected))

    def lib_points(c, l):
        return mx.array(c), mx.array(l.astype(np.int32))

    # 1. n - 1 clicks and the padding point; a random mask_input that has_mask_input = 0 must ignore.
    c, l = clicks(n - 1)
    coords = np.concatenate([c, np.zeros((1, 1, 2), np.float32)], axis=1)
    labels = np.concatenate([l, -np.ones((1, 1), np.float32)], axis=1)
    noise = rng.standard_normal((1, low_res, low_res, 1)).astype(np.float32) * 4
    add(coords, labels, noise, (lib_points(c, l), None, None))
    # 2. the same clicks with a mask input: the single-mask logits of the first call.
    low, _ = predictor.decode(lib_points(c, l), None, None, multimask_output=False)
    mask = np.array(low).reshape(1, low_res, low_res, 1)
    add(coords, labels, mask, (lib_points(c, l), None, mx.array(mask)))
    # 3. n - 2 clicks and a box (corners labelled 2 and 3).
    if n >= 2:
        c, l = clicks(n - 2)
        corners = np.sort(rng.uniform(0, 1, (2, 2)) * np.array([nw - 1, nh - 1]), axis=0).astype(np.float32)
        coords = np.concatenate([c, corners[None]], axis=1)
        labels = np.concatenate([l, np.array([[2, 3]], np.float32)], axis=1)
        box = mx.array(corners.reshape(1, 4))
        add(coords, labels, np.zeros((1, low_res, low_res, 1), np.float32),
            (lib_points(c, l) if n > 2 else None, box, None))
    return checks


# ------------------------------------------------------------------------------ check in a fresh process

_CHECK_SCRIPT = r"""
import json, sys
import mlx.core as mx
folder, inputs_file, outputs_file, plan = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
arrays, results, functions = mx.load(inputs_file), {}, {}
for call, (file, names) in enumerate(plan):
    if file not in functions:
        functions[file] = mx.import_function(folder + "/" + file)
    for i, out in enumerate(functions[file](*[arrays[f"{call}/{name}"] for name in names])):
        results[f"{call}/{i}"] = out
mx.eval(results)
assert not any(m.startswith("mlx_evit") for m in sys.modules), "mlx_evit was imported"
mx.save_safetensors(outputs_file, results)
"""


def _example_arrays(functions: list[_Function], checks: list[_Check]) -> dict[str, mx.array]:
    """``check.safetensors``: each function's first check call, ``<function>/<input or output name>``.

    The outputs are the library's (a decoder's four masks assembled from its single- and multimask
    answers), so an app can test its port of the steps and functions against them.
    """
    arrays: dict[str, mx.array] = {}
    for f in functions:
        check = next(c for c in checks if c.function == f.name)
        for name, value in check.inputs.items():
            arrays[f"{f.name}/{name}"] = mx.array(np.ascontiguousarray(value))
        for index, output in enumerate(f.outputs):
            parts = [expected for i, _, expected in check.expected if i == index]
            arrays[f"{f.name}/{output}"] = mx.array(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
    return arrays


def _check(folder: Path, functions: list[_Function], checks: list[_Check]) -> tuple[dict, dict]:
    """Run every check call in a fresh ``mlx.core``-only process.

    Returns the worst relative error per function and each function's outputs (of its first call).
    """
    files = {f.name: f for f in functions}
    with tempfile.TemporaryDirectory(prefix="mlx_evit_check_") as tmp:
        arrays, plan = {}, []
        for call, check in enumerate(checks):
            names = [name for name, _ in files[check.function].inputs]
            plan.append((files[check.function].file, names))
            arrays.update({f"{call}/{k}": mx.array(np.ascontiguousarray(v)) for k, v in check.inputs.items()})
        mx.save_safetensors(os.path.join(tmp, "inputs.safetensors"), arrays)
        out = os.path.join(tmp, "outputs.safetensors")
        proc = subprocess.run([sys.executable, "-I", "-c", _CHECK_SCRIPT, str(folder),
                               os.path.join(tmp, "inputs.safetensors"), out, json.dumps(plan)],
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit status {proc.returncode}"
            raise ExportError(f"the exported functions could not be run in a fresh process: {tail}")
        results = {k: np.array(v) for k, v in mx.load(out).items()}
    errors: dict[str, float] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    for call, check in enumerate(checks):
        n = len(files[check.function].outputs)
        outputs.setdefault(check.function, [results[f"{call}/{i}"] for i in range(n)])
        for index, part, expected in check.expected:
            got = results[f"{call}/{index}"]
            got = got[:, part] if part is not None else got
            errors[check.function] = max(errors.get(check.function, 0.0), relative_error(got, expected))
    return errors, outputs


# ------------------------------------------------------------------------------ entry point


def _dumps(value: Any, indent: str = "") -> str:
    """JSON with one key per line, lists of numbers or strings kept on one line (shapes, mean, classes)."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


def export_model(
    model_or_name: ModelLike,
    out_dir: Union[str, os.PathLike],
    *,
    image_size: SizeLike = None,
    batch_size: int = 1,
    dtype: str = "float32",
    quantize: Optional[int] = None,
    points: Optional[Sequence[int]] = None,
    force: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> Path:
    """Export ``model_or_name`` (a model, registered name, Hub tag or model folder) to ``out_dir``.

    ``image_size``: the input size (int or ``(H, W)``; SAM: the encoder's S; default: the model's).
    ``batch_size``: images per call (classification, segmentation; SAM takes one image).
    ``dtype``: what the model computes in (``float32``, ``float16``, ``bfloat16``); inputs and outputs
    stay float32. ``quantize``: 4 or 8-bit ``nn.Linear`` weights (classification, segmentation).
    ``points``: SAM prompt lengths N, one decoder each (default :data:`DEFAULT_POINTS`). ``force``: replace an existing export folder.
    A model object is prepared in place (BatchNorms folded, cast, quantized). The folder is written
    atomically, after the self-check passed; returns its path. Raises :class:`ExportError` (and
    :class:`mlx_evit.outputs.OutputError` for the folder).
    """
    if dtype not in DTYPE_NAMES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANT_BITS:
        raise ExportError(f"quantize must be one of {QUANT_BITS} bits, got {quantize!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExportError(f"batch_size must be a positive integer, got {batch_size!r}")
    given_points, points = points is not None, tuple(DEFAULT_POINTS if points is None else points)
    if not points or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_POINTS for n in points):
        raise ExportError(f"points must be prompt lengths between 1 and {MAX_POINTS}, got {points!r}")
    size = _size(image_size)
    source = None if isinstance(model_or_name, nn.Module) else os.fspath(model_or_name)
    inputs = [source] if source is not None and os.path.exists(source) else []
    target = check_output_dir(out_dir, inputs, force, marker="export.json", describe="an mlx_evit export folder")
    say = log or (lambda message: None)
    if isinstance(model_or_name, nn.Module):
        model = model_or_name
    else:
        say(f"loading {source}")
        try:
            model = load(source, fuse=False)
        except (OSError, ValueError, KeyError) as e:
            raise ExportError(f"cannot load {source}: {' '.join(str(e).split())}") from None
    model.eval()
    family = _family(model)
    rng = np.random.default_rng(0)
    if family == "sam":
        if quantize is not None:
            raise ExportError("quantize applies to classification and segmentation models, not SAM")
        if batch_size != 1:
            raise ExportError("the SAM export takes one image per call; batch_size must be 1")
        functions, checks, describe, sample = _sam(model, size, dtype, sorted(set(points)), rng)
    else:
        if given_points:
            raise ExportError("points applies to Segment Anything models only")
        functions, checks, describe, sample = _dense(model, family, size, batch_size, dtype, quantize, rng)
    name = getattr(model, "arch_name", type(model).__name__)
    tolerance = QUANTIZED_TOLERANCE if quantize else TOLERANCE[dtype]
    with atomic_directory(target) as tmp:
        for f in functions:
            say(f"tracing {f.name}")
            metadata = json.dumps({"format": FORMAT, "model": name, "function": f.name, "see": "export.json",
                                   "inputs": [n for n, _ in f.inputs], "outputs": f.outputs})
            try:
                mx.export_function(str(tmp / f.file), f.fn, *[a for _, a in f.inputs], metadata=metadata)
            except ValueError as e:
                raise ExportError(f"cannot export {f.name}: {e}") from None
        say("checking the files in a fresh process")
        errors, outputs = _check(tmp, functions, checks)
        bad = {k: v for k, v in errors.items() if not v <= tolerance}
        if bad:
            worst = ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
            raise ExportError(f"the exported functions do not reproduce the library (relative error {worst}; "
                              f"tolerance {tolerance:g}); nothing was written")
        spec = {
            "format": FORMAT,
            "mlx_version": mx.__version__,
            "mlx_evit_version": __version__,
            "model": name,
            "family": family,
            "dtype": dtype,
            "quantize": quantize,
            "functions": {
                f.name: {"file": f.file, **f.extra,
                         "inputs": [_spec(n, a) for n, a in f.inputs],
                         "outputs": [_spec(n, o) for n, o in zip(f.outputs, outputs[f.name])]}
                for f in functions
            },
            **describe,
            "check": {"max_relative_error": errors, "tolerance": tolerance,
                      "how": "each file imported in a fresh process with only mlx.core, run on inputs the "
                             "library answered; max|exported - library| / max|library|"},
        }
        examples = _example_arrays(functions, checks)
        examples.update({k: mx.array(v) for k, v in sample.items()})
        mx.save_safetensors(str(tmp / CHECK_FILE), examples)
        spec["check"]["examples"] = {
            "file": CHECK_FILE,
            "text": "arrays '<function>/<input or output name>': one call of each function and the library's "
                    "answer, for testing an app's port (mlx-swift: loadArrays(url:))"
                    + ("; 'image/rgb' is the uint8 image the image_encoder/image input was made from, "
                       "'image/original_size' its (h, w)" if sample else ""),
            "arrays": {k: list(v.shape) for k, v in examples.items()},
        }
        (tmp / "export.json").write_text(_dumps(spec) + "\n", encoding="utf-8")
    return target.path
