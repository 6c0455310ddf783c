"""PTQD: noise statistics, corrections, variance schedule calibration, mixed precision, sampler."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from qdcompile import QuantRecipe, calibrate, load_metadata
from qdcompile.metadata import MetadataError
from qdcompile.pipeline import Corrections, CorrectedScheduler, QuantizedUNet, quantize_pipeline
from qdcompile.noise import (StepNoise, calibrated_sigma, ddim_c, ddim_sigma2, ddpm_c, ddpm_sigma2,
                             effective_eps)
from qdcompile.ptqd import choose_bits, estimate_noise
from tests.equivalence import rel
from tests.tiny_models import tiny_unet2d


# ---------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("k", [0.0, 0.07, 0.3])
def test_estimates_recover_known_k_bias_and_variance(k):
    g = torch.Generator().manual_seed(int(k * 100) + 1)
    eps = torch.randn(32, 3, 16, 16, generator=g)
    mu = torch.randn(3, generator=g) * 0.05
    sigma = 0.1 + 0.2 * torch.rand((), generator=g).item()
    eps_q = (1 + k) * eps + mu.view(1, 3, 1, 1) + sigma * torch.randn(eps.shape, generator=g)
    s = estimate_noise(eps, eps_q, timestep=17)
    n = eps.numel()
    # standard errors: k ≈ σ/√n, μ_c ≈ σ/√(n/3), σ² ≈ σ²·√(2/n); 5 standard errors
    assert abs(s.k - k) < 5 * sigma / math.sqrt(n)
    assert torch.allclose(torch.tensor(s.mu), mu, atol=5 * sigma / math.sqrt(n / 3))
    assert abs(s.var - sigma ** 2) < 5 * sigma ** 2 * math.sqrt(2 / n)
    assert s.timestep == 17 and s.samples == 32
    # the correction removes the correlated part and the bias: what is left is the noise
    assert s.snr_q_corrected > s.snr_q
    assert s.snr_q_corrected == pytest.approx(math.sqrt(eps.pow(2).sum() / (n * sigma ** 2 / (1 + s.k) ** 2)),
                                              rel=0.03)


def test_negative_correlation_is_clamped_to_zero():
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(8, 2, 8, 8, generator=g)
    s = estimate_noise(eps, 0.8 * eps + 0.01 * torch.randn(eps.shape, generator=g))
    assert s.k == 0.0
    a, b = s.affine()
    assert torch.all(a == 1.0)


def test_affine_is_the_papers_correction():
    s = StepNoise(5, 0.25, (0.1, -0.2), 0.01, 10.0, 12.0)
    a, b = s.affine()
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    got = a.view(2, 1, 1) * x + b.view(2, 1, 1)
    want = (x - torch.tensor([0.1, -0.2], dtype=torch.float64).view(2, 1, 1)) / 1.25
    assert torch.allclose(got, want)
    a0, b0 = s.affine(bias_correction=False)
    assert torch.all(b0 == 0) and torch.all(a0 == 0.8)


def test_mixed_precision_picks_the_smallest_width_above_snr_f():
    assert choose_bits({4: 3.0, 8: 30.0}, snr_forward=1.0) == 4
    assert choose_bits({4: 3.0, 8: 30.0}, snr_forward=5.0) == 8
    assert choose_bits({4: 3.0, 8: 30.0}, snr_forward=100.0) == 8     # none passes: the largest
    # a margin in dB on the ratios as compared: 20 dB = a factor of 10
    assert choose_bits({4: 3.0, 8: 30.0}, snr_forward=0.29, margin_db=20.0) == 4
    assert choose_bits({4: 3.0, 8: 30.0}, snr_forward=0.31, margin_db=20.0) == 8


def test_margin_moves_the_switch_to_earlier_noisier_steps():
    from diffusers import DDPMScheduler

    from qdcompile.noise import StepNoise
    from qdcompile.ptqd import plan_precisions, snr_f

    s = DDPMScheduler(num_train_timesteps=1000)
    s.set_timesteps(20)
    gen = torch.Generator().manual_seed(3)
    snr = {4: 2.0 + 8.0 * torch.rand(1, generator=gen).item(), 8: 40.0 + 40.0 * torch.rand(1, generator=gen).item()}
    stats = {b: [StepNoise(int(t), 0.0, (0.0,), 0.1, v, v) for t in s.timesteps] for b, v in snr.items()}
    plans = {m: plan_precisions(stats, s, m) for m in (0.0, 10.0, 30.0)}
    for m, plan in plans.items():
        assert [t for t, _ in plan] == [int(t) for t in s.timesteps]
        expect = [4 if snr[4] > snr_f(s, t) * 10 ** (m / 20) else 8 for t, _ in plan]
        assert [b for _, b in plan] == expect
        assert expect == sorted(expect)   # A4 first (noisy steps), then A8
    low = [sum(b == 4 for _, b in plans[m]) for m in (0.0, 10.0, 30.0)]
    assert low[0] > low[1] > low[2] > 0


# ---------------------------------------------------------------------------- c_t and VSC
def _ddpm(**kw):
    from diffusers import DDPMScheduler

    s = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **kw)
    s.set_timesteps(50)
    return s


def _ddim():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    s.set_timesteps(50)
    return s


@pytest.mark.parametrize("t", [980, 500, 40])
def test_ddpm_c_t_is_the_coefficient_of_eps_in_the_scheduler_step(t):
    s = _ddpm()
    x, eps, d = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    step = lambda e: s.step(e, t, x, generator=torch.Generator().manual_seed(0)).prev_sample.double()
    c_numeric = float(((step(eps + d) - step(eps)) * d.double()).sum() / d.double().pow(2).sum())
    assert c_numeric == pytest.approx(ddpm_c(s, t), rel=1e-4)
    beta = 1 - float(s.alphas_cumprod[t] / s.alphas_cumprod[t - 20])
    assert ddpm_sigma2(s, t) == pytest.approx(float(s._get_variance(t)), rel=1e-5)
    assert ddpm_c(s, t) == pytest.approx(-beta / math.sqrt(1 - beta) / math.sqrt(1 - float(s.alphas_cumprod[t])), rel=1e-5)


@pytest.mark.parametrize("t", [980, 500, 40])
def test_ddim_c_t_follows_the_step_for_its_noise_level(t):
    s, eta = _ddim(), 0.7
    x, eps, d = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    z = torch.randn(4, 1, 8, 8)
    step = lambda e: s.step(e, t, x, eta=eta, variance_noise=z).prev_sample.double()
    c_numeric = float(((step(eps + d) - step(eps)) * d.double()).sum() / d.double().pow(2).sum())
    assert c_numeric == pytest.approx(ddim_c(s, t, ddim_sigma2(s, t, eta)), rel=1e-4)


def _constant_step_variance(sched, unet_stub, t, k, mu, sigma_q, n=400_000, **step_kw):
    """Variance of x_{t-1} over quantization noise and the step's noise, with x_t and ε fixed:
    ε̂ = (1+k)ε + μ + σ_q·n, corrected by the stub's statistics when ``unet_stub`` is given."""
    g = torch.Generator().manual_seed(t)
    x = torch.full((1, 1, n), 0.3)
    eps = torch.full((1, 1, n), -0.4)
    eps_q = (1 + k) * eps + mu + sigma_q * torch.randn(x.shape, generator=g)
    if unet_stub is None:
        out = sched.step(eps_q, t, x, generator=g, **step_kw).prev_sample
    else:
        a, b = unet_stub.noise_at(t).affine()
        out = CorrectedScheduler(sched, unet_stub).step(a * eps_q + b, t, x, generator=g, **step_kw).prev_sample
    return float(out.double().var())


