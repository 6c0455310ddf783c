"""Block reconstruction: AdaRound lowers the block-output error of round-to-nearest, LSQ does
not raise it, the records stay METHODS §1 quantizers, units follow the diffusers blocks, and
a calibration interrupted after block k resumes from its checkpoint to the same result."""

import copy
import sys

import pytest
import torch

from qdcompile import QuantRecipe
from qdcompile import reconstruct as recon
from qdcompile.calibration import calibrate, quantize_layer
from qdcompile.kernels.quantizers import act_qparams, weight_scales
from qdcompile.metadata import validate_layer
from qdcompile.reconstruct import Captured, reconstruct_block, reconstruction_units
from qdcompile.simulate import dequantized_weight, fake_quant_input
from qdcompile.split import quantize_split_layer
from tiny_models import scheduler, tiny_unet2d, tiny_unet2d_condition




def _resnet_block(n=64, seed=0):
    """A diffusers ResnetBlock2D (with a 1x1 conv_shortcut) and calibration data for it."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(seed)
    block = ResnetBlock2D(in_channels=16, out_channels=24, temb_channels=32, groups=8).eval()
    g = torch.Generator().manual_seed(seed + 1)
    # correlated like real features (smooth in space, mixed across channels), two ranges like a skip concat:
    # with i.i.d. inputs round-to-nearest is already optimal for a single layer
    z = torch.nn.functional.interpolate(torch.randn(n, 16, 4, 4, generator=g), scale_factor=2, mode="bilinear")
    mix = torch.randn(16, 16, generator=g) / 4
    x = torch.einsum("dc,nchw->ndhw", mix, z) + 0.3 * torch.randn(n, 16, 8, 8, generator=g)
    x = x * torch.tensor([3.0] * 8 + [0.5] * 8)[:, None, None]
    temb = torch.randn(n, 32, generator=g)
    with torch.no_grad():
        y = block(x, temb)
    return block, (x, temb), y


def _rtn_records(block, args, weight_bits, act_bits, split_shortcut=False):
    """Round-to-nearest records with min-max input ranges observed on ``args``."""
    names = ["conv1", "time_emb_proj", "conv2", "conv_shortcut"]
    mods = dict(block.named_modules())
    seen = {}
    hs = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0])) for n in names]
    with torch.no_grad():
        block(*args)
    for h in hs:
        h.remove()
    recs = {}
    for n in names:
        op = "linear" if n == "time_emb_proj" else "conv2d"
        if split_shortcut and n == "conv_shortcut":
            parts = [(float(c.min()), float(c.max())) for c in torch.split(seen[n], [8, 8], 1)]
            recs[n] = quantize_split_layer(mods[n], op, weight_bits, act_bits, (8, 8), parts, weight_scales)
        else:
            rng = (float(seen[n].min()), float(seen[n].max())) if act_bits else None
            recs[n] = quantize_layer(mods[n], op, weight_bits, act_bits, rng)
    return recs


@torch.no_grad()
def _block_mse(block, records, args, y, acts: bool) -> float:
    """Output MSE of ``block`` running ``records`` (fake-quant, as the simulation does)."""
    b = copy.deepcopy(block)
    mods = dict(b.named_modules())
    for n, rec in records.items():
        mods[n].weight.data = dequantized_weight(rec)
        if acts:
            mods[n].register_forward_pre_hook(lambda m, a, rec=rec: (fake_quant_input(rec, a[0]), *a[1:]))
    return float((b(*args) - y).pow(2).mean())


def test_adaround_lowers_block_output_error_vs_round_to_nearest():
    block, args, y = _resnet_block()
    rtn = _rtn_records(block, args, 4, None)
    recipe = QuantRecipe.w4a8(act_bits=None, split=False, recon_iters=300, recon_batch_size=16)
    new, stats = reconstruct_block(block, rtn, Captured.of((args, {})), Captured.of(y), recipe,
                                   generator=torch.Generator().manual_seed(0))
    before, after = _block_mse(block, rtn, args, y, acts=False), _block_mse(block, new, args, y, acts=False)
    print(f"\nResnetBlock2D W4 block-output MSE: round-to-nearest {before:.3e}, AdaRound {after:.3e}")
    assert after < 0.8 * before
    assert stats["adaround_error"] < stats["rtn_error"]
    for n, rec in new.items():
        validate_layer(n, rec)
        w = dict(block.named_modules())[n].weight.detach()
        assert torch.equal(rec.weight_scale, rtn[n].weight_scale)  # AdaRound learns rounding, not scales
        ratio = w / rec.weight_scale.reshape(-1, *[1] * (w.dim() - 1))
        codes = rec.weight_q.float()
        assert bool(((codes == ratio.floor()) | (codes == ratio.ceil()) | (codes == -8) | (codes == 7)).all())
    assert any(not torch.equal(new[n].weight_q, rtn[n].weight_q) for n in new)


def test_adaround_on_split_layer_keeps_per_part_scales():
    block, args, y = _resnet_block()
    rtn = _rtn_records(block, args, 4, 8, split_shortcut=True)
    recipe = QuantRecipe.w4a8(recon_iters=60, act_lsq_iters=10, recon_batch_size=16)
    new, _ = reconstruct_block(block, rtn, Captured.of((args, {})), Captured.of(y), recipe)
    rec = new["conv_shortcut"]
    validate_layer("conv_shortcut", rec)
    assert [p.channels for p in rec.split] == [8, 8]
    assert torch.equal(rec.weight_q, torch.cat([p.weight_q for p in rec.split], 1))
    w = block.conv_shortcut.weight.detach()
    for p, old, w_part in zip(rec.split, rtn["conv_shortcut"].split, torch.split(w, [8, 8], 1)):
        assert torch.equal(p.weight_scale, old.weight_scale) and p.act_zero_point == old.act_zero_point
        ratio = w_part / p.weight_scale[:, None, None, None]
        assert bool(((p.weight_q == ratio.floor()) | (p.weight_q == ratio.ceil())).all())
    assert _block_mse(block, new, args, y, acts=True) < _block_mse(block, rtn, args, y, acts=True)


def _asym_records(block, args, act_bits):
    """Round-to-nearest records on Q-Diffusion's asymmetric grid (qdiff-mse), the 1x1 shortcut split."""
    from qdcompile.calibration import weight_grid_fn

    grid = weight_grid_fn(QuantRecipe.w4a8(weight_grid="asymmetric", weight_observer="qdiff-mse"))
    recs = _rtn_records(block, args, 4, act_bits, split_shortcut=True)
    out = {}
    mods = dict(block.named_modules())
    for n, rec in recs.items():
        if rec.split:
            ranges = [(-p.act_zero_point * p.act_scale, (255 - p.act_zero_point) * p.act_scale) for p in rec.split]
            out[n] = quantize_split_layer(mods[n], rec.op, 4, act_bits, (8, 8), ranges, grid)
        else:
            s, z = grid(mods[n].weight.detach(), 4)
            out[n] = quantize_layer(mods[n], rec.op, 4, act_bits, rec.act_range, scale=s, zero_point=z)
    return out


