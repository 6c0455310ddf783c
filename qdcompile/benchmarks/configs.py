"""U-Net configurations the benchmarks build (SD 1.5, SDXL, the reference MNIST model, a tiny one) and
their inputs; models are built on the ``meta`` device when no weights are needed."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..reference_models import MNIST_UNET_CONFIG

# Written out here (no hub access). Values are the published diffusers configs.

SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)


SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)


# LDM-4 ImageNet 256² (CompVis latent-diffusion configs/latent-diffusion/cin256-v2.yaml), as the
# equivalent diffusers UNet2DConditionModel: model_channels 192, channel_mult (1, 2, 3, 5),
# 2 res blocks, SpatialTransformer (depth 1, one head) at downsampling factors 2/4/8, class
# conditioning through cross-attention on a 512-d class embedding (1 token; the embedding
# table belongs to the cond stage, not to the U-Net). Parameter count: 400,920,579.
LDM4_CIN256_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(192, 384, 576, 960),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=512, attention_head_dim=1, norm_num_groups=32,
)


# Tiny U-Net for CPU smoke runs when the shipped reference model's weights are missing.
TINY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


def _mnist_config() -> dict[str, Any]:
    return dict(MNIST_UNET_CONFIG)


# name -> (diffusers class, config factory, text tokens for encoder_hidden_states, description)
UNET_CONFIGS: dict[str, tuple[str, Callable[[], dict[str, Any]], int, str]] = {
    "ldm4-imagenet": ("UNet2DConditionModel", lambda: dict(LDM4_CIN256_UNET_CONFIG), 1,
                      "LDM-4 ImageNet 256² (cin256-v2) U-Net, 64² latent, 1 class token"),
    "sd15": ("UNet2DConditionModel", lambda: dict(SD15_UNET_CONFIG), 77, "Stable Diffusion 1.5 U-Net, 64² latent"),
    "sdxl": ("UNet2DConditionModel", lambda: dict(SDXL_UNET_CONFIG), 77, "SDXL base U-Net, 128² latent"),
    "mnist": ("UNet2DModel", _mnist_config, 0, "shipped MNIST reference U-Net config, 28²"),
    "tiny": ("UNet2DModel", lambda: dict(TINY_UNET_CONFIG), 0, "tiny UNet2DModel (smoke tests), 16²"),
}


def build_unet(name: str, device: str | torch.device = "meta", dtype: torch.dtype | None = None, seed: int = 0):
    """A diffusers U-Net from :data:`UNET_CONFIGS` with random weights (none on ``meta``)."""
    import diffusers

    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; available: {sorted(UNET_CONFIGS)}")
    cls_name, cfg, _, _ = UNET_CONFIGS[name]
    cls = getattr(diffusers, cls_name)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = cls(**cfg())
    if dtype is not None and dtype != next(unet.parameters()).dtype:
        unet = unet.to(dtype)
    return unet.eval()


def text_tokens(unet) -> int:
    """Tokens of ``encoder_hidden_states`` used for a model: the config's, else 77."""
    for name, (cls_name, cfg, tokens, _) in UNET_CONFIGS.items():
        if type(unet).__name__ == cls_name and tokens and _same_config(unet.config, cfg()):
            return tokens
    return 77


def _same_config(config, cfg: dict) -> bool:
    def norm(v):
        return list(v) if isinstance(v, (tuple, list)) else v
    return all(norm(config.get(k)) == norm(v) for k, v in cfg.items())


def unet_inputs(unet, batch: int, device=None, dtype=None, resolution: int | None = None, seed: int = 0,
                tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Random ``(sample, timestep, kwargs)`` for one U-Net call of ``batch`` items.

    ``kwargs`` holds what the config needs: ``encoder_hidden_states`` ``[B, tokens, D]`` for a
    ``UNet2DConditionModel``, ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) for SDXL's
    ``text_time`` embedding, ``class_labels`` for class-embedding configs.
    """
    cfg = unet.config
    p = next(unet.parameters())
    device = device if device is not None else p.device
    dtype = dtype if dtype is not None else p.dtype
    size = resolution or cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device="meta", dtype=dtype)
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x = randn(batch, cfg.in_channels, h, w)
    # a 0-d timestep expanded to the batch (stride 0), exactly as qdcompile.sample passes it,
    # so that a compiled model timed here is not recompiled (guard on strides) for sampling
    t = torch.tensor(500, dtype=torch.long, device=device).expand(batch)
    kwargs: dict[str, Any] = {}
    cross = cfg.get("cross_attention_dim")
    if type(unet).__name__ == "UNet2DConditionModel" and cross is not None:
        dim = cross[0] if isinstance(cross, (tuple, list)) else cross
        kwargs["encoder_hidden_states"] = randn(batch, tokens or text_tokens(unet), dim)
    if cfg.get("addition_embed_type") == "text_time":
        n_time = 6
        text_dim = cfg.projection_class_embeddings_input_dim - n_time * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
        if torch.device(device).type == "meta":
            time_ids = torch.empty(batch, n_time, device="meta", dtype=dtype)
        else:
            time_ids = time_ids.to(device=device, dtype=dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": randn(batch, text_dim), "time_ids": time_ids}
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        n = cfg.get("num_class_embeds") or 1000
        kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device) % n
    return x, t, kwargs