def _stub(k, mu, var):
    stats = StepNoise(0, k, (mu,), var, 1.0, 1.0)
    return SimpleNamespace(corrections=Corrections(), meta=SimpleNamespace(noise={8: [stats]}), corrects_in_sampler=False,
                           noise_at=lambda t: stats, host_timestep=lambda t: int(torch.as_tensor(t).reshape(-1)[0]),
                           advance_schedule=lambda: None, follow_schedule=lambda timesteps: None)


@pytest.mark.parametrize("t", [500, 100])
def test_vsc_keeps_the_ddpm_step_variance_at_the_schedule(t):
    k, mu = 0.1, 0.05
    sched = _ddpm()
    target = ddpm_sigma2(sched, t)
    # quantization noise worth 30% of the step's variance (after the 1/(1+k) correction)
    sigma_q = (1 + k) * math.sqrt(0.3 * target) / abs(ddpm_c(sched, t))
    corrected = _constant_step_variance(sched, _stub(k, mu, sigma_q ** 2), t, k, mu, sigma_q)
    plain = _constant_step_variance(sched, None, t, k, mu, sigma_q)
    assert corrected == pytest.approx(target, rel=0.01)
    assert plain > 1.05 * target       # without VSC the quantization noise adds variance
    s2, s2c = calibrated_sigma(sched, t, k, sigma_q ** 2)
    assert s2c < s2 == pytest.approx(target)


def test_vsc_keeps_the_ddim_step_variance_at_the_schedule():
    t, eta, k, mu = 500, 0.8, 0.05, -0.03
    sched = _ddim()
    target = ddim_sigma2(sched, t, eta)
    sigma_q = (1 + k) * math.sqrt(0.3 * target) / abs(ddim_c(sched, t, target))
    corrected = _constant_step_variance(sched, _stub(k, mu, sigma_q ** 2), t, k, mu, sigma_q, eta=eta)
    assert corrected == pytest.approx(target, rel=0.01)
    assert _constant_step_variance(sched, None, t, k, mu, sigma_q, eta=eta) > 1.05 * target


def test_vsc_cannot_absorb_more_than_the_schedule_and_skips_deterministic_steps():
    sched = _ddpm()
    assert calibrated_sigma(sched, 40, 0.0, 100.0)[1] == 0.0        # too much noise: σ' = 0
    assert calibrated_sigma(_ddim(), 500, 0.0, 0.01, eta=0.0) == (0.0, 0.0)   # DDIM η = 0
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        calibrated_sigma(EulerDiscreteScheduler(), 500, 0.0, 0.01)


# ---------------------------------------------------------------------------- calibrated model
_FAST = dict(recon_iters=8, act_lsq_iters=4, recon_batch_size=8, noise_samples=3)


