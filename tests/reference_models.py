"""timm reference models for the classification tests (tests only; imports torch and timm).

Random weights alone give near-uniform probabilities, nearly the same for
every image, where the top-5 order is decided by noise.
:func:`peaked_timm_model` calibrates the BatchNorms on the sample photos and
scales the classifier, so that each photo gets its own top classes, well
apart: comparing top-5 indices is then a real test of the whole pipeline,
preprocessing included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from torch_utils import randomize_

PHOTOS_DIR = Path(__file__).resolve().parent / "data" / "images"
PHOTOS = sorted(p for p in PHOTOS_DIR.iterdir() if p.suffix in (".png", ".jpg"))


def timm_batch(model: torch.nn.Module, photos=PHOTOS) -> torch.Tensor:
    """Photos through timm's own loader and eval transform for the model's pretrained cfg (NCHW)."""
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])


def peaked_timm_model(name: str, seed: int, num_classes: int | None = None) -> torch.nn.Module:
    """``timm.create_model(name)`` with random weights, data-calibrated BatchNorms, scaled head (eval mode).

    With random running statistics, activations fade layer after layer and
    the pooled features hardly depend on the image (relative spread ~1e-6 for
    the B series), so the prediction would not test the preprocessing. The
    BatchNorm statistics are therefore measured on the photos (one
    train-mode pass, cumulative averages; affine parameters stay random),
    and the classifier is scaled so the logits' standard deviation is 3:
    each photo then gets its own, well separated top classes.
    """
    import timm

    torch.manual_seed(seed)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = randomize_(timm.create_model(name, pretrained=False, **kwargs), seed)
    batch = timm_batch(model)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative: the statistics of this one batch
    head = model.get_submodule(model.pretrained_cfg["classifier"])
    with torch.no_grad():
        model.train()(batch)
        scale = 3.0 / float(model.eval()(batch).std())
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    return model.eval()


def timm_probs(model: torch.nn.Module, photos=PHOTOS) -> np.ndarray:
    """Softmax probabilities timm's pipeline gives for ``photos``: ``(len(photos), num_classes)``."""
    with torch.no_grad():
        return torch.softmax(model(timm_batch(model, photos)), dim=-1).numpy()


def save_timm_folder(model: torch.nn.Module, folder: Path) -> Path:
    """The model in timm's Hugging Face Hub layout: ``model.safetensors`` + ``config.json``."""
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(folder), safe_serialization=True)
    return folder