def test_adaround_on_the_asymmetric_grid():
    """AdaRound rounds W/s + z (clamped to the unsigned codes 0..15): the soft weight starts at W
    inside the range, the hard codes are floor or ceil of W/s plus z, zero points and scales stay,
    and the block-output error drops below round-to-nearest's (split layer included)."""
    block, args, y = _resnet_block()
    rtn = _asym_records(block, args, 8)
    assert all(r.asymmetric for r in rtn.values()) and rtn["conv_shortcut"].split
    qlayer = recon._QLayer("conv1", copy.deepcopy(block.conv1), rtn["conv1"])
    qlayer.init_rounding()
    w = block.conv1.weight.detach()
    z = rtn["conv1"].weight_zero_point.reshape(-1, 1, 1, 1).float()
    s = rtn["conv1"].weight_scale.reshape(-1, 1, 1, 1)
    inside = ((w / s).floor() + z >= 0) & ((w / s).floor() + z + 1 <= 15)
    torch.testing.assert_close(qlayer.soft_weight()[inside], w[inside], rtol=0, atol=1e-5)
    recipe = QuantRecipe.w4a8(recon_iters=300, act_lsq_iters=10, recon_batch_size=16)
    new, stats = reconstruct_block(block, rtn, Captured.of((args, {})), Captured.of(y), recipe,
                                   generator=torch.Generator().manual_seed(0))
    before, after = _block_mse(block, rtn, args, y, acts=True), _block_mse(block, new, args, y, acts=True)
    print(f"\nResnetBlock2D asymmetric W4A8 block-output MSE: round-to-nearest {before:.3e}, AdaRound {after:.3e}")
    assert after < 0.8 * before and stats["adaround_error"] < stats["rtn_error"]
    mods = dict(block.named_modules())
    for n, rec in new.items():
        validate_layer(n, rec)
        assert torch.equal(rec.weight_zero_point, rtn[n].weight_zero_point)
        assert torch.equal(rec.weight_scale, rtn[n].weight_scale)
        parts = rec.split or [rec]
        wparts = torch.split(mods[n].weight.detach(), [p.weight_q.shape[1] for p in parts], 1)
        for p, wp in zip(parts, wparts):
            tail = [1] * (wp.dim() - 1)
            base = torch.floor(wp / p.weight_scale.reshape(-1, *tail)) + p.weight_zero_point.reshape(-1, *tail)
            codes = p.weight_q.float()
            assert 0 <= int(codes.min()) and int(codes.max()) <= 15
            assert bool(((codes == base.clamp(0, 15)) | (codes == (base + 1).clamp(0, 15))).all())
    assert any(not torch.equal(new[n].weight_q, rtn[n].weight_q) for n in new)


