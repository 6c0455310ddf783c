"""Shortcut-split quantization: which layers are split, the per-part quantizers, and why
splitting helps (per-part ranges, input quantization error)."""

import pytest
import torch

from qdcompile import QuantRecipe
from qdcompile.calibration import calibrate, collect_calibration_set
from qdcompile.observers import observe_ranges
from qdcompile.kernels.quantizers import act_qparams, dequantize_weight, fake_quantize_act, weight_scales
from qdcompile.metadata import validate_layer
from qdcompile.simulate import dequantized_weight, fake_quant_input
from qdcompile.split import find_split_layers, quantize_split_layer, scale_map
from tiny_models import scheduler, tiny_unet2d, tiny_unet2d_condition

CONDS = {"UNet2DModel": None, "UNet2DConditionModel": {"encoder_hidden_states": torch.randn(1, 5, 24)}}
MODELS = {"UNet2DModel": tiny_unet2d, "UNet2DConditionModel": tiny_unet2d_condition}




def _expected_splits(unet) -> dict[str, tuple[int, int]]:
    """From the diffusers block structure: up block i, ResNet j reads cat([hidden, skip]);
    hidden has the previous block's channels (j = 0) or this block's, skip comes from the
    mirrored encoder output."""
    cfg = unet.config
    rev = list(reversed(cfg.block_out_channels))
    out = {}
    for i, block in enumerate(unet.up_blocks):
        prev = rev[max(i - 1, 0)]
        for j, res in enumerate(block.resnets):
            deep = prev if j == 0 else rev[i]
            out[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = (deep, res.conv_shortcut.in_channels - deep)
    return out


@pytest.mark.parametrize("kind", list(MODELS))
def test_detection_finds_exactly_the_up_block_shortcut_convs(kind):
    unet = MODELS[kind]()
    c, s = unet.config.in_channels, unet.config.sample_size
    kw = {k: v for k, v in (CONDS[kind] or {}).items()}
    found = find_split_layers(unet, torch.randn(1, c, s, s), torch.tensor(500), kw)
    assert found == _expected_splits(unet)
    assert set(found) == {f"up_blocks.{i}.resnets.{j}.conv_shortcut" for i in range(2) for j in range(2)}
    # conv1 reads SiLU(GroupNorm(cat)): not a concatenation, so it is not split
    assert not any(n.endswith("conv1") for n in found)


def test_split_record_layout_and_validation():
    unet = tiny_unet2d()
    mod = unet.up_blocks[0].resnets[0].conv_shortcut
    rec = quantize_split_layer(mod, "conv2d", 4, 8, (32, 32), [(-3.0, 5.0), (-0.2, 0.4)], weight_scales)
    validate_layer("x", rec)
    assert rec.act_bits is None and rec.act_scale is None and rec.split is not None
    assert [p.channels for p in rec.split] == [32, 32]
    assert rec.weight_q.shape == mod.weight.shape and rec.weight_scale.shape == (2, mod.out_channels)
    for p, w in zip(rec.split, torch.split(mod.weight.detach(), [32, 32], 1)):
        assert torch.equal(p.weight_scale, weight_scales(w, 4))
        assert torch.equal(p.weight_q, rec.weight_q[:, :32] if p is rec.split[0] else rec.weight_q[:, 32:])
    # the per-element scale map used by AdaRound is the per-part scales over each part's channels
    smap = scale_map(rec)
    assert torch.equal(smap[:, :32, 0, 0], rec.split[0].weight_scale[:, None].expand(-1, 32))
    assert torch.equal(smap[:, 32:, 0, 0], rec.split[1].weight_scale[:, None].expand(-1, 32))
    assert torch.equal(dequantized_weight(rec), torch.cat([dequantize_weight(p.weight_q, p.weight_scale)
                                                            for p in rec.split], 1))
    with pytest.raises(ValueError, match="do not fit"):
        quantize_split_layer(mod, "conv2d", 4, 8, (32, 31), [(-1.0, 1.0)] * 2, weight_scales)


def _inputs_of(unet, names, calib):
    got = {n: [] for n in names}
    modules = dict(unet.named_modules())
    hs = [modules[n].register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0])) for n in names]
    with torch.no_grad():
        for x, t, kw in calib.batches(torch.device("cpu"), torch.float32):
            unet(x, t.expand(x.shape[0]), **kw)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


