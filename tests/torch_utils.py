"""Helpers for parity tests against PyTorch / timm (tests only; the package never imports torch)."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give ``model`` random weights with non-trivial BatchNorm statistics, in place.

    Convolution/linear weights keep their (random) default init; every norm
    layer gets random affine parameters and running statistics, and any
    other float parameter or buffer (e.g. attention biases) gets random
    values, so a port that ignores any of them cannot match.
    """
    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norm_types):
                if getattr(module, "weight", None) is not None:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.2)
                if getattr(module, "running_mean", None) is not None:
                    module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.2)
                    module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if "attention_biases" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias") and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """``model.state_dict()`` as numpy arrays (keys unchanged)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def torch_forward(model: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    """Run ``model`` (eval, float32) on an NHWC numpy batch; returns numpy."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        return model(x).numpy()
