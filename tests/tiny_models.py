"""Small random-initialised diffusers U-Nets shared by the tests (fresh weights per seed)."""

from __future__ import annotations

import json

import torch


def tiny_unet2d(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


def tiny_unet2d_condition(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


SD_WORDS = ("a", "photo", "of", "red", "blue", "cat", "dog", "house", "tree", "in", "the", "snow")


def tiny_clip_tokenizer(folder):
    """A CLIP BPE tokenizer over :data:`SD_WORDS` (plus single characters, so any lower-case
    text tokenises), written to ``folder`` (vocab.json, merges.txt)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in SD_WORDS:
        vocab[w + "</w>"] = len(vocab)
    for c in sorted({c for w in SD_WORDS for c in w}):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = ["#version: 0.2"]
    for w in SD_WORDS:   # merge each known word left to right, the last merge onto "</w>"
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            merged = parts[0] + parts[1]
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12)


def tiny_sd_pipeline(folder, seed: int = 11):
    """A real ``StableDiffusionPipeline`` with tiny random weights: CLIP text encoder (hidden 24),
    VAE (16x16 images <-> 4x8x8 latents), :func:`tiny_unet2d_condition`, DDIM; no safety checker."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_clip_tokenizer(folder)
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=12, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=tiny_unet2d_condition(seed=3),
                                   scheduler=DDIMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
