"""Our implementation of the fixture weight generator against the fixtures' checksum table."""
import json
import zlib

import numpy as np
import pytest

import synthetic

CHECKSUMS = json.loads((synthetic.FIXTURES / "checksums.json").read_text())


def _value(row):
    shape = row["shape"]
    if row["role"] == "synthetic_normal":
        return synthetic.synthetic_normal(row["key"], shape)
    if row["role"] == "synthetic_image":
        return synthetic.synthetic_image(row["key"], *shape[:2])
    return synthetic.tensor(row["key"], shape)


@pytest.mark.parametrize("row", CHECKSUMS, ids=[r["role"] + ":" + r["key"] for r in CHECKSUMS])
def test_generator_matches_checksum_table(row):
    value = _value(row)
    assert list(value.shape) == row["shape"]
    assert str(value.dtype) == row["dtype"]
    if row["role"] not in ("synthetic_normal", "synthetic_image"):
        assert synthetic.role_of(row["key"], row["shape"]) == row["role"]
    assert zlib.crc32(row["key"].encode()) == row["crc32_seed"]
    if row["level_sum"] is not None:
        n = int(np.prod(row["shape"]))
        assert int((synthetic.words(row["key"], n) >> np.uint64(60)).sum()) == row["level_sum"]
    assert float(value.astype(np.float64).sum()) == pytest.approx(row["sum_f64"], rel=1e-12, abs=1e-12)
    first = [float(v) for v in row["first3"]]
    np.testing.assert_array_equal(value.reshape(-1)[: len(first)].astype(np.float64), first)
    assert synthetic.crc32(value) == row["crc32_le_bytes"]


def test_readme_test_vector_words():
    w = synthetic.words("backbone.input_stem.op_list.0.conv.weight", 3)
    assert [int(v) for v in w] == [0x702E36E73EDA74F3, 0x230B4B4CF7815182, 0x64124845D5AEBDF7]


def test_unknown_role_is_an_error():
    with pytest.raises(ValueError, match="no synthetic rule"):
        synthetic.tensor("some.module.scale", (4,))


def test_fixture_inputs_match_their_stored_checksums():
    ref = synthetic.fixture("mit_b0_cls")
    x = synthetic.synthetic_normal("input/mit_b0_cls/x224", (2, 3, 224, 224))
    assert synthetic.crc32(x) == int(ref["x224_input_crc32"])
    sam = synthetic.fixture("sam_l0_predictor_480x640")
    img = synthetic.synthetic_image("input/sam_l0_predictor_480x640/image", 480, 640)
    assert synthetic.crc32(img) == int(sam["image_crc32"])
