"""Calibration: the Q-Diffusion recipe fields and presets, the time-step-aware calibration
set (samples × steps, conditioning kept per sample), searched weight scales, and a
qdiffusion + split calibration end to end (file round trip, compiled model = simulation)."""

import copy
import dataclasses

import pytest
import torch

from qdcompile import QuantRecipe, load_metadata
from qdcompile.calibration import calibrate, calibration_steps, collect_calibration_set, mse_weight_scales
from qdcompile.kernels.quantizers import dequantize_weight, quantize_weight, weight_scales
from qdcompile.simulate import simulate
from tiny_models import scheduler, tiny_unet2d, tiny_unet2d_condition




# ---------------------------------------------------------------------------- recipe
def test_presets_for_q_diffusion():
    w8 = QuantRecipe.w8a8()
    assert (w8.method, w8.weight_observer, w8.split) == ("rtn", "minmax", False)
    q = QuantRecipe.w4a8()
    assert (q.method, q.weight_observer, q.split, q.weight_bits, q.act_bits) == ("qdiffusion", "mse", True, 4, 8)
    assert {"conv_in", "conv_out"} <= set(q.keep_8bit)
    linear = QuantRecipe.w4a8(method="rtn", split=False)
    assert (linear.method, linear.weight_observer, linear.split) == ("rtn", "minmax", False)
    back = QuantRecipe.from_json(q.to_json())
    assert back == q and isinstance(back.adaround_beta, tuple) and isinstance(back.recon_units, tuple)


def test_version_1_dicts_without_the_new_fields_still_load():
    old = {"name": "w4a8", "weight_bits": 4, "act_bits": 8, "method": "rtn", "act_observer": "minmax",
           "act_percentile": 99.99, "keep_8bit": ["conv_in", "conv_out"], "skip": [], "version": 1}
    r = QuantRecipe.from_dict(old)
    assert (r.method, r.split, r.weight_observer) == ("rtn", False, "minmax")


def test_version_1_recipes_keep_their_behaviour_and_version_2_fields_need_version_2():
    v1 = QuantRecipe.w4a4(version=1)
    assert v1.act_lsq_schedule == "constant" and "act_lsq_schedule" not in v1.to_dict()
    assert QuantRecipe.from_dict(v1.to_dict()) == v1   # round-trips as version 1
    assert QuantRecipe.w4a4().version == 2 and QuantRecipe.w4a4().to_dict()["act_lsq_schedule"] == "constant"
    with pytest.raises(ValueError, match="version 1 has no act_observer='search'"):
        QuantRecipe(act_observer="search", version=1)
    with pytest.raises(ValueError, match="unknown fields"):   # a version-1 dict cannot carry version-2 fields
        QuantRecipe.from_dict({**v1.to_dict(), "act_lsq_schedule": "cosine"})


@pytest.mark.parametrize("bad,match", [
    ({"method": "brecq"}, "method must be one of"),
    ({"act_lsq_schedule": "linear"}, "act_lsq_schedule must be one of"),
    ({"weight_observer": "hist"}, "weight_observer"),
    ({"split": 1}, "split must be True or False"),
    ({"split": True, "act_bits": None}, "split=True needs act_bits"),
    ({"recon_iters": -1}, "recon_iters must be an integer"),
    ({"recon_batch_size": 0}, "recon_batch_size"),
    ({"act_lsq_iters": 2.5}, "act_lsq_iters"),
    ({"recon_lr": 0.0}, "recon_lr must be > 0"),
    ({"act_lsq_lr": -1e-3}, "act_lsq_lr"),
    ({"recon_warmup": 1.0}, "recon_warmup"),
    ({"adaround_reg_weight": -1}, "adaround_reg_weight"),
    ({"adaround_beta": (2, 20)}, "adaround_beta"),
    ({"adaround_beta": 20}, "adaround_beta"),
    ({"recon_units": "ResnetBlock2D"}, "recon_units"),
])
def test_recipe_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        QuantRecipe(**bad)


# ---------------------------------------------------------------------------- calibration set
def test_calibration_set_is_samples_times_uniform_steps():
    unet = tiny_unet2d()
    calib = collect_calibration_set(unet, scheduler(), num_samples=3, num_inference_steps=10, num_calib_steps=4,
                                    progress=False)
    assert calibration_steps(10, 4) == [0, 3, 6, 9]
    assert calib.step_indices == [0, 3, 6, 9] and len(calib) == 12
    ts = [int(t) for t in calib.t]
    assert ts == sorted(ts, reverse=True) and ts[0] > 800 and ts[-1] < 200  # the whole trajectory