@pytest.mark.parametrize("act_bits", [8, 4])
def test_lsq_does_not_raise_quantization_error(act_bits):
    block, args, y = _resnet_block(seed=2)
    rtn = _rtn_records(block, args, 8, act_bits)
    recipe = QuantRecipe(weight_bits=8, act_bits=act_bits, method="qdiffusion", recon_iters=0,
                         act_lsq_iters=80, recon_batch_size=16)
    new, stats = reconstruct_block(block, rtn, Captured.of((args, {})), Captured.of(y), recipe)
    before, after = _block_mse(block, rtn, args, y, acts=True), _block_mse(block, new, args, y, acts=True)
    print(f"\nResnetBlock2D W8A{act_bits} block-output MSE: observed ranges {before:.3e}, LSQ {after:.3e}")
    assert after <= before * (1 + 1e-6)
    assert stats["act_lsq_error"] <= stats["act_init_error"]
    for n, rec in new.items():
        validate_layer(n, rec)
        assert torch.equal(rec.weight_q, rtn[n].weight_q)  # recon_iters=0: weights untouched
        assert rec.act_zero_point == rtn[n].act_zero_point
        # the learned quantizer is the METHODS one of its recorded range
        scale, zp = act_qparams(*rec.act_range, act_bits)
        assert scale == pytest.approx(rec.act_scale, rel=1e-5) and zp == rec.act_zero_point
    if act_bits == 4:
        assert after < before  # at 4 bit there is something to learn
        assert any(new[n].act_scale != rtn[n].act_scale for n in new)


