"""The timm-like public API: ``create_model(name, pretrained=True)``, ``timm/<tag>`` names, and the
README's Python API block executed verbatim, in order.

Hub weights come from the local fake Hub (tests/fake_hub.py on 127.0.0.1):
downloaded and converted once into ``$MLX_EVIT_CACHE``, then read offline.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mlx_evit
from fake_hub import FakeHub
from mlx_evit.loading.hub import CACHE_ENV
from mlx_evit.loading.pipeline import pretrained_dir
from mlx.utils import tree_flatten
from reference_models import save_timm_folder

torch.set_num_threads(2)

README = Path(__file__).resolve().parents[1] / "README.md"
B0, B1 = "efficientvit_b0.r224_in1k", "efficientvit_b1.r224_in1k"


def _timm(name: str, seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).eval()


def _files(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}


def _flat(model) -> np.ndarray:
    return np.concatenate([np.asarray(v).ravel() for _, v in tree_flatten(model.parameters())])


@pytest.fixture
def cached_hub(monkeypatch, tmp_path):
    """Publish B0 and B1 on a local Hub, cache their conversions, then go offline (returns the commits)."""
    from huggingface_hub import constants

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mlx"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub = FakeHub().start()
    try:
        dirs = {}
        for name, seed in ((B0, 1), (B1, 2)):
            arch = name.partition(".")[0]
            hub.publish(f"timm/{name}", _files(save_timm_folder(_timm(arch, seed), tmp_path / name)))
            dirs[name] = pretrained_dir(name, endpoint=hub.endpoint)
    finally:
        hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return dirs


def test_create_model_pretrained_true_and_timm_names(cached_hub):
    expected = _flat(mlx_evit.load(cached_hub[B0], fuse=False))
    for name in (B0, f"timm/{B0}", "efficientvit_b0"):  # a bare architecture means its default tag
        model = mlx_evit.create_model(name, pretrained=True)
        assert model.arch_name == "efficientvit_b0" and not model.training
        assert model.pretrained_cfg["tag"] == "r224_in1k"
        np.testing.assert_array_equal(_flat(model), expected)  # unfused, as timm returns it
    np.testing.assert_array_equal(_flat(mlx_evit.load(f"timm/{B0}", fuse=False)), expected)
    random = mlx_evit.create_model(B0, pretrained=False)
    assert not np.array_equal(_flat(random), expected)
    with pytest.raises(ValueError, match="unknown model"):
        mlx_evit.create_model("timm/efficientvit_b9", pretrained=True)


def _readme_python_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_block_runs_verbatim(cached_hub, tmp_path, monkeypatch):
    """The files the block names are made first (``out``, ``b2.safetensors``, ``b0.pt``), then it runs as is."""
    monkeypatch.chdir(tmp_path)
    mlx_evit.convert(cached_hub[B0], "out")
    save_file({k: v.contiguous() for k, v in _timm("efficientvit_b2", 3).state_dict().items()}, "b2.safetensors")
    torch.save(_timm("efficientvit_b0", 4).state_dict(), "b0.pt")
    namespace: dict = {}
    exec(compile(_readme_python_block(), str(README), "exec"), namespace)
    assert namespace["logits"].shape == (1, 1000)
    assert [tuple(f.shape)[-1] for f in namespace["feats"]][-1] == 384  # B2's last stage
    assert Path("b0-mlx/config.json").is_file() and Path("my_model/config.json").is_file()
    saved = mlx_evit.load("my_model")
    assert saved.labels == ["cat", "dog"] and saved.num_classes == 2