def test_samples_per_step_keeps_each_samples_conditioning():
    unet = tiny_unet2d_condition()
    n = 6
    emb = torch.randn(n, 5, 24)  # one conditioning per trajectory
    calib = collect_calibration_set(unet, scheduler(), num_samples=n, num_inference_steps=6, num_calib_steps=3,
                                    samples_per_step=2, batch_size=4, sample_kwargs={"encoder_hidden_states": emb},
                                    seed=7, progress=False)
    assert len(calib) == 3 * 2
    per_step: dict[int, int] = {}
    for x, kw, i in zip(calib.x, calib.kwargs, calib.step_indices):
        assert kw["encoder_hidden_states"].shape[0] == x.shape[0]
        per_step[i] = per_step.get(i, 0) + x.shape[0]
    assert per_step == {0: 2, 2: 2, 5: 2}
    # at step 0 the input is the initial noise (first sampling batch: the first 4 draws of the
    # seeded generator): each kept x must sit next to its own conditioning
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    chosen = set()
    for x, kw, i in zip(calib.x, calib.kwargs, calib.step_indices):
        for xi, ci in zip(x, kw["encoder_hidden_states"]):
            k = next(k for k in range(n) if torch.equal(ci, emb[k]))
            chosen.add((i, k))
            if i == 0 and k < 4:
                assert torch.allclose(xi, noise[k] * scheduler().init_noise_sigma)
    assert len({k for _, k in chosen}) > 2  # different trajectories at different steps


# ---------------------------------------------------------------------------- weight scales
def test_mse_weight_scales_lower_the_4bit_weight_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g) * torch.rand(32, 1, generator=g)  # heavy-ish tails: max ≈ 3σ
    err = {}
    for name, fn in (("minmax", weight_scales), ("mse", mse_weight_scales)):
        s = fn(w, 4)
        err[name] = (dequantize_weight(quantize_weight(w, s, 4), s) - w).pow(2).sum(1)
    assert bool((err["mse"] <= err["minmax"] + 1e-7).all()) and err["mse"].sum() < 0.9 * err["minmax"].sum()


def test_searched_activation_range_beats_minmax_on_heavy_tails_and_tracks_bit_width():
    from qdcompile.calibration import search_act_range
    from qdcompile.kernels.quantizers import act_qparams, fake_quantize_act

    g = torch.Generator().manual_seed(3)
    x = torch.randn(20000, generator=g) * (0.5 + torch.rand(1, generator=g))   # a bulk plus rare large outliers
    x[torch.randint(20000, (20,), generator=g)] *= 6.0

    def err(rng, bits):
        s, z = act_qparams(rng[0], rng[1], bits)
        return float((fake_quantize_act(x, s, z, bits) - x).abs().pow(2.4).mean())

    full = (float(x.min()), float(x.max()))
    r4, r8 = search_act_range(x, 4), search_act_range(x, 8)
    # the searched range is one of the candidates (min and max shrunk by the same ratio) …
    ratio = r4[1] / full[1]
    assert 0.21 - 1e-9 <= ratio <= 1.0 and abs(r4[0] - full[0] * ratio) < 1e-6 * abs(full[0])
    # … no candidate scores better, and it clips much harder at 4 bits than at 8
    assert all(err(r4, 4) <= err((full[0] * (1 - 0.01 * i), full[1] * (1 - 0.01 * i)), 4) + 1e-12 for i in range(80))
    assert err(r4, 4) < 0.5 * err(full, 4)
    assert r4[1] < r8[1] <= full[1]


def test_search_observer_calibrates_each_layer_at_its_own_bit_width():
    from qdcompile.calibration import _initial_records, collect_calibration_set, observe_ranges
    from qdcompile.layers import conv_linear_layers

    unet = tiny_unet2d()
    calib = collect_calibration_set(unet, scheduler(), num_samples=2, num_inference_steps=4, progress=False)
    layers = conv_linear_layers(unet)
    names = list(layers)
    recipe = QuantRecipe.w4a4(act_observer="search", method="rtn")
    ranges = observe_ranges(unet, calib, names, recipe, progress=False)
    minmax = observe_ranges(unet, calib, names, dataclasses.replace(recipe, act_observer="minmax"), progress=False)
    assert set(ranges) == set(minmax)
    a8 = observe_ranges(unet, calib, names, recipe, progress=False, act_bits=8)
    shrunk = 0
    for n in names:
        (lo, hi), (mlo, mhi) = ranges[n], minmax[n]
        assert mlo - 1e-6 <= lo <= hi <= mhi + 1e-6   # inside the observed range
        if n in ("conv_in", "conv_out"):   # kept at 8 bit: searched at 8 bit
            assert ranges[n] == a8[n]
        shrunk += hi < 0.99 * mhi
    assert shrunk >= len(names) // 2   # at A4 most layers clip
    recs = _initial_records(layers, names, recipe, ranges, {}, {})
    assert recs["conv_in"].act_bits == 8 and recs["down_blocks.0.resnets.0.conv1"].act_bits == 4


