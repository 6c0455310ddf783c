import pytest

from qdcompile import QuantRecipe


@pytest.mark.parametrize("name,wb,ab", [("w8a8", 8, 8), ("w4a8", 4, 8), ("w4a4", 4, 4)])
def test_presets(name, wb, ab):
    r = QuantRecipe.preset(name)
    assert (r.name, r.weight_bits, r.act_bits) == (name, wb, ab)
    assert QuantRecipe.from_json(r.to_json()) == r
    if wb == 4:
        assert "conv_in" in r.keep_8bit and "conv_out" in r.keep_8bit


def test_recipe_is_frozen_and_validated():
    r = QuantRecipe.w8a8()
    with pytest.raises(Exception):
        r.weight_bits = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="weight_bits must be 4 or 8"):
        QuantRecipe(weight_bits=3)
    with pytest.raises(ValueError, match="act_observer"):
        QuantRecipe(act_observer="histogram")
    with pytest.raises(ValueError, match="unknown recipe"):
        QuantRecipe.preset("w2a2")
    with pytest.raises(ValueError, match="unknown fields"):
        QuantRecipe.from_dict({**r.to_dict(), "future_knob": 1})
    with pytest.raises(ValueError, match="version"):
        QuantRecipe.from_dict({**r.to_dict(), "version": 99})
