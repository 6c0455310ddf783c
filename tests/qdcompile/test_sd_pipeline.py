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
    out = pipe(prompt, num_inference_steps=5, guidance_scale=3.0, eta=0.5, generator=torch.Generator().manual_seed(2),
               output_type="latent").images
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