# ---------------------------------------------------------------------------- the ε a clipping sampler uses
def _clipping(kind, **kw):
    from diffusers import DDIMScheduler, DDPMScheduler

    s = (DDPMScheduler if kind == "ddpm" else DDIMScheduler)(num_train_timesteps=1000, **kw)
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("kw", [{}, {"thresholding": True}, {"clip_sample_range": 0.5}])
def test_effective_eps_is_the_eps_the_step_uses(kw):
    """Feeding the DDPM step ``effective_eps`` instead of the U-Net output changes nothing; it
    differs from the output exactly where the scheduler clips x0."""
    s = _clipping("ddpm", **kw)
    t = int(s.timesteps[3])
    x, eps = torch.randn(4, 1, 8, 8), 1.5 * torch.randn(4, 1, 8, 8)
    eff = effective_eps(s, x, t, eps)
    run = lambda e: s.step(e, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.allclose(run(eff), run(eps), atol=1e-5)
    a = float(s.alphas_cumprod[t])
    x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    if not kw:
        clipped = x0.abs() > 1
        assert clipped.any() and (~clipped).any()
        assert torch.allclose(eff[~clipped], eps[~clipped], atol=1e-5)
        assert (eff[clipped] - eps[clipped]).abs().min() > 0
    # no clipping, or DDIM (its direction term keeps the raw ε): the output itself
    for other in (_ddpm(), _clipping("ddim")):
        assert torch.equal(effective_eps(other, x, t, eps), eps)


def test_bias_hidden_by_clipping_is_corrected_in_the_sampler_space():
    """Quantization error that only pushes already-clipped x0 further out is invisible to the
    sampler; error elsewhere is not. The output's channel mean has the sign of the first, the
    sampler-space mean that of the second: only the sampler-space correction brings x_{t-1}
    closer to FP's."""
    s = _clipping("ddpm")
    t = int(s.timesteps[4])
    a = float(s.alphas_cumprod[t])
    g = torch.Generator().manual_seed(0)
    # MNIST-like x0: background just above -1, strokes; FP predicts the true ε
    strokes = torch.rand(64, 1, 8, 8, generator=g) < 0.4
    x0 = torch.where(strokes, 0.3 + 0.5 * torch.rand(64, 1, 8, 8, generator=g), torch.tensor(-0.98))
    eps = torch.randn(64, 1, 8, 8, generator=g)
    x = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    # +0.8 on the background (pushes its x0 below -1: clipped away), -0.2 on strokes (brightens them)
    eps_q = eps + torch.where(strokes, -0.2, 0.8) + 0.02 * torch.randn(eps.shape, generator=g)
    out = estimate_noise(eps, eps_q, t)
    used = estimate_noise(effective_eps(s, x, t, eps), effective_eps(s, x, t, eps_q), t)
    assert out.mu[0] > 0.3 and used.mu[0] < -0.03   # opposite signs

    def prev(e):
        return s.step(e, t, x, generator=torch.Generator().manual_seed(3)).prev_sample

    def err(e):
        return float((prev(e) - prev(eps)).pow(2).mean())

    a_o, b_o = out.affine()
    a_s, b_s = used.affine()
    on_output = eps_q * a_o.float() + b_o.float()
    in_sampler = effective_eps(s, x, t, eps_q) * a_s.float() + b_s.float()
    assert err(on_output) > err(eps_q) > 2 * err(in_sampler)


def _rewrite_header(path, out, edit, version: str):
    """A copy of the metadata file ``path`` at ``out`` with its JSON header edited by ``edit`` and
    the given format version (an older or damaged file, for the readers' checks)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        header_meta = dict(f.metadata())
    header = json.loads(header_meta["header"])
    edit(header)
    save_file(load_file(str(path)), str(out), metadata={**header_meta, "header": json.dumps(header),
                                                        "format_version": version})
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    from tests.tiny_models import scheduler

    unet = tiny_unet2d(seed=5)
    meta = calibrate(unet, scheduler(), QuantRecipe.mixed(noise_space="sampler", **_FAST), num_samples=3,
                     num_inference_steps=6, progress=False, attach=False)
    path = meta.save(tmp_path_factory.mktemp("ptqd") / "tiny.mixed.qdiff")
    return unet, meta, path


def test_mixed_calibration_stores_variants_statistics_and_plan(mixed):
    unet, meta, path = mixed
    assert set(meta.precisions) == {4, 8} and meta.noise_layer == "conv_out"
    assert {b for _, b in meta.precision_plan} <= {4, 8} and len(meta.precision_plan) == 6
    for bits in (4, 8):
        assert len(meta.noise[bits]) == 6 and all(s.k >= 0 and s.var > 0 for s in meta.noise[bits])
    # A4 quantizers for every 4-bit-weight layer; the 8-bit first/last layers keep theirs
    assert "conv_in" not in meta.act_variants[4] and "conv_out" not in meta.act_variants[4]
    assert all(a.act_bits == 4 for acts in meta.act_variants[4].values() for a in acts)
    loaded = load_metadata(path)
    assert loaded.precision_plan == meta.precision_plan and loaded.noise == meta.noise
    assert loaded.act_variants == meta.act_variants


def test_noise_statistics_on_the_quantized_samplers_own_trajectories(mixed):
    from qdcompile.trajectory import TrajectoryRecorder
    from qdcompile.noise import eps_channels
    from qdcompile.ptqd import noise_statistics
    from qdcompile.sampling import sample
    from tests.tiny_models import scheduler

    _, fp_inputs, _ = mixed
    recipe = QuantRecipe.mixed(noise_inputs="quantized", noise_space="sampler", **_FAST)
    meta = calibrate(tiny_unet2d(seed=5), scheduler(), recipe, num_samples=3, num_inference_steps=6, progress=False,
                     attach=False)
    # the plan and the quantizers come from the same calibration; only the statistics' inputs differ
    assert meta.precision_plan == fp_inputs.precision_plan and meta.act_variants == fp_inputs.act_variants
    assert meta.calibration["noise"]["inputs"] == "quantized" and fp_inputs.calibration["noise"]["inputs"] == "fp"
    assert meta.noise != fp_inputs.noise
    # by hand: the uncorrected quantized sampler drives x_t; FP and quantized models are fed the same x_t
    unet = tiny_unet2d(seed=5)
    recorder = TrajectoryRecorder(3)
    sample(QuantizedUNet(unet, meta, backend="simulate", corrections=Corrections.none()), scheduler(), num_images=3,
           num_inference_steps=6, generator=torch.Generator().manual_seed(7919), callback=recorder, progress=False,
           to_image=False)
    expected = noise_statistics(unet, meta, recorder.finish(unet), eps_channels(unet), [None, 4], progress=False,
                                scheduler=scheduler(), spaces=["sampler"])["sampler"]   # the ε the DDPM step uses
    for bits in (4, 8):
        for got, want in zip(meta.noise[bits], expected[bits], strict=True):
            assert got.timestep == want.timestep and got.k == pytest.approx(want.k, abs=1e-6)
            assert got.mu == pytest.approx(want.mu, rel=1e-4, abs=1e-6) and got.var == pytest.approx(want.var, rel=1e-4)
    with pytest.raises(ValueError, match="noise_inputs"):
        QuantRecipe.mixed(noise_inputs="real")
    assert QuantRecipe.from_json(recipe.to_json()).noise_inputs == "quantized"


def test_sampler_space_corrections_run_in_the_scheduler_step(mixed):
    """With a clipping DDPM scheduler the statistics describe the ε its step uses; the U-Net output
    stays uncorrected and the scheduler step corrects the ε of the clipped x0."""
    from tests.tiny_models import scheduler

    unet, meta, path = mixed
    assert meta.noise_space == "sampler" and meta.calibration["noise"]["space"] == "sampler"
    assert load_metadata(path).noise_space == "sampler"
    corr = Corrections(True, True, False)
    q = QuantizedUNet(unet, meta, backend="simulate", corrections=corr)
    raw = QuantizedUNet(unet, meta, backend="simulate", corrections=Corrections.none())
    sched = scheduler()
    sched.set_timesteps(6)
    x = 2 * torch.randn(2, 1, 16, 16)
    for t in (int(sched.timesteps[0]), int(sched.timesteps[-2])):
        tt = torch.tensor(t)
        with torch.no_grad():
            out, ref = q(x, tt).sample, raw(x, tt).sample
        assert torch.equal(out, ref)
        a, b = meta.noise_at(q.bits_at(t), t).affine()
        want_eps = effective_eps(sched, x, t, ref) * a.float() + b.float()
        assert not torch.allclose(want_eps, ref * a.float() + b.float(), atol=1e-4)   # clipping matters here
        got = q.wrap_scheduler(sched).step(out, tt, x, generator=torch.Generator().manual_seed(2)).prev_sample
        want = sched.step(want_eps, tt, x, generator=torch.Generator().manual_seed(2)).prev_sample
        assert torch.allclose(got, want, atol=1e-5)
    assert "after its x0 clipping" in q.format_plan(sched, 6)


def test_metadata_noise_space_round_trip_and_older_files(mixed, previous_format, tmp_path):
    import dataclasses

    _, meta, _ = mixed
    path = previous_format[2]   # symmetric weights: a file older formats could have written

    def rewrite(fn, version):
        return _rewrite_header(path, tmp_path / f"edited-{version}.qdiff", fn, version)

    # a version-2 file (no noise_space) was corrected on the U-Net output
    assert load_metadata(rewrite(lambda h: h.pop("noise_space"), "2")).noise_space == "output"
    with pytest.raises(MetadataError, match="space 'latent'"):
        load_metadata(rewrite(lambda h: h.update(noise_space="latent"), "3"))
    out = dataclasses.replace(meta, noise_space="output").save(tmp_path / "out.qdiff")
    assert load_metadata(out).noise_space == "output"


# ---------------------------------------------------------------------------- the correction check
def _distance_to_fp(unet, meta, corrections, n, seed, steps=6):
    """Per image, the mean squared difference of the quantized sampler's result to FP's (same seeds), by hand."""
    from qdcompile.sampling import sample
    from tests.tiny_models import scheduler

    def run(model, sched):
        return sample(model, sched, num_images=n, num_inference_steps=steps, progress=False, to_image=False,
                      generator=torch.Generator().manual_seed(seed))

    q = QuantizedUNet(unet, meta, backend="simulate", corrections=corrections, mixed=True)
    return (run(q, q.wrap_scheduler(scheduler())) - run(unet, scheduler())).pow(2).flatten(1).mean(1).double()


def test_correction_check_drops_a_correction_only_if_it_clearly_moves_samples_away_from_fp(mixed):
    from qdcompile.ptqd import CHECK_SEED_OFFSET, CHECK_Z

    unet, meta, path = mixed
    check = meta.calibration["correction_check"]
    assert check["samples"] == 8 and check["seed"] == CHECK_SEED_OFFSET and check["steps"] == 6
    assert load_metadata(path).corrections == meta.corrections == check["kept"]
    assert [k for k, _ in check["mse_vs_fp"]][0] == "none"   # in the order tried
    d = dict(check["mse_vs_fp"])
    # the recorded distances and decisions are the sampler's, recomputed by hand
    base = _distance_to_fp(unet, meta, Corrections.none(), 8, check["seed"])
    assert d["none"] == pytest.approx(float(base.mean()), rel=1e-5)
    with_k = any(s.k > 0 for b in meta.noise for s in meta.noise[b])
    assert ("k" in d) == with_k   # k = 0 everywhere: the identity, not sampled
    k_kept = check["kept"]["correlated"]
    if with_k:
        d_k = _distance_to_fp(unet, meta, Corrections(True, False, False), 8, check["seed"])
        assert d["k"] == pytest.approx(float(d_k.mean()), rel=1e-5)
        if k_kept:
            base = d_k
    bias = _distance_to_fp(unet, meta, Corrections(k_kept, True, False), 8, check["seed"])
    label = "k+bias" if k_kept else "bias"
    assert d[label] == pytest.approx(float(bias.mean()), rel=1e-5)
    diff = bias - base
    change = check["changes"][-1]
    assert change["correction"] == "bias" and change["delta"] == pytest.approx(float(diff.mean()), rel=1e-4, abs=1e-9)
    assert change["se"] == pytest.approx(float(diff.std() / math.sqrt(8)), rel=1e-3)
    assert check["kept"]["bias"] == (not (diff.mean() > CHECK_Z * diff.std() / math.sqrt(8) and diff.mean() > 0))
    assert check["kept"]["variance"] and change["kept"] == check["kept"]["bias"]
    assert Corrections.default_for(meta) == Corrections(**check["kept"])
    assert QuantizedUNet(unet, meta, backend="simulate").corrections == Corrections(**check["kept"])


def test_correction_check_drops_statistics_that_push_samples_away_from_fp(mixed, caplog):
    """Statistics that do not describe the sampler's error (here: a large made-up bias) are
    caught: the bias correction is dropped from the default, with a warning; k stays."""
    import dataclasses
    import logging

    from qdcompile.ptqd import check_corrections
    from tests.tiny_models import scheduler

    unet, meta, _ = mixed
    wrong = {b: [dataclasses.replace(s, k=0.02, mu=(0.4,)) for s in steps] for b, steps in meta.noise.items()}
    bad = dataclasses.replace(meta, noise=wrong, corrections=None)
    seed = int(torch.randint(0, 10_000, ()))
    with caplog.at_level(logging.WARNING, logger="qdcompile.ptqd"):
        check = check_corrections(unet, scheduler(), bad, num_inference_steps=6, samples=4, seed=seed, progress=False)
    d = dict(check["mse_vs_fp"])
    assert d["k+bias"] > 2 * d["k"], d   # subtracting 0.4 from every ε moves every sample
    k_change = check["changes"][0]
    assert k_change["correction"] == "k" and k_change["kept"] == check["kept"]["correlated"]
    assert check["kept"]["bias"] is False and check["kept"]["variance"] is True
    assert check["changes"][-1] == {**check["changes"][-1], "correction": "bias", "kept": False}
    assert "the bias correction moved 4 validation samples further" in caplog.text
    assert d["k"] == pytest.approx(float(_distance_to_fp(unet, bad, Corrections(True, False, False), 4, seed).mean()),
                                   rel=1e-5)
    assert "dropped bias (+" in QuantizedUNet(unet, dataclasses.replace(bad, corrections=check["kept"],
                                                                        calibration={"correction_check": check}),
                                              backend="simulate").format_plan(scheduler(), 6)


def test_auto_noise_space_keeps_the_space_whose_checked_corrections_stay_closest_to_fp(mixed):
    """``noise_space="auto"`` (the default): with a clipping scheduler both spaces' statistics come
    from the same U-Net evaluations, the check runs on each, and the space that leaves the
    validation samples closer to FP's is stored, with the comparison."""
    from qdcompile.pipeline import format_correction_check
    from qdcompile.ptqd import choose_space
    from tests.tiny_models import scheduler

    unet, sampler_only, _ = mixed

    def run(space):
        return calibrate(tiny_unet2d(seed=5), scheduler(), QuantRecipe.mixed(noise_space=space, **_FAST),
                         num_samples=3, num_inference_steps=6, progress=False, attach=False)

    assert QuantRecipe.mixed().noise_space == "auto"
    auto = run("auto")
    single = {"sampler": sampler_only, "output": run("output")}
    assert auto.calibration["noise"]["spaces_estimated"] == ["sampler", "output"]
    check = auto.calibration["correction_check"]
    choice = check["space_choice"]
    per = {sp: torch.tensor(m.calibration["correction_check"]["kept_per_image"], dtype=torch.float64)
           for sp, m in single.items()}
    for sp, m in single.items():   # each space as a calibration in that space alone computes it
        assert choice["mse_vs_fp"][sp] == pytest.approx(float(per[sp].mean()), rel=1e-6)
        assert choice["corrections"][sp] == Corrections(**m.calibration["correction_check"]["kept"]).label()
    chosen = min(per, key=lambda sp: float(per[sp].mean()))
    assert choice["chosen"] == chosen == auto.noise_space == auto.calibration["noise"]["space"]
    assert auto.noise == single[chosen].noise and auto.corrections == single[chosen].corrections
    assert {k: v for k, v in check.items() if k != "space_choice"} == single[chosen].calibration["correction_check"]
    assert single["output"].noise != single["sampler"].noise   # the tiny model clips: two different estimates
    diff = per["output"] - per["sampler"]
    assert choice["delta"] == pytest.approx(float(diff.mean()), rel=1e-6, abs=1e-12)
    assert choice["se"] == pytest.approx(float(diff.std() / math.sqrt(len(diff))), rel=1e-6)
    assert f"{chosen} space" in format_correction_check(check) and " chosen (" in format_correction_check(check)

    def rec(v):
        return {"kept_per_image": v, "kept": {"correlated": True, "bias": False, "variance": True}}

    assert choose_space({"output": rec([2.0, 1.0]), "sampler": rec([1.0, 2.0])})[0] == "sampler"   # a tie
    got, record = choose_space({"sampler": rec([1.0, 2.0]), "output": rec([1.2, 1.6])})
    assert got == "output" and record["delta"] == pytest.approx(-0.1) and record["corrections"]["output"] == "k+VSC"


def test_correction_check_off_and_metadata_field(mixed, previous_format, tmp_path):
    import dataclasses

    from tests.tiny_models import scheduler

    unet, meta, _ = mixed
    path = previous_format[2]   # symmetric weights: a file older formats could have written
    off = calibrate(tiny_unet2d(seed=5), scheduler(), QuantRecipe.mixed(check_samples=0, **_FAST), num_samples=3,
                    num_inference_steps=6, progress=False, attach=False)
    assert off.corrections is None and "correction_check" not in off.calibration
    assert off.noise == meta.noise   # the check changes nothing else
    assert off.noise_space == "sampler" and off.recipe.noise_space == "auto"   # nothing to choose by: the step's ε
    assert Corrections.default_for(off) == Corrections()
    with pytest.raises(ValueError, match="check_samples"):
        QuantRecipe.mixed(check_samples=-1)

    def rewrite(fn, version):
        return _rewrite_header(path, tmp_path / f"edited-{version}.qdiff", fn, version)

    # a version-3 file (no check) applies every correction, as it did
    old = load_metadata(rewrite(lambda h: h.pop("corrections"), "3"))
    assert old.corrections is None and Corrections.default_for(old) == Corrections()
    with pytest.raises(MetadataError, match="default PTQD corrections"):
        load_metadata(rewrite(lambda h: h.update(corrections={"bias": "yes"}), "4"))
    none = dataclasses.replace(meta, corrections={"correlated": False, "bias": False, "variance": False})
    assert Corrections.default_for(load_metadata(none.save(tmp_path / "none.qdiff"))) == Corrections.none()


def test_metadata_rejects_a_plan_with_an_unknown_precision(mixed, tmp_path):
    import dataclasses

    _, meta, _ = mixed
    bad = dataclasses.replace(meta, precision_plan=[(999, 4), (0, 6)])
    path = bad.save(tmp_path / "bad.qdiff")
    with pytest.raises(MetadataError, match="A6"):
        load_metadata(path)


def test_fused_correction_matches_the_elementwise_correction(mixed):
    """The compiled model folds 1/(1+k) and the bias into conv_out's epilogue; the simulation
    applies them after the U-Net. Same metadata, same step: same ε (up to float rounding)."""
    import dataclasses

    unet, meta, _ = mixed
    meta = dataclasses.replace(meta, noise_space="output")   # corrected on the U-Net output
    fast = QuantizedUNet(unet, meta, backend="qdiff", corrections=Corrections())
    sim = QuantizedUNet(unet, meta, backend="simulate", corrections=Corrections())
    uncorrected = QuantizedUNet(unet, meta, backend="simulate", corrections=Corrections.none())
    x = torch.randn(2, 1, 16, 16)
    for t, bits in (meta.precision_plan[0], meta.precision_plan[-1]):
        tt = torch.tensor(t)
        with torch.no_grad():
            got, want, raw = fast(x, tt).sample, sim(x, tt).sample, uncorrected(x, tt).sample
            fp = unet(x, tt).sample
        assert fast.trace[-1] == (t, bits)
        a, b = meta.noise_at(bits, t).affine()
        assert rel(want, a.float() * raw + b.float()) < 1e-6
        # integer kernels vs fake-quant: float-rounding level, or (a few code flips) far below
        # the quantization error itself (see tests/equivalence.py)
        assert rel(got, want) < max(1e-4, 0.2 * rel(want, fp)), (t, bits)
    assert fast._fused is not None     # the compiled model applies it in conv_out's epilogue


def test_fused_correction_is_rewritten_per_step_and_follows_reattached_metadata(mixed):
    """Large, known corrections: the compiled output is (raw − μ)/(1 + k) for each step's own
    statistics, switching between steps without recompiling; re-attaching other metadata to
    the same model is picked up (not the graph compiled for the old one)."""
    import dataclasses

    from qdcompile.passes.backend import compile_count

    unet, meta, _ = mixed
    (t0, b0), (t1, b1) = meta.precision_plan[0], meta.precision_plan[-1]
    known = {b: [StepNoise(t0, 0.5, (0.3,), 0.01, 1.0, 1.0), StepNoise(t1, 0.0, (-0.2,), 0.01, 1.0, 1.0)]
             for b in meta.precisions}
    big = dataclasses.replace(meta, noise=known, noise_space="output")
    fast = QuantizedUNet(unet, big, backend="qdiff", corrections=Corrections())
    raw = QuantizedUNet(unet, big, backend="qdiff", corrections=Corrections.none())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for t, want in ((t0, lambda r: (r - 0.3) / 1.5), (t1, lambda r: r + 0.2), (t0, lambda r: (r - 0.3) / 1.5)):
            r = raw(x, torch.tensor(t)).sample
            n = compile_count()
            got = fast(x, torch.tensor(t)).sample
            assert compile_count() == n
            assert rel(got, want(r)) < 1e-5, t


def test_sampler_never_recompiles_after_warmup(mixed):
    from diffusers import DDPMScheduler

    from qdcompile.passes.backend import compile_count

    unet, meta, _ = mixed
    torch._dynamo.reset()
    q = QuantizedUNet(unet, meta, backend="qdiff")
    sched = DDPMScheduler(num_train_timesteps=1000)
    start = compile_count()
    q.warmup(sched, 6, batch_size=2)
    before = (compile_count(), torch._dynamo.utils.counters["stats"]["unique_graphs"])
    precisions = len({b for _, b in meta.precision_plan})
    assert before[0] - start >= precisions    # each precision's variant compiled during warm-up
    q.sample(sched, num_images=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), progress=False)
    assert (compile_count(), torch._dynamo.utils.counters["stats"]["unique_graphs"]) == before
    assert {b for _, b in q.trace} == {b for _, b in meta.precision_plan}


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_pipeline_path_gives_the_explicit_samplers_images(mixed, kind):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    unet, meta, _ = mixed
    if kind == "ddpm":
        sched = DDPMScheduler(num_train_timesteps=1000)
        pipe = DDPMPipeline(unet=unet, scheduler=sched)
        call = dict(num_inference_steps=6)
        step_kw: dict = {}
    else:
        sched = DDIMScheduler(num_train_timesteps=1000)
        pipe = DDIMPipeline(unet=unet, scheduler=sched)
        call = dict(num_inference_steps=6, eta=0.5)
        step_kw = {"eta": 0.5}
    pipe.set_progress_bar_config(disable=True)
    quantize_pipeline(pipe, meta, backend="simulate")
    assert isinstance(pipe.unet, QuantizedUNet) and isinstance(pipe.scheduler, CorrectedScheduler)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(4), output_type="np", **call).images
    q = QuantizedUNet(unet, meta, backend="simulate")
    ref = q.sample(sched, num_images=2, num_inference_steps=6, generator=torch.Generator().manual_seed(4),
                   progress=False, step_kwargs=step_kw)
    assert torch.allclose(torch.from_numpy(images).permute(0, 3, 1, 2), ref, atol=1e-6)
    assert pipe.scheduler.last_sigma2 is None or pipe.scheduler.last_sigma2[1] <= pipe.scheduler.last_sigma2[0]


