"""Metadata file: round trip, atomic writes, and a clear error for every kind of bad input."""

import os

import pytest
import torch
from safetensors.torch import save_file

import qdcompile
from qdcompile import MetadataError, QuantRecipe
from metadata_files import read_parts, write_parts
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


def _rewrite(path, tmp_path, header_fn=None, meta_fn=None, drop=None, reseal=True):
    file_meta, header, tensors = read_parts(path)
    if header_fn:
        header_fn(header)
    if meta_fn:
        meta_fn(file_meta)
    for k in drop or ():
        tensors.pop(k)
    return write_parts(tmp_path / "edited.qdiff", file_meta, header, tensors, reseal=reseal)


def test_version_and_corrupt_header(calibrated, tmp_path):
    _, meta = calibrated
    path = meta.save(tmp_path / "m.qdiff")
    newer = _rewrite(path, tmp_path, meta_fn=lambda m: m.update(format_version="99"))
    with pytest.raises(MetadataError, match="format version '99'.*upgrade qdcompile"):
        qdcompile.load_metadata(newer)
    broken = _rewrite(path, tmp_path, header_fn=lambda h: h.pop("recipe"))
    with pytest.raises(MetadataError, match=r"metadata header: missing field\(s\) \['recipe'\]"):
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


# ---------------------------------------------------------------------------- every field checked
SPLIT = "up_blocks.0.resnets.0.conv_shortcut"
CONV = "down_blocks.0.resnets.0.conv1"


def _set(path, value):
    """A header edit: set the field at ``path`` (keys / indices) to ``value``."""
    def edit(h):
        obj = h
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return edit


def _tensor(key, fn):
    def edit(tensors):
        tensors[key] = fn(tensors[key])
    return edit


