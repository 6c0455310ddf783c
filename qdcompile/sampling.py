"""Sampling loop over a diffusers scheduler (``set_timesteps`` / ``timesteps`` / ``step``).

Works with a plain U-Net, a ``torch.compile``-d one (``backend="qdiff"`` or Inductor) and
anything that returns an object with ``.sample`` or a tensor. Time steps are always passed
as tensors, so a compiled model does not recompile per step.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

StepCallback = Callable[[int, torch.Tensor, torch.Tensor, dict[str, Any]], None]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The original module behind a ``torch.compile`` wrapper."""
    return getattr(model, "_orig_mod", model)


def require_unet(model: torch.nn.Module, caller: str) -> torch.nn.Module:
    """The diffusers U-Net behind ``model``; a clear ``TypeError`` for anything else (the sampler
    and the calibration read its config: input channels and sample size)."""
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    if not isinstance(base, torch.nn.Module) or cfg is None or not hasattr(cfg, "in_channels") \
            or not hasattr(cfg, "sample_size"):
        raise TypeError(f"qdcompile.{caller} expects a diffusers UNet2DModel/UNet2DConditionModel (a module with a "
                        f"config giving in_channels and sample_size), got {type(base).__name__}; for other modules "
                        "use qdcompile.attach and call the compiled module yourself")
    return base


def model_sample_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    cfg = require_unet(model, "sample").config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return cfg.in_channels, h, w


def batch_kwargs(sample_kwargs: Optional[dict[str, Any]], start: int, stop: int, total: int) -> dict[str, Any]:
    """Slice the extra U-Net arguments for images ``start:stop`` of ``total``.

    A tensor whose first dimension is 1 is broadcast to the batch; one whose first
    dimension is ``total`` is sliced; anything else is an error naming the argument.
    """
    out: dict[str, Any] = {}
    for key, value in (sample_kwargs or {}).items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] == 1:
                value = value.expand(stop - start, *value.shape[1:])
            elif value.shape[0] == total:
                value = value[start:stop]
            else:
                raise ValueError(f"sample_kwargs[{key!r}] has batch size {value.shape[0]}; expected 1 (broadcast) "
                                 f"or {total} (one per image)")
        out[key] = value
    return out


class GuidedUNet(torch.nn.Module):
    """Classifier-free guidance around a conditional U-Net: ``model(x, t, **cond)`` returns the
    guided ε the sampler uses, ``ε_u + g·(ε_c − ε_u)``, from one batched call of ``unet`` on
    ``[x, x]`` with ``[uncond, cond]`` (as diffusers' Stable Diffusion pipeline does).

    ``uncond_kwargs``: the unconditional U-Net arguments (e.g. the empty prompt's
    ``encoder_hidden_states``), batch 1 (broadcast) or the call's batch. ``unwrap`` gives the
    U-Net inside, so simulation and attachment act on its layers."""

    def __init__(self, unet: torch.nn.Module, guidance_scale: float, uncond_kwargs: dict[str, Any]):
        super().__init__()
        if not uncond_kwargs:
            raise ValueError("classifier-free guidance needs the unconditional U-Net arguments (uncond_kwargs, e.g. "
                             "{'encoder_hidden_states': <empty prompt's embeddings>})")
        self.__dict__["inner"] = unet   # not a submodule: the U-Net stays the caller's
        self.guidance_scale, self.uncond_kwargs = float(guidance_scale), dict(uncond_kwargs)

    @property
    def _orig_mod(self) -> torch.nn.Module:
        return unwrap(self.inner)

    @property
    def config(self):
        return self._orig_mod.config

    def rewrap(self, unet: torch.nn.Module) -> "GuidedUNet":
        """The same guidance around another model (e.g. the quantized sampler of this U-Net)."""
        return GuidedUNet(unet, self.guidance_scale, self.uncond_kwargs)

    def forward(self, sample: torch.Tensor, timestep, **cond):
        n = sample.shape[0]
        if set(cond) != set(self.uncond_kwargs):
            raise ValueError(f"GuidedUNet: conditional arguments {sorted(cond)} and unconditional ones "
                             f"{sorted(self.uncond_kwargs)} must name the same U-Net arguments")
        both = {}
        for k, c in cond.items():
            u = self.uncond_kwargs[k]
            if torch.is_tensor(c):
                u = u.to(c.device, c.dtype)
                u = u.expand(n, *u.shape[1:]) if u.shape[0] == 1 else u
                c = c.expand(n, *c.shape[1:]) if c.shape[0] == 1 else c
                both[k] = torch.cat([u, c])
            else:
                both[k] = c
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        t = t[0] if t.numel() == 1 else torch.cat([t, t])   # per-image time steps: the same for both halves
        eps = call_unet(self.inner, torch.cat([sample, sample]), t, both)
        e_u, e_c = eps.chunk(2)
        return e_u + self.guidance_scale * (e_c - e_u)


def call_unet(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = model(x, t.expand(x.shape[0]), **kwargs)
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)


@torch.no_grad()
def sample(model: torch.nn.Module, scheduler, num_images: int = 16, num_inference_steps: int = 50,
           generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None,
           sample_kwargs: Optional[dict[str, Any]] = None, progress: bool = True,
           callback: Optional[StepCallback] = None, to_image: Optional[bool] = None,
           dtype: Optional[torch.dtype] = None, step_kwargs: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """Run the reverse diffusion from Gaussian noise; return ``[num_images, C, H, W]``.

    ``to_image`` (default: True for pixel-space ``UNet2DModel``) maps the result from
    [-1, 1] to [0, 1] and clamps; latent models return raw latents. ``callback(step,
    t, x_t, kwargs)`` is called before each U-Net evaluation (calibration uses it).
    ``step_kwargs`` go to every ``scheduler.step`` call (e.g. ``{"eta": 0.5}`` for DDIM).
    """
    if num_images < 1 or num_inference_steps < 1:
        raise ValueError(f"num_images and num_inference_steps must be >= 1, got {num_images}, {num_inference_steps}")
    base = require_unet(model, "sample")
    device = next(base.parameters()).device
    dtype = dtype or next(base.parameters()).dtype
    if to_image is None:
        to_image = type(base).__name__ == "UNet2DModel"
    c, h, w = model_sample_shape(model)
    batch_size = batch_size or num_images
    results = []
    sched = copy.deepcopy(scheduler)
    for start in range(0, num_images, batch_size):
        stop = min(num_images, start + batch_size)
        kwargs = batch_kwargs(sample_kwargs, start, stop, num_images)
        sched.set_timesteps(num_inference_steps, device=device)
        x = torch.randn((stop - start, c, h, w), generator=generator, dtype=torch.float32,
                        device=generator.device if generator is not None else device).to(device)
        x = x * sched.init_noise_sigma
        steps = tqdm(sched.timesteps, desc=f"sampling {start}-{stop}", disable=not progress, leave=False)
        for i, t in enumerate(steps):
            model_in = sched.scale_model_input(x, t).to(dtype)
            if callback is not None:
                callback(i, t, model_in, kwargs)
            eps = call_unet(model, model_in, t.to(device), kwargs)
            x = sched.step(eps.float(), t, x, generator=generator, **(step_kwargs or {})).prev_sample
        results.append(x.float())
    out = torch.cat(results)
    return ((out / 2 + 0.5).clamp(0, 1)) if to_image else out