def test_units_follow_diffusers_blocks():
    unet = tiny_unet2d()
    x, t = torch.randn(1, 1, 16, 16), torch.tensor(3)
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    units = reconstruction_units(unet, names, QuantRecipe.w4a8(), x, t, {})
    by_name = {u.name: u for u in units}
    assert [u.name for u in units][:4] == ["time_embedding.linear_1", "time_embedding.linear_2", "conv_in",
                                           "down_blocks.0.resnets.0"]
    assert units[-1].name == "conv_out"
    assert set(by_name["up_blocks.0.resnets.0"].layers) == {f"up_blocks.0.resnets.0.{n}" for n in
                                                            ("conv1", "time_emb_proj", "conv2", "conv_shortcut")}
    assert set(by_name["down_blocks.1.attentions.0"].layers) == {f"down_blocks.1.attentions.0.{n}" for n in
                                                                 ("to_q", "to_k", "to_v", "to_out.0")}
    assert sorted(n for u in units for n in u.layers) == sorted(names)

    cond = tiny_unet2d_condition()
    names = [n for n, m in cond.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    units = reconstruction_units(cond, names, QuantRecipe.w4a8(), torch.randn(1, 4, 8, 8), t,
                                 {"encoder_hidden_states": torch.randn(1, 5, 24)})
    by_name = {u.name: u for u in units}
    tb = by_name["down_blocks.0.attentions.0.transformer_blocks.0"]
    assert len(tb.layers) == 10  # attn1 q/k/v/out, attn2 q/k/v/out, GEGLU proj, FF out
    assert "down_blocks.0.attentions.0.proj_in" in by_name  # outside the transformer block: layer-wise
    layer_wise = QuantRecipe.w4a8(recon_units=())
    assert all(len(u.layers) == 1 for u in reconstruction_units(cond, names, layer_wise, torch.randn(1, 4, 8, 8), t,
                                                                {"encoder_hidden_states": torch.randn(1, 5, 24)}))


_FAST = dict(recon_iters=6, act_lsq_iters=3, recon_batch_size=4)


def _calibrate(unet, recipe, **kw):
    return calibrate(unet, scheduler(), recipe, num_samples=2, num_inference_steps=4, progress=False,
                     attach=False, **kw)


def _untimed(calibration: dict) -> dict:
    """Calibration facts without the wall-clock timings (which differ between runs)."""
    timing = ("seconds", "peak_gpu_mb")
    return {**calibration, "reconstruction": [{k: v for k, v in u.items() if k not in timing}
                                              for u in calibration["reconstruction"]]}


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
    recipe = QuantRecipe.w4a8(**_FAST)
    full = _calibrate(tiny_unet2d(), recipe, seed=3)
    n_units = len(full.calibration["reconstruction"])

    real, calls = recon._reconstruct_unit, []

    class Interrupted(Exception):
        pass

    def interrupted(*a, **kw):
        if len(calls) == 5:
            raise Interrupted("injected after block 5")
        calls.append(a[2].name)
        return real(*a, **kw)

    ckpt = tmp_path / "calib.ckpt"
    monkeypatch.setattr(recon, "_reconstruct_unit", interrupted)
    with pytest.raises(Interrupted):
        _calibrate(tiny_unet2d(), recipe, seed=3, checkpoint=ckpt)
    assert ckpt.is_file() and [p.name for p in tmp_path.iterdir()] == ["calib.ckpt"]
    assert torch.load(ckpt, weights_only=True)["next_unit"] == 5

    resumed_units = []

    def counting(*a, **kw):
        resumed_units.append(a[2].name)
        return real(*a, **kw)

    monkeypatch.setattr(recon, "_reconstruct_unit", counting)
    monkeypatch.setattr(sys.modules["qdcompile.calibration"], "collect_calibration_set",
                        lambda *a, **k: pytest.fail("the calibration set must come from the checkpoint"))
    resumed = _calibrate(tiny_unet2d(), recipe, seed=3, checkpoint=ckpt)
    assert len(resumed_units) == n_units - 5 and resumed_units[0] not in calls
    assert _untimed(resumed.calibration) == _untimed(full.calibration)
    assert all(u["seconds"] > 0 for u in full.calibration["reconstruction"])
    assert list(resumed.layers) == list(full.layers)
    for name, rec in full.layers.items():
        got = resumed.layers[name]
        assert torch.equal(got.weight_q, rec.weight_q) and torch.equal(got.weight_scale, rec.weight_scale), name
        assert (got.act_scale, got.act_zero_point) == (rec.act_scale, rec.act_zero_point), name
        assert [(p.act_scale, p.act_zero_point) for p in got.split or []] == \
               [(p.act_scale, p.act_zero_point) for p in rec.split or []]

    # a finished checkpoint just returns the result; another run's checkpoint is refused
    again = _calibrate(tiny_unet2d(), recipe, seed=3, checkpoint=ckpt)
    assert len(resumed_units) == n_units - 5
    assert all(torch.equal(again.layers[n].weight_q, r.weight_q) for n, r in full.layers.items())
    with pytest.raises(ValueError, match="different run.*seed"):
        _calibrate(tiny_unet2d(), recipe, seed=4, checkpoint=ckpt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reconstruct_block_on_cuda():
    block, args, y = _resnet_block()
    rtn = _rtn_records(block, args, 4, 8)
    cuda_args = tuple(a.cuda() for a in args)
    recipe = QuantRecipe.w4a8(split=False, recon_iters=100, act_lsq_iters=20, recon_batch_size=16)
    new, stats = reconstruct_block(block.cuda(), rtn, Captured.of((cuda_args, {})), Captured.of(y.cuda()), recipe)
    assert stats["adaround_error"] < stats["rtn_error"]
    assert all(r.weight_q.device.type == "cpu" for r in new.values())
    block.cpu()
    assert _block_mse(block, new, args, y, acts=True) < _block_mse(block, rtn, args, y, acts=True)