def test_format_plan_states_the_rule_and_counts(mixed):
    import dataclasses

    from tests.tiny_models import scheduler

    unet, meta, _ = mixed
    text = QuantizedUNet(unet, meta, backend="simulate").format_plan(scheduler(), 6)
    counts = {b: sum(v == b for _, v in meta.precision_plan) for b in (4, 8)}
    assert "rule SNR_Q > SNR_F (PTQD)" in text
    assert ", ".join(f"A{b}: {n} steps" for b, n in counts.items() if n) in text
    margin = dataclasses.replace(meta, recipe=dataclasses.replace(meta.recipe, mixed_margin_db=20.0))
    assert "rule SNR_Q > SNR_F * 10^(20/20)" in QuantizedUNet(unet, margin, backend="simulate").format_plan(scheduler(), 6)


def test_corrections_need_statistics(mixed):
    unet, meta, _ = mixed
    import dataclasses

    plain = dataclasses.replace(meta, noise={}, precision_plan=[], act_variants={}, corrections=None)
    with pytest.raises(MetadataError, match="noise statistics"):
        QuantizedUNet(unet, plain, backend="simulate", corrections=Corrections())
    with pytest.raises(MetadataError, match="precision plan"):
        QuantizedUNet(unet, plain, backend="simulate", mixed=True)
    assert QuantizedUNet(unet, plain, backend="simulate").corrections == Corrections.none()
    # a kept-corrections record without the statistics it refers to is itself malformed
    with pytest.raises(MetadataError, match="need noise statistics"):
        QuantizedUNet(unet, dataclasses.replace(plain, corrections=meta.corrections or {"correlated": True,
                      "bias": True, "variance": True}), backend="simulate")


