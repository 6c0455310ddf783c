"""Metadata file: round trip, atomic writes, and a clear error for every kind of bad input."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import qdcompile
from qdcompile import MetadataError, QuantRecipe
from tiny_models import scheduler, tiny_unet2d, tiny_unet2d_condition


@pytest.fixture(scope="module")
def calibrated():
    unet = tiny_unet2d(seed=1)
    meta = qdcompile.calibrate(unet, scheduler(), QuantRecipe.w8a8(), num_samples=2, num_inference_steps=4,
                               progress=False, attach=False)
    return unet, meta


def test_round_trip(calibrated, tmp_path):
    unet, meta = calibrated
    path = meta.save(tmp_path / "tiny.w8a8.qdiff")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.w8a8.qdiff"]  # no temporary left behind
    back = qdcompile.load_metadata(path)
    assert back.recipe == meta.recipe
    assert back.model == meta.model
    assert back.fallbacks == meta.fallbacks
    assert list(back.layers) == list(meta.layers)
    assert "down_blocks.0.resnets.0.conv1" in back.layers
    for name, rec in meta.layers.items():
        got = back.layers[name]
        assert torch.equal(got.weight_q, rec.weight_q) and got.weight_q.dtype == torch.int8
        assert torch.equal(got.weight_scale, rec.weight_scale)
        assert (got.weight_bits, got.act_bits, got.act_scale, got.act_zero_point) == \
               (rec.weight_bits, rec.act_bits, rec.act_scale, rec.act_zero_point)
        assert got.split is None
    qdcompile.attach(unet, back)  # the file fits the model it came from


def test_records_follow_methods_quantizers(calibrated):
    unet, meta = calibrated
    modules = dict(unet.named_modules())
    for name, rec in meta.layers.items():
        w = modules[name].weight.detach()
        s = w.reshape(w.shape[0], -1).abs().amax(1) / 127
        assert torch.allclose(rec.weight_scale, torch.where(s > 0, s, torch.ones_like(s)))
        assert int(rec.weight_q.abs().max()) <= 127
        lo, hi = min(rec.act_range[0], 0.0), max(rec.act_range[1], 0.0)
        assert rec.act_scale == pytest.approx((hi - lo) / 255, rel=1e-6)
        assert rec.act_zero_point == round(-lo / rec.act_scale)


def test_interrupted_save_keeps_old_file(calibrated, tmp_path, monkeypatch):
    _, meta = calibrated
    path = meta.save(tmp_path / "m.qdiff")
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        meta.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.qdiff"]


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qdcompile.load_metadata(tmp_path / "nope.qdiff")
    junk = tmp_path / "junk.qdiff"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(MetadataError, match="not a readable qdcompile metadata file"):
        qdcompile.load_metadata(junk)
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.randn(3)}, str(other))
    with pytest.raises(MetadataError, match="not a qdcompile metadata file"):
        qdcompile.load_metadata(other)


def _rewrite(path, tmp_path, header_fn=None, meta_fn=None, drop=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    header = json.loads(meta["header"])
    if header_fn:
        header_fn(header)
    if meta_fn:
        meta_fn(meta)
    for k in drop or ():
        tensors.pop(k)
    meta["header"] = json.dumps(header)
    out = tmp_path / "edited.qdiff"
    save_file(tensors, str(out), metadata=meta)
    return out


def test_version_and_corrupt_header(calibrated, tmp_path):
    _, meta = calibrated
    path = meta.save(tmp_path / "m.qdiff")
    newer = _rewrite(path, tmp_path, meta_fn=lambda m: m.update(format_version="99"))
    with pytest.raises(MetadataError, match="format version '99'.*upgrade qdcompile"):
        qdcompile.load_metadata(newer)
    broken = _rewrite(path, tmp_path, header_fn=lambda h: h.pop("recipe"))
    with pytest.raises(MetadataError, match="corrupt metadata header"):
        qdcompile.load_metadata(broken)
    name = "down_blocks.0.resnets.0.conv1"
    missing = _rewrite(path, tmp_path, drop=[f"{name}.weight_q"])
    with pytest.raises(MetadataError, match=f"layer '{name}': tensor '{name}.weight_q' is missing"):
        qdcompile.load_metadata(missing)
    bad_zp = _rewrite(path, tmp_path, header_fn=lambda h: h["layers"][name].update(act_zero_point=300))
    with pytest.raises(MetadataError, match=f"layer '{name}'.*act_zero_point 300 outside"):
        qdcompile.load_metadata(bad_zp)


def test_wrong_model(calibrated):
    _, meta = calibrated
    with pytest.raises(MetadataError, match="calibrated for a UNet2DModel.*this model is a UNet2DConditionModel"):
        qdcompile.attach(tiny_unet2d_condition(), meta)


def test_same_architecture_other_weights(calibrated):
    _, meta = calibrated
    with pytest.raises(MetadataError, match="weights differ from the weights this metadata was calibrated on"):
        qdcompile.attach(tiny_unet2d(seed=2), meta)


def test_missing_and_extra_layer(calibrated):
    unet, meta = calibrated
    name = "up_blocks.1.resnets.0.conv1"
    layers = dict(meta.layers)
    rec = layers.pop(name)
    short = qdcompile.QuantMetadata(meta.recipe, meta.model, layers, meta.fallbacks, meta.calibration)
    with pytest.raises(MetadataError, match=f"no record for layer '{name}' \\(conv2d\\)"):
        qdcompile.attach(unet, short)
    extra = qdcompile.QuantMetadata(meta.recipe, meta.model, {**meta.layers, "up_blocks.9.conv": rec},
                                    meta.fallbacks, meta.calibration)
    with pytest.raises(MetadataError, match="record for layer 'up_blocks.9.conv', which this model does not have"):
        qdcompile.attach(unet, extra)


def test_metadata_survives_dtype_cast(calibrated):
    unet, meta = calibrated
    import copy

    qdcompile.attach(copy.deepcopy(unet).to(torch.bfloat16), meta)
