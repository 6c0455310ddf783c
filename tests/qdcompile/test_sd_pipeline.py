"""A real ``StableDiffusionPipeline`` (tiny random CLIP text encoder, VAE and conditional
U-Net; a word-level CLIP tokenizer written on the fly) quantized with
``quantize_pipeline``: ``pipe(prompt)`` must run the quantized U-Net per the precision plan,
with PTQD's corrections and DDIM variance calibration, and give exactly the latents of an
explicit classifier-free-guidance loop over the same quantized U-Net and corrected scheduler."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from qdcompile import QuantRecipe, calibrate, quantize_pipeline  # noqa: E402
from qdcompile.pipeline import CorrectedScheduler, QuantizedUNet  # noqa: E402

_FAST = dict(recon_iters=6, act_lsq_iters=3, recon_batch_size=8, noise_samples=3)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from tests.tiny_models import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path_factory.mktemp("clip"))
    with torch.no_grad():
        emb, _ = pipe.encode_prompt("a photo of a red cat", "cpu", 1, False)
    # mixed: A4/A8 per step, PTQD statistics; the calibration trajectories use the prompt's embeddings
    meta = calibrate(pipe.unet, pipe.scheduler, QuantRecipe.mixed(**_FAST), num_samples=3, num_inference_steps=5,
                     sample_kwargs={"encoder_hidden_states": emb}, progress=False, attach=False)
    return pipe, meta


def test_stable_diffusion_pipeline_runs_the_quantized_sampler(sd):
    from diffusers.utils.torch_utils import randn_tensor

    pipe, meta = sd
    fp = pipe("a photo of a red cat", num_inference_steps=5, guidance_scale=3.0, eta=0.5,
              generator=torch.Generator().manual_seed(2), output_type="latent").images
    quantize_pipeline(pipe, meta, backend="simulate")
    q, sched = pipe.unet, pipe.scheduler
    assert isinstance(q, QuantizedUNet) and isinstance(sched, CorrectedScheduler) and q.corrections.any
    q.trace.clear()
    prompt = "a photo of a red cat"
    with pytest.warns(UserWarning, match="guidance_scale=3, but the PTQD corrections were estimated on the unguided"):
        out = pipe(prompt, num_inference_steps=5, guidance_scale=3.0, eta=0.5,
                   generator=torch.Generator().manual_seed(2), output_type="latent").images
    # every U-Net call ran at the plan's precision (CFG: one batched call per step)
    sched.set_timesteps(5)
    steps = [int(t) for t in sched.timesteps]
    assert [t for t, _ in q.trace] == steps
    assert [b for _, b in q.trace] == [meta.bits_at(t) for t in steps]

    # the explicit loop: same embeddings, same noise, classifier-free guidance, corrected DDIM steps
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
        g = torch.Generator().manual_seed(2)
        x = randn_tensor(out.shape, generator=g, dtype=out.dtype) * sched.init_noise_sigma
        sigmas = []
        for t in sched.timesteps:
            eps = q(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + 3.0 * (e_c - e_u), t, x, eta=0.5, generator=g).prev_sample
            sigmas.append(sched.last_sigma2)
    assert torch.allclose(out, x, atol=1e-5)
    assert not torch.allclose(out, fp, atol=1e-3)   # the quantized sampler really ran
    # VSC: every stochastic step drew less noise than the schedule's (the last DDIM step has none)
    assert all(s is not None and s[1] < s[0] for s in sigmas[:-1]) and sigmas[-1] is None

    images = pipe(prompt, num_inference_steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(2),
                  output_type="np").images   # through the VAE decoder, DDIM eta = 0 (k and bias only)
    assert images.shape == (1, 16, 16, 3) and (0 <= images).all() and (images <= 1).all()


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    from tests.tiny_models import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path_factory.mktemp("clip-guided"))
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a photo of a red cat", "cpu", 1, True)
    kw = dict(sample_kwargs={"encoder_hidden_states": cond}, uncond_kwargs={"encoder_hidden_states": uncond})
    meta = calibrate(pipe.unet, pipe.scheduler, QuantRecipe.ptqd(**_FAST, check_samples=2), num_samples=3,
                     num_inference_steps=5, guidance_scale=3.0, progress=False, attach=False, **kw)
    return pipe, meta, kw


def test_guided_calibration_takes_the_statistics_on_the_guided_eps(guided):
    from qdcompile.trajectory import TrajectoryRecorder
    from qdcompile.ptqd import estimate_noise
    from qdcompile.sampling import GuidedUNet, call_unet, sample
    from qdcompile.simulate import simulate

    pipe, meta, kw = guided
    assert meta.calibration["guidance_scale"] == 3.0
    # the calibration set holds both halves of every guided call
    assert meta.calibration["calib_set_size"] == 2 * 3 * 5
    assert meta.noise_space == "sampler"   # DDIM without clipping: corrected in the step, on the guided ε

    # the statistics are PTQD's estimates on the guided ε along guided FP trajectories
    unet = pipe.unet
    fp = GuidedUNet(unet, 3.0, kw["uncond_kwargs"])
    rec = TrajectoryRecorder(meta.recipe.noise_samples)
    sample(fp, pipe.scheduler, num_images=meta.recipe.noise_samples, num_inference_steps=5,
           generator=torch.Generator().manual_seed(meta.calibration["noise"]["seed"]),
           sample_kwargs=kw["sample_kwargs"], progress=False, callback=rec, to_image=False)
    traj = rec.finish(fp)
    stored = meta.noise[meta.default_act_bits]
    assert len(stored) == len(traj.steps) == 5
    for s, st in zip(traj.steps, stored):
        with torch.no_grad(), simulate(unet, meta):
            guided_q = call_unet(fp, s.x, s.timestep, s.kwargs)
            est = estimate_noise(s.eps, guided_q, int(s.timestep))
            assert st.timestep == int(s.timestep)
            assert st.k == pytest.approx(est.k, rel=1e-4, abs=1e-7)
            assert st.mu == pytest.approx(est.mu, rel=1e-4, abs=1e-7)
            assert st.var == pytest.approx(est.var, rel=1e-4, abs=1e-9)
        # … and not those of the conditional output alone
        cond_only = estimate_noise(_cond(unet, s, None), _cond(unet, s, meta), 0)
        assert abs(cond_only.k - st.k) > 1e-6 or max(abs(a - b) for a, b in zip(cond_only.mu, st.mu)) > 1e-6


def _cond(unet, step, simulate_meta):
    """The conditional U-Net output alone (FP, or simulated with ``simulate_meta``)."""
    import contextlib

    from qdcompile.sampling import call_unet
    from qdcompile.simulate import simulate

    with torch.no_grad(), (simulate(unet, simulate_meta) if simulate_meta is not None else contextlib.nullcontext()):
        return call_unet(unet, step.x, step.timestep, step.kwargs)


def test_quantize_pipeline_corrects_the_guided_eps_in_the_step_and_warns_on_another_scale(guided):
    import copy
    import warnings

    from qdcompile.pipeline import Corrections

    pipe, meta, kw = guided
    pipe = copy.copy(pipe)
    inner = copy.deepcopy(pipe.scheduler)
    quantize_pipeline(pipe, meta, backend="simulate")
    q = pipe.unet
    assert q.corrects_in_sampler and (q.corrections.correlated or q.corrections.bias)
    prompt = "a photo of a red cat"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the calibrated scale: no warning
        out = pipe(prompt, num_inference_steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(4),
                   output_type="latent").images
    # explicit loop: uncorrected quantized halves → guided ε → k/bias correction → plain DDIM step
    raw = QuantizedUNet(q._base, meta, backend="simulate", corrections=Corrections.none())
    cond, uncond = kw["sample_kwargs"]["encoder_hidden_states"], kw["uncond_kwargs"]["encoder_hidden_states"]
    from diffusers.utils.torch_utils import randn_tensor

    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        x = randn_tensor(out.shape, generator=g, dtype=out.dtype) * inner.init_noise_sigma
        inner.set_timesteps(5)
        for t in inner.timesteps:
            e_u, e_c = raw(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            a, b = q.affine_at(int(t))
            eps = ((e_u + 3.0 * (e_c - e_u)) * a.view(1, -1, 1, 1).float() + b.view(1, -1, 1, 1).float())
            x = inner.step(eps, t, x, generator=g).prev_sample
    assert torch.allclose(out, x, atol=1e-5)
    with pytest.warns(UserWarning, match=r"guidance_scale=5, .*guided ε at guidance scale 3"):
        pipe(prompt, num_inference_steps=2, guidance_scale=5.0, output_type="latent")