@pytest.mark.parametrize("kind", list(MODELS))
def test_part_ranges_differ_and_split_lowers_input_error(kind, capsys):
    """Measure the deep/skip ranges of every split layer over a calibration set (printed),
    then compare the input quantization error of one quantizer over the concatenation
    against one per part: per part is lower wherever the parts' ranges differ."""
    unet = MODELS[kind]()
    calib = collect_calibration_set(unet, scheduler(), num_samples=4, num_inference_steps=8, num_calib_steps=4,
                                    sample_kwargs=CONDS[kind], progress=False)
    splits = _expected_splits(unet)
    recipe = QuantRecipe.w4a8(act_bits=4)
    parts = observe_ranges(unet, calib, list(splits), recipe, progress=False, splits=splits)
    whole = observe_ranges(unet, calib, list(splits), recipe, progress=False)
    inputs = _inputs_of(unet, list(splits), calib)
    with capsys.disabled():
        print(f"\n{kind}: input ranges of the split layers (deep part | skip part | whole), A4 input error")
    for name, (deep, skip) in splits.items():
        x = inputs[name]
        unsplit_err = (fake_quantize_act(x, *act_qparams(*whole[name], 4), 4) - x).pow(2).mean()
        mod = dict(unet.named_modules())[name]
        rec = quantize_split_layer(mod, "conv2d", 4, 4, (deep, skip), parts[name], weight_scales)
        split_err = (fake_quant_input(rec, x) - x).pow(2).mean()
        (dlo, dhi), (slo, shi) = parts[name]
        with capsys.disabled():
            print(f"  {name:40s} [{dlo:7.2f}, {dhi:6.2f}] | [{slo:7.2f}, {shi:6.2f}] | "
                  f"[{whole[name][0]:7.2f}, {whole[name][1]:6.2f}]  "
                  f"MSE unsplit {unsplit_err:.2e} split {split_err:.2e}")
        assert min(dlo, slo) == pytest.approx(whole[name][0]) and max(dhi, shi) == pytest.approx(whole[name][1])
        assert split_err <= unsplit_err
        if abs((dhi - dlo) - (shi - slo)) > 0.2 * (whole[name][1] - whole[name][0]):
            assert split_err < 0.9 * unsplit_err


def test_split_quantizers_help_on_bimodal_concat():
    """Synthetic bimodal concatenation (deep part ~20x the skip part): per-part quantizers cut
    the input error of the small part by about the range ratio."""
    g = torch.Generator().manual_seed(0)
    deep, skip = 20 * torch.randn(64, 16, 4, 4, generator=g), torch.randn(64, 16, 4, 4, generator=g)
    x = torch.cat([deep, skip], 1)
    one = fake_quantize_act(x, *act_qparams(float(x.min()), float(x.max()), 8), 8)
    conv = torch.nn.Conv2d(32, 8, 1)
    rec = quantize_split_layer(conv, "conv2d", 8, 8, (16, 16),
                               [(float(deep.min()), float(deep.max())), (float(skip.min()), float(skip.max()))],
                               weight_scales)
    two = fake_quant_input(rec, x)
    err_one, err_two = (one - x)[:, 16:].pow(2).mean(), (two - x)[:, 16:].pow(2).mean()
    assert err_two < err_one / 50
    assert torch.allclose((two - x)[:, :16], (one - x)[:, :16], atol=1e-4)  # the deep part keeps its quantizer


@pytest.mark.parametrize("kind", list(MODELS))
def test_calibrate_records_split_and_the_backend_runs_split_kernels(kind, monkeypatch):
    from equivalence import assert_matches_simulation
    from qdcompile.api import report
    from qdcompile.passes.backend import last_rewrite_stats

    monkeypatch.setenv("QDCOMPILE_INDUCTOR", "0")
    unet = MODELS[kind]()
    recipe = QuantRecipe.w4a8(method="rtn")  # split without reconstruction: fast
    meta = calibrate(unet, scheduler(), recipe, num_samples=2, num_inference_steps=4,
                               sample_kwargs=CONDS[kind], progress=False)
    expected = _expected_splits(unet)
    assert {n: tuple(c) for n, c in meta.calibration["split_layers"].items()} == expected
    assert {n for n, r in meta.layers.items() if r.split} == set(expected)
    g = torch.Generator().manual_seed(1)
    c, s = unet.config.in_channels, unet.config.sample_size
    x, t = torch.randn(2, c, s, s, generator=g), torch.tensor([10, 700])
    kw = {k: v.expand(2, -1, -1) for k, v in (CONDS[kind] or {}).items()}
    fast = torch.compile(unet, backend="qdiff", fullgraph=True)
    with torch.no_grad():
        out = fast(x, t, **kw).sample
    assert last_rewrite_stats().split == len(expected) and not last_rewrite_stats().fallback
    rows = {r.name: r for r in report(fast).rows}
    assert "qconv2d_split" in str(report(fast))
    for name in expected:
        assert rows[name].kernel == "qdiff.qconv2d_split [reference]" and rows[name].bits == "W4A8/8 split"
    assert_matches_simulation(out, unet, meta, x, t, **kw)