def test_metadata_with_a_version_1_recipe_still_loads(tmp_path):
    import json

    kw = dict(num_samples=2, num_inference_steps=3, progress=False, attach=False)
    meta = calibrate(tiny_unet2d(), scheduler(), QuantRecipe.w4a4(method="rtn", version=1), **kw)
    path = meta.save(tmp_path / "old.qdiff")
    back = load_metadata(path)
    assert back.recipe.version == 1 and back.recipe == meta.recipe
    assert "act_lsq_schedule" not in json.dumps(back.recipe.to_dict())


def test_cosine_lsq_schedule_anneals_to_zero(monkeypatch):
    from qdcompile import reconstruct as rc

    lrs = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(16, 8, generator=g)
    from qdcompile.calibration import quantize_layer
    rec = quantize_layer(lin, "linear", 8, 4, (float(x.min()), float(x.max())))
    for schedule in ("constant", "cosine"):
        lrs.clear()
        recipe = QuantRecipe(act_bits=4, method="qdiffusion", recon_iters=0, act_lsq_iters=10, act_lsq_lr=1e-2,
                             recon_batch_size=4, act_lsq_schedule=schedule)
        rc.reconstruct_block(lin, {"": rec}, rc.Captured.of(((x,), {})), rc.Captured.of(lin(x).detach()), recipe)
        assert len(lrs) == 10
        if schedule == "constant":
            assert lrs == [1e-2] * 10
        else:
            assert lrs[0] == pytest.approx(1e-2) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-3


# ---------------------------------------------------------------------------- end to end
_FAST = dict(recon_iters=40, act_lsq_iters=10, recon_batch_size=8)


@torch.no_grad()
def _eps_error(unet, meta, x, t, kw) -> float:
    fp = unet(x, t, **kw).sample
    q = copy.deepcopy(unet)
    with simulate(q, meta):
        out = q(x, t, **kw).sample
    return float((out - fp).pow(2).mean() / fp.pow(2).mean())


@pytest.mark.parametrize("model_fn", [tiny_unet2d, tiny_unet2d_condition], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_qdiffusion_split_calibration_round_trips_and_compiles_to_the_simulation(model_fn, tmp_path, monkeypatch):
    from equivalence import assert_matches_simulation
    import qdcompile
    from qdcompile.api import report
    from qdcompile.passes.backend import last_rewrite_stats

    monkeypatch.setenv("QDCOMPILE_INDUCTOR", "0")
    cond = model_fn is tiny_unet2d_condition
    skw = {"encoder_hidden_states": torch.randn(1, 5, 24)} if cond else None
    unet = model_fn()
    kwargs = dict(num_samples=4, num_inference_steps=6, progress=False, attach=False, sample_kwargs=skw)
    meta = calibrate(unet, scheduler(), QuantRecipe.w4a8(**_FAST), **kwargs)
    baseline = calibrate(unet, scheduler(), QuantRecipe.w4a8(method="rtn", split=False), **kwargs)
    assert len(meta.calibration["reconstruction"]) > 10
    assert sum(r.split is not None for r in meta.layers.values()) == 4
    ranges = meta.calibration["split_ranges"]   # observed per concat part, for the report
    assert set(ranges) == {n for n, r in meta.layers.items() if r.split}
    assert all(len(parts) == 2 and all(lo < hi for lo, hi in parts) for parts in ranges.values())

    back = load_metadata(meta.save(tmp_path / "tiny.w4a8.qdiff"))
    assert back.recipe == meta.recipe and back.calibration == meta.calibration
    for name, rec in meta.layers.items():
        got = back.layers[name]
        assert torch.equal(got.weight_q, rec.weight_q) and torch.equal(got.weight_scale, rec.weight_scale)
        assert (got.act_scale, got.act_zero_point, got.act_bits) == (rec.act_scale, rec.act_zero_point, rec.act_bits)
        assert [(p.channels, p.act_scale, p.act_zero_point) for p in got.split or []] == \
               [(p.channels, p.act_scale, p.act_zero_point) for p in rec.split or []]
        for p, q in zip(got.split or [], rec.split or []):
            assert torch.equal(p.weight_q, q.weight_q) and torch.equal(p.weight_scale, q.weight_scale)

    g = torch.Generator().manual_seed(5)
    c, s = unet.config.in_channels, unet.config.sample_size
    x, t = torch.randn(2, c, s, s, generator=g), torch.tensor([30, 800])
    kw = {"encoder_hidden_states": skw["encoder_hidden_states"].expand(2, -1, -1)} if cond else {}
    # reconstruction beats the linear-quantization baseline on the model output
    assert _eps_error(unet, back, x, t, kw) < _eps_error(unet, baseline, x, t, kw)

    qdcompile.attach(unet, back)
    fast = torch.compile(unet, backend="qdiff", fullgraph=True)
    with torch.no_grad():
        out = fast(x, t, **kw).sample
    assert last_rewrite_stats().split == 4 and not last_rewrite_stats().fallback
    assert str(report(fast)).count("qconv2d_split") == 4
    assert_matches_simulation(out, unet, back, x, t, **kw)
