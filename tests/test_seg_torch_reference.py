"""The benchmark's PyTorch EfficientViT-Seg (benchmarks/torch_seg.py) equals the original code's fixtures.

So the speed comparison in benchmarks/seg_bench.py runs the same computation on both sides.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import synthetic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_seg  # noqa: E402


@pytest.mark.parity
@pytest.mark.parametrize("fixture,name,shape", [
    ("seg_b0_city_128x128", "efficientvit_seg_b0_cityscapes", (1, 3, 128, 128)),
    ("seg_b1_ade_256x320", "efficientvit_seg_b1_ade20k", (1, 3, 256, 320)),
])
def test_torch_reference_reproduces_the_fixtures(fixture, name, shape):
    keys = synthetic.all_shapes()[name.replace("_", "-")]
    model = torch_seg.build(name).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in synthetic.state_dict(keys).items()}, strict=True)
    ref = synthetic.fixture(fixture)
    x = torch.from_numpy(synthetic.synthetic_normal(f"input/{fixture}/x", shape))
    with torch.no_grad():
        logits = model(x).numpy()
    assert np.abs(logits - ref["logits"]).max() <= 1e-5 * np.abs(ref["logits"]).max()


def test_every_variant_has_the_original_keys():
    shapes = synthetic.all_shapes()
    for name in torch_seg.CONFIGS:
        want = {k: tuple(s) for k, (s, _) in shapes[name.replace("_", "-")].items()}
        got = {k: tuple(v.shape) for k, v in torch_seg.build(name).state_dict().items()}
        assert got == want, name