def test_mixed_recipe_validation():
    r = QuantRecipe.mixed()
    assert r.weight_bits == 4 and r.act_bits == 8 and r.act_bits_mixed == (4, 8) and r.noise_correction
    assert QuantRecipe.from_json(r.to_json()) == r
    with pytest.raises(ValueError, match="act_bits=8"):
        QuantRecipe.mixed(act_bits=4)
    with pytest.raises(ValueError, match="2 distinct widths"):
        QuantRecipe.mixed(act_bits_mixed=(8,))
    assert QuantRecipe.from_json(QuantRecipe.mixed(mixed_margin_db=20).to_json()).mixed_margin_db == 20.0
    for bad in (float("inf"), "20", True):
        with pytest.raises(ValueError, match="mixed_margin_db"):
            QuantRecipe.mixed(mixed_margin_db=bad)


def test_conditional_unet_called_the_way_stable_diffusion_calls_it():
    """StableDiffusionPipeline (run for real in test_sd_pipeline.py) calls
    ``unet(latents, t, encoder_hidden_states=..., timestep_cond=None, cross_attention_kwargs=None,
    added_cond_kwargs=None, return_dict=False)[0]`` and inspects ``scheduler.step`` for
    ``eta``/``generator``; the quantized sampler keeps both contracts."""
    import inspect

    from diffusers import DDIMScheduler

    from tests.tiny_models import tiny_unet2d_condition

    unet = tiny_unet2d_condition(seed=2)
    emb = torch.randn(1, 5, 24)
    sd_scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)   # as Stable Diffusion's config
    meta = calibrate(unet, sd_scheduler, QuantRecipe.ptqd(**_FAST), num_samples=2, num_inference_steps=4,
                     sample_kwargs={"encoder_hidden_states": emb}, progress=False, attach=False)
    assert meta.noise_space == "output"   # nothing clips the latents' x0: corrected in conv_out
    q = QuantizedUNet(unet, meta, backend="simulate", corrections=Corrections())
    raw = QuantizedUNet(unet, meta, backend="simulate", corrections=Corrections.none())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    kw = dict(encoder_hidden_states=emb.expand(2, -1, -1), timestep_cond=None, cross_attention_kwargs=None,
              added_cond_kwargs=None, return_dict=False)
    with torch.no_grad():
        out, ref = q(x, t, **kw), raw(x, t, **kw)
    assert isinstance(out, tuple) and out[0].shape == x.shape
    a, b = meta.noise_at(None, 500).affine()
    assert torch.allclose(out[0], a.float().view(1, -1, 1, 1) * ref[0] + b.float().view(1, -1, 1, 1), atol=1e-6)
    params = inspect.signature(q.wrap_scheduler(DDIMScheduler()).step).parameters
    assert "eta" in params and "generator" in params