HEADER_CASES = [   # (file kind, header edit, the message naming the field and what was expected)
    ("w8a8", _set(("layers", CONV), 0.5), f"layer '{CONV}' must be an object, got float"),
    ("w8a8", _set(("layers", CONV, "act_bits"), float("inf")), f"layer '{CONV}': act_bits must be an integer, got inf"),
    ("w8a8", _set(("layers", CONV, "act_zero_point"), 12.7), "act_zero_point must be an integer, got 12.7"),
    ("w8a8", _set(("layers", CONV, "act_scale"), True), "act_scale must be a finite number .*got True"),
    ("w8a8", _set(("layers", CONV, "act_scale"), 1e31), r"act_scale must lie in \[7.8.*e-31, 1.26.*e\+30\]"),
    ("w8a8", _set(("layers", CONV, "act_range"), "inf"), r"act_range must be null or \[min, max\].*got 'inf'"),
    ("w8a8", _set(("layers", CONV, "op"), "conv3d"), "op must be 'conv2d' or 'linear', got 'conv3d'"),
    ("w8a8", _set(("recipe", "weight_bits"), 4), "layer 'conv_in' is W8A8, but the recipe 'w8a8' gives it "
                                                 "W4A8"),
    ("w8a8", _set(("recipe", "keep_8bit"), "conv_in"), "recipe field 'keep_8bit' must be a list of str"),
    ("w8a8", lambda h: h["recipe"].pop("recon_batch_size"), r"recipe: missing field\(s\) \['recon_batch_size'\]"),
    ("w8a8", _set(("model", "config", "sample_size"), 32), "config_hash .* does not match the stored config"),
    ("w8a8", _set(("layers", CONV, "weight_digest"), False), "header does not list a weight digest, but the file has tensor"),
    ("w4a8-split", _set(("layers", SPLIT, "split", 1, "act_zero_point"), -1), r"split part 1: act_zero_point -1 outside"),
    ("w4a8-split", _set(("layers", SPLIT, "split", 0, "channels"), 31), r"split part channels \[31, 32\] do not add up"),
    ("w4a8-split", _set(("layers", SPLIT, "split"), [{"channels": 64, "act_bits": 8, "act_scale": 0.1,
                                                        "act_zero_point": 3}]), "split must list 2 parts"),
    ("w4a8-split", lambda h: h["layers"][CONV].update(weight_zero_point=h["layers"][CONV]["weight_zero_point"][:-1]),
     f"layer '{CONV}': weight_zero_point must be \\d+ integers \\(one per output channel\\), got torch.int32"),
    ("w4a8-split", lambda h: h["layers"][CONV]["weight_zero_point"].__setitem__(0, 16),
     f"layer '{CONV}': weight_zero_point values must lie in the 4-bit code range \\[0, 15\\], got \\[\\d+, 16\\]"),
    ("w4a8-split", lambda h: h["layers"][CONV]["weight_zero_point"].__setitem__(0, -1), r"code range \[0, 15\], got \[-1"),
    ("w4a8-split", lambda h: h["layers"][CONV]["weight_zero_point"].__setitem__(0, 7.5),
     f"layer '{CONV}': weight_zero_point must be null or a list of integers"),
    ("w4a8-split", _set(("layers", CONV, "weight_zero_point"), None),
     f"layer '{CONV}'(: weight codes outside the 4-bit signed range| has symmetric weights, but the recipe)"),
    ("w4a8-split", _set(("layers", CONV, "weight_zero_point"), "8"), "weight_zero_point must be null or a list"),
    ("w4a8-split", lambda h: h["layers"][CONV].pop("weight_zero_point"), r"missing field\(s\) \['weight_zero_point'\]"),
    ("w4a8-split", _set(("layers", SPLIT, "split", 1, "weight_zero_point"), None),
     f"layer '{SPLIT}': either every split part has a weight_zero_point"),
    ("w4a8-split", _set(("layers", SPLIT, "weight_zero_point"), [1]), "top-level weight_zero_point must be null"),
    ("w4a8-split", _set(("recipe", "weight_grid"), "symmetric"), "has asymmetric weights, but the recipe 'w4a8' "
                                                                 "\\(weight_grid 'symmetric'\\)"),
    ("w4a8-split", _set(("recipe", "weight_grid"), "diagonal"), "weight_grid must be one of"),
    ("w8a8", lambda h: h["layers"][CONV].update(weight_zero_point=[0] * 8),
     f"layer '{CONV}': weight_zero_point on 8-bit weights"),
    ("mixed-ptqd", _set(("noise", "8", 0, "k"), float("nan")), r"A8 step 0: k must be a finite number"),
    ("mixed-ptqd", _set(("noise", "8", 1, "k"), -1.0), r"k must lie in \[0.0, inf\]"),
    ("mixed-ptqd", _set(("noise", "4", 0, "var"), -1.0), r"A4 step 0: var must lie in \[0.0, inf\]"),
    ("mixed-ptqd", _set(("noise", "8", 0, "mu"), []), "mu must list one finite number per output channel"),
    ("mixed-ptqd", _set(("noise", "8", 0, "mu"), [0.1, 0.2]), "mu has 2 values, expected one per predicted-noise "
                                                              "channel of 'conv_out' \\(1\\)"),
    ("mixed-ptqd", _set(("noise", "8", 0, "timestep"), 5000), r"time step 5000, outside the schedule's \[0, 999\]"),
    ("mixed-ptqd", lambda h: h["noise"].pop("4"), r"the precision plan uses \['A4'\], which have no PTQD statistics"),
    ("mixed-ptqd", _set(("precision_plan", 0, 1), 6), "precision plan uses A6 at time step 666; supported: A4, A8"),
    ("mixed-ptqd", _set(("act_variants", "4", CONV, 0, "act_bits"), 8), "activation variant A4 .* act_bits 8 not|"
                                                                         "act_bits \\[8\\], expected 4"),
    ("mixed-ptqd", _set(("noise_layer",), SPLIT), f"PTQD statistics correct layer '{SPLIT}', a split layer"),
    ("mixed-ptqd", _set(("noise_space",), {}), r"noise_space: PTQD statistics in space \{\}"),
    ("mixed-ptqd", _set(("act_variants", "4", SPLIT, 1, "act_range"), [0, 1]), "act_range must be null here"),
]


@pytest.mark.parametrize("kind,edit,message", HEADER_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(HEADER_CASES)])
def test_malformed_header_field_is_named(metadata_files, tmp_path, kind, edit, message):
    """Each edit, checksums recomputed (so the field checks must catch it): a MetadataError naming
    the field and what was expected."""
    _, path = metadata_files[kind]
    with pytest.raises(MetadataError, match=message):
        qdcompile.load_metadata(_rewrite(path, tmp_path, header_fn=edit))


