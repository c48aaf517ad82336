"""The model-folder config check (mlx_evit.loading.arch_schema) and the message-name helper (errors.short_name)."""

from __future__ import annotations

import json

import pytest

from mlx_evit.errors import ModelConfigError, short_name
from mlx_evit.loading.arch_schema import check_arch_args, check_model_config, check_pretrained_cfg
from mlx_evit.loading.model_dir import save_model
from mlx_evit.loading.pipeline import open_model
from mlx_evit.models.registry import build_model, list_models, get_entry


def _json(value):
    return json.loads(json.dumps(value))


@pytest.mark.parametrize("arch", list_models())
def test_every_registered_architecture_passes(arch):
    """The schema never refuses what the registry itself builds (its defaults and its tags' preprocessing)."""
    entry = get_entry(arch)
    check_arch_args(arch, _json(entry.defaults), "config.json")
    for cfg in entry.tags:
        check_pretrained_cfg(arch, _json(cfg.to_dict()), "config.json")


@pytest.fixture(scope="module")
def b0_dir(tmp_path_factory):
    return save_model(build_model("efficientvit_b0", num_classes=10), tmp_path_factory.mktemp("b0") / "m")


@pytest.mark.parametrize("change, message", [
    ({"depths": [64, 64, 64, 64, 64]}, "blocks but the weights file holds only"),  # in range, but not in the file
    ({"widths": [8, 16, 32, 64, 4096]}, "larger than every dimension"),
    ({"num_classes": 100000}, "larger than every dimension"),
    ({"depths": [1, 2, 3]}, "has 3 entries"),
    ({"act": "tanh"}, "is not one of"),
    ({"large": 1}, "must be true or false"),
    ({"expand_ratio": 0}, "out of range"),
    ({"nope": 1}, "arch_args.nope is not an argument of efficientvit_b0"),
    ({"a\nb": 1}, "arch_args.'a\\nb'"),
])
def test_folder_refused_before_building(b0_dir, change, message):
    config = json.loads((b0_dir / "config.json").read_text())
    config["arch_args"].update(change)
    with pytest.raises(ModelConfigError, match=None) as err:
        check_model_config(b0_dir / "config.json", config, b0_dir / "model.safetensors")
    text = str(err.value)
    assert message in text and str(b0_dir / "config.json") in text and "\n" not in text


def test_intact_folder_loads(b0_dir):
    assert open_model(b0_dir).model.num_classes == 10


def test_short_name_escapes_and_shortens():
    assert short_name("a\nb") == "'a\\nb'"
    long = short_name("k" * 20_000_000 + "\n")
    assert len(long) < 120 and "\n" not in long and "20000001 chars" in long
    assert short_name("archive/data.pkl", bare=True) == "archive/data.pkl"
    assert short_name("a b", bare=True) == "'a b'"