def test_interrupted_ptqd_stage_resumes_from_the_checkpoint(tmp_path, monkeypatch):
    import qdcompile.ptqd as ptqd
    from tests.tiny_models import scheduler

    def run(**kw):
        return calibrate(tiny_unet2d(seed=6), scheduler(), QuantRecipe.mixed(**_FAST), num_samples=2,
                         num_inference_steps=4, progress=False, attach=False, seed=1, **kw)

    full = run()
    real_stats, real_acts = ptqd.noise_statistics, ptqd.calibrate_activations
    calls = {"stats": 0, "acts": 0}

    class Interrupted(Exception):
        pass

    def stats_then_stop(*a, **kw):
        calls["stats"] += 1
        if calls["stats"] == 2:   # the final statistics, after the plan and every re-calibration
            raise Interrupted("injected in the last PTQD stage")
        return real_stats(*a, **kw)

    ckpt = tmp_path / "mixed.ckpt"
    monkeypatch.setattr(ptqd, "noise_statistics", stats_then_stop)
    with pytest.raises(Interrupted):
        run(checkpoint=ckpt)
    saved = torch.load(ckpt, weights_only=True)["ptqd"]
    assert {"acts_all_A4", "plan_stats"} <= set(saved) and "noise" not in saved

    def counting_acts(*a, **kw):
        calls["acts"] += 1
        return real_acts(*a, **kw)

    calls["stats"] = 10
    monkeypatch.setattr(ptqd, "noise_statistics", stats_then_stop)
    monkeypatch.setattr(ptqd, "calibrate_activations", counting_acts)
    resumed = run(checkpoint=ckpt)
    assert calls == {"stats": 11, "acts": 0}   # only the unfinished stage ran again
    assert resumed.precision_plan == full.precision_plan and resumed.noise == full.noise
    assert resumed.act_variants == full.act_variants
    assert all(resumed.layers[n].act_quants() == r.act_quants() for n, r in full.layers.items())
    assert resumed.corrections == full.corrections
    assert resumed.calibration["correction_check"] == full.calibration["correction_check"]