TENSOR_CASES = [
    ("w8a8", f"{CONV}.weight_q", lambda t: t[0, 0, 0, 0].clone(), "weight_q of a conv2d must have 4 non-empty"),
    ("w8a8", f"{CONV}.weight_q", lambda t: t.reshape(-1).clone(), "weight_q of a conv2d must have 4 non-empty"),
    ("w8a8", f"{CONV}.weight_q", lambda t: t.to(torch.int16), "weight_q must be int8 codes, got torch.int16"),
    ("w8a8", f"{CONV}.weight_q", torch.zeros_like, "weight codes x scales .* do not reproduce the weights"),
    ("w8a8", f"{CONV}.weight_scale", lambda t: t.clone().fill_(float("inf")), "finite, > 0 and <= 2\\^100"),
    ("w8a8", f"{CONV}.weight_scale", lambda t: t * 1e35, "finite, > 0 and <= 2\\^100"),
    ("w8a8", f"{CONV}.weight_scale", lambda t: t * 3, "do not reproduce the weights"),
    ("w8a8", f"{CONV}.weight_digest", lambda t: t[:3].clone(), "weight_digest must be 10 finite float32 values"),
    ("w4a8-split", f"{SPLIT}.split.1.weight_q", lambda t: -t, "split part 1: its weight codes or scales differ"),
]


@pytest.mark.parametrize("kind,key,fn,message", TENSOR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(TENSOR_CASES)])
def test_malformed_tensor_is_named(metadata_files, tmp_path, kind, key, fn, message):
    _, path = metadata_files[kind]
    file_meta, header, tensors = read_parts(path)
    _tensor(key, fn)(tensors)
    with pytest.raises(MetadataError, match=message):
        qdcompile.load_metadata(write_parts(tmp_path / "t.qdiff", file_meta, header, tensors))


