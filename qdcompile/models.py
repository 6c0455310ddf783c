"""Load a U-Net and its scheduler from a diffusers folder (or a shipped reference name)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from .sampling import unwrap

SUPPORTED_UNETS = ("UNet2DModel", "UNet2DConditionModel")


def load_model(spec: str | os.PathLike, device: str = "cpu", dtype=None):
    """``spec`` is a shipped reference name (``"mnist"``) or a diffusers folder holding a
    pipeline (``unet/`` + ``scheduler/``) or a U-Net (``config.json``) with a scheduler config.

    Uses diffusers' ``from_pretrained``; raises clear errors for anything else.
    """
    import torch

    from .reference_models import available_reference_models, reference_model

    dtype = dtype or torch.float32
    if str(spec) in available_reference_models():
        return reference_model(str(spec), device=device, dtype=dtype)
    root = Path(spec)
    if not root.exists():
        raise FileNotFoundError(f"--model {str(spec)!r}: no such folder, and not a shipped reference model "
                                f"(available: {', '.join(available_reference_models())})")
    if (root / "unet" / "config.json").is_file():
        unet_dir, unet_sub = root, "unet"
        sched_dir, sched_sub = root, "scheduler"
    elif (root / "config.json").is_file():
        unet_dir, unet_sub = root, None
        sched_dir, sched_sub = (root, "scheduler") if (root / "scheduler").is_dir() else (root, None)
    else:
        raise FileNotFoundError(f"{str(root)!r} is not a diffusers model folder: expected unet/config.json "
                                "(pipeline layout) or config.json (a U-Net folder)")
    cfg_path = unet_dir / (unet_sub or "") / "config.json"
    class_name = json.loads(cfg_path.read_text()).get("_class_name")
    if class_name not in SUPPORTED_UNETS:
        raise ValueError(f"{str(cfg_path)!r} describes a {class_name!r}; qdcompile supports {', '.join(SUPPORTED_UNETS)}")
    import diffusers

    unet_cls = getattr(diffusers, class_name)
    unet = unet_cls.from_pretrained(unet_dir, subfolder=unet_sub, torch_dtype=dtype).to(device).eval()
    sched_cfg = sched_dir / (sched_sub or "") / "scheduler_config.json"
    if not sched_cfg.is_file():
        raise FileNotFoundError(f"no scheduler config at {str(sched_cfg)!r} (a diffusers folder needs one to sample)")
    sched_name = json.loads(sched_cfg.read_text()).get("_class_name", "DDPMScheduler")
    sched_cls = getattr(diffusers, sched_name, None)
    if sched_cls is None:
        raise ValueError(f"{str(sched_cfg)!r}: unknown scheduler class {sched_name!r}")
    scheduler = sched_cls.from_pretrained(sched_dir, subfolder=sched_sub)
    return unet, scheduler


def load_text_pipeline(spec: str | os.PathLike, device: str = "cpu", dtype=None):
    """A text-to-image diffusers pipeline folder (``model_index.json`` with ``text_encoder/``,
    ``tokenizer/``, ``vae/``, ``unet/``, ``scheduler/``: Stable Diffusion 1.x/2.x), loaded with
    ``DiffusionPipeline.from_pretrained`` for ``--prompt`` (needs transformers). The safety
    checker is not loaded."""
    import torch

    root = Path(spec)
    index = root / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"--prompt needs a diffusers pipeline folder with a text encoder; {str(spec)!r} has no "
                                "model_index.json (for a bare U-Net pass --prompt-embeds FILE.pt instead)")
    parts = json.loads(index.read_text())
    missing = [c for c in ("text_encoder", "tokenizer", "vae", "unet", "scheduler")
               if not isinstance(parts.get(c), list) or parts[c][0] is None]
    if missing:
        raise ValueError(f"{str(index)!r} ({parts.get('_class_name')}) lacks {missing}: --prompt needs a text-to-image "
                         "pipeline with a text encoder, tokenizer and VAE (or pass --prompt-embeds FILE.pt)")
    if isinstance(parts.get("text_encoder_2"), list) and parts["text_encoder_2"][0] is not None:
        raise ValueError(f"{str(index)!r} is a {parts.get('_class_name')} with two text encoders (SDXL): its U-Net also "
                         "needs pooled text embeddings and time ids, which the CLI does not build; use the Python "
                         "API (qdcompile.calibrate(..., sample_kwargs=...) and qdcompile.quantize_pipeline)")
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("--prompt encodes the text with the pipeline's CLIP text encoder, which needs "
                          "transformers: pip install transformers (or pass --prompt-embeds FILE.pt)") from e
    from diffusers import DiffusionPipeline

    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in parts else {}
    pipe = DiffusionPipeline.from_pretrained(root, torch_dtype=dtype or torch.float32, **extra).to(device)
    if type(pipe.unet).__name__ != "UNet2DConditionModel" or not hasattr(pipe, "encode_prompt"):
        raise ValueError(f"{str(index)!r}: {type(pipe).__name__} with a {type(pipe.unet).__name__} is not a "
                         "text-to-image pipeline qdcompile can drive")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeddings(pipe, prompt: str):
    """``encoder_hidden_states`` ``[1, tokens, dim]`` of ``prompt`` from the pipeline's text encoder."""
    import torch

    with torch.no_grad():
        emb, _ = pipe.encode_prompt(prompt, pipe.device, 1, False)
    return emb


def prompt_embeds_kwargs(unet, path: Optional[str], device, dtype) -> Optional[dict[str, Any]]:
    """U-Net keyword arguments from a ``--prompt-embeds`` file (a tensor ``[1 or N, tokens, dim]``
    saved with ``torch.save``): ``{"encoder_hidden_states": ...}``; None without a file, which a
    conditional U-Net (``UNet2DConditionModel``) cannot do without (``ValueError``)."""
    if path:
        emb = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(emb, torch.Tensor):
            raise ValueError(f"--prompt-embeds {path!r} must hold one tensor [1 or N, tokens, dim]")
        return {"encoder_hidden_states": emb.to(device, dtype)}
    if type(unwrap(unet)).__name__ == "UNet2DConditionModel":
        raise ValueError("this is a UNet2DConditionModel: pass --prompt-embeds FILE.pt (a tensor "
                         "[1, tokens, cross_attention_dim] saved with torch.save)")
    return None
