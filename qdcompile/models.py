"""Load a U-Net and its scheduler from a diffusers folder (or a shipped reference name)."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