def test_checksums_catch_any_edit(metadata_files, tmp_path):
    """Format 5: a flipped byte in the tensors, a removed digest, or an edited header (checksum kept)."""
    _, path = metadata_files["w4a8-split"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10   # a byte of the last tensor
    flipped = tmp_path / "flipped.qdiff"
    flipped.write_bytes(bytes(data))
    with pytest.raises(MetadataError, match="tensor payload does not match its checksum"):
        qdcompile.load_metadata(flipped)
    with pytest.raises(MetadataError, match="tensor payload does not match its checksum"):
        qdcompile.load_metadata(_rewrite(path, tmp_path, drop=[f"{CONV}.weight_digest"], reseal=False))
    with pytest.raises(MetadataError, match="header lists a weight digest, but the file lacks tensor"):
        qdcompile.load_metadata(_rewrite(path, tmp_path, drop=[f"{CONV}.weight_digest"]))
    edited = _rewrite(path, tmp_path, header_fn=_set(("layers", CONV, "act_scale"), 0.05), reseal=False)
    with pytest.raises(MetadataError, match="header does not match its checksum: the file was edited"):
        qdcompile.load_metadata(edited)
    with pytest.raises(MetadataError, match="without its header or checksums"):
        qdcompile.load_metadata(_rewrite(path, tmp_path, meta_fn=lambda m: m.pop("payload_sha256"), reseal=False))


def test_previous_format_files_still_load(previous_format):
    """A format-5 file (symmetric weights, recipe version 1 without weight_grid) loads with the
    symmetric grid and the same records as the current format's file of the same calibration."""
    unet, v5, v6 = previous_format
    old, new = qdcompile.load_metadata(v5), qdcompile.load_metadata(v6)
    assert old.format_version == 5 and new.format_version == 6
    assert old.recipe == new.recipe and old.recipe.weight_grid == "symmetric" and old.recipe.version == 2
    assert old.noise == new.noise and old.precision_plan == new.precision_plan and old.act_variants == new.act_variants
    for name, rec in new.layers.items():
        assert rec.weight_zero_point is None and old.layers[name].weight_zero_point is None
        assert torch.equal(old.layers[name].weight_q, rec.weight_q)
        assert torch.equal(old.layers[name].weight_scale, rec.weight_scale)
    qdcompile.attach(unet, old)


def test_zero_points_need_format_6(previous_format, tmp_path):
    _, v5, _ = previous_format
    edited = _rewrite(v5, tmp_path, header_fn=_set(("layers", CONV, "weight_zero_point"), [1, 2]))
    with pytest.raises(MetadataError, match=f"layer '{CONV}': weight_zero_point needs metadata format 6"):
        qdcompile.load_metadata(edited)


def test_version_4_files_still_load(previous_format, tmp_path):
    """A file as format 4 wrote it (no checksums, no digest flags) loads to the same records."""
    _, path, _ = previous_format
    file_meta, header, tensors = read_parts(path)
    for entry in header["layers"].values():
        entry.pop("weight_digest")
    file_meta = {k: v for k, v in file_meta.items() if not k.endswith("sha256")}
    file_meta["format_version"] = "4"
    old = qdcompile.load_metadata(write_parts(tmp_path / "v4.qdiff", file_meta, header, tensors, reseal=False))
    new = qdcompile.load_metadata(path)
    assert old.format_version == 4 and new.format_version == 5
    assert old.noise == new.noise and old.precision_plan == new.precision_plan and old.act_variants == new.act_variants
    for name, rec in new.layers.items():
        assert torch.equal(old.layers[name].weight_q, rec.weight_q)
        assert torch.equal(old.layers[name].weight_digest, rec.weight_digest)


def test_attach_raises_only_metadata_errors(calibrated):
    """Malformed in-memory records (digest of the wrong shape/dtype, edited config with its hash
    kept): attach says MetadataError, never IndexError/RuntimeError."""
    import copy
    import dataclasses

    unet, meta = calibrated
    for bad in (torch.zeros(3), torch.zeros(10, dtype=torch.int64), torch.full((10,), float("nan")), "x"):
        rec = dataclasses.replace(meta.layers[CONV], weight_digest=bad)
        broken = dataclasses.replace(meta, layers={**meta.layers, CONV: rec})
        with pytest.raises(MetadataError, match=f"layer '{CONV}': weight_digest must be 10 finite float32"):
            qdcompile.attach(unet, broken)
    model = copy.deepcopy(meta.model)
    model["config"]["norm_eps"] = 0.5   # config_hash kept: the full config is compared
    with pytest.raises(MetadataError, match="differing config keys: norm_eps"):
        qdcompile.attach(unet, dataclasses.replace(meta, model=model))


def test_saved_files_follow_the_umask(calibrated, tmp_path):
    _, meta = calibrated
    old = os.umask(0o027)
    try:
        path = meta.save(tmp_path / "m.qdiff")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_quantized_unet_checks_in_memory_statistics(metadata_files):
    """PTQD statistics built in Python (not loaded) are checked too: k = -1 or mu = [] once ended
    in ZeroDivisionError inside QuantizedUNet."""
    import dataclasses

    unet, path = metadata_files["mixed-ptqd"]
    meta = qdcompile.load_metadata(path)
    for change, message in (({"k": -1.0}, "k must lie in"), ({"mu": ()}, "mu must list one finite number"),
                            ({"var": float("nan")}, "var must be a finite number")):
        noise = {b: [dataclasses.replace(s, **change) for s in steps] for b, steps in meta.noise.items()}
        with pytest.raises(MetadataError, match=message):
            qdcompile.QuantizedUNet(unet, dataclasses.replace(meta, noise=noise), backend="simulate")


def test_asymmetric_w4_records_round_trip(metadata_files, tmp_path):
    """The W4A8 file on Q-Diffusion's grid (``weight_grid="asymmetric"``): 4-bit layers on the asymmetric grid (unsigned codes, a zero point per
    output channel, per split part), 8-bit layers symmetric; saving the loaded metadata again gives
    the same records, and the dequantized weights reproduce the float weights."""
    from qdcompile.simulate import dequantized_weight

    unet, path = metadata_files["w4a8-split"]
    meta = qdcompile.load_metadata(path)
    assert meta.format_version == 6 and meta.recipe.weight_grid == "asymmetric"
    modules = dict(unet.named_modules())
    for name, rec in meta.layers.items():
        assert rec.asymmetric == (rec.weight_bits == 4), name
        if rec.asymmetric:
            n = rec.weight_q.shape[0]
            assert rec.weight_zero_point.dtype == torch.int32
            assert tuple(rec.weight_zero_point.shape) == ((2, n) if rec.split else (n,))
            assert 0 <= int(rec.weight_q.min()) and int(rec.weight_q.max()) <= 15
            assert 0 <= int(rec.weight_zero_point.min()) and int(rec.weight_zero_point.max()) <= 15
            for i, p in enumerate(rec.split or ()):
                assert torch.equal(p.weight_zero_point, rec.weight_zero_point[i])
        w = modules[name].weight.detach().float()
        err = float((dequantized_weight(rec) - w).pow(2).mean() / w.pow(2).mean())
        assert err < (0.05 if rec.weight_bits == 4 else 1e-3), (name, err)
    assert any(rec.split for rec in meta.layers.values())
    again = qdcompile.load_metadata(meta.save(tmp_path / "again.qdiff"))
    for name, rec in meta.layers.items():
        other = again.layers[name]
        assert torch.equal(rec.weight_q, other.weight_q) and torch.equal(rec.weight_scale, other.weight_scale)
        assert (rec.weight_zero_point is None and other.weight_zero_point is None) or \
            torch.equal(rec.weight_zero_point, other.weight_zero_point)
