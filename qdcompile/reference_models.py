"""Embedded reference diffusion models.

The package ships a small DDPM trained on MNIST (``assets/mnist``), stored as a
diffusers-style folder::

    assets/mnist/unet/config.json
    assets/mnist/unet/diffusion_pytorch_model.safetensors
    assets/mnist/scheduler/scheduler_config.json
    assets/mnist/training_info.json        (provenance; ignored by diffusers)

It is loaded with diffusers' own ``from_pretrained`` so that quantization passes
see exactly the modules a user of diffusers would get. :func:`train_reference`
re-creates it from scratch (see ``bench/train_reference.py``).

diffusers is imported lazily inside the functions: importing ``qdcompile`` must
stay cheap.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ASSETS_DIR",
    "MNIST_UNET_CONFIG",
    "MNIST_SCHEDULER_CONFIG",
    "REFERENCE_MODELS",
    "available_reference_models",
    "reference_model_path",
    "reference_model",
    "train_reference",
    "generate_samples",
]

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# ~1.1M parameters (~4.5 MB of fp32 safetensors). Three resolutions (28 -> 14 -> 7),
# with self-attention at 14x14 in the encoder and decoder plus diffusers' default
# attention in the 7x7 mid block, so the model exercises both convolutions and
# linear layers. attention_head_dim=32 (2 heads of 32 channels) rather than the
# diffusers default of 8: same parameters, but about twice as fast on CPU.
MNIST_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=28,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)

# Cosine ("squaredcos_cap_v2", Nichol & Dhariwal 2021) rather than the linear schedule
# of Ho et al.: at 28x28 the linear schedule destroys the signal long before t=T,
# so a large share of timesteps (and of the 50 inference steps) is spent on
# nearly pure noise. The cosine schedule spreads the signal-to-noise ratio more
# evenly over t, which makes better use of a short training run and a 50-step
# sampler. clip_sample=True keeps the x0 estimate in [-1, 1] at the noisiest
# steps, where the cosine schedule's tiny alpha_bar would amplify errors.
MNIST_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
)

# CIFAR-10 at 32x32, the MNIST architecture with three colour channels (~1.1M parameters):
# small enough to train on one CPU core in about an hour, which is all it gets without a GPU.
CIFAR10_UNET_CONFIG: dict[str, Any] = {**MNIST_UNET_CONFIG, "sample_size": 32, "in_channels": 3, "out_channels": 3}

# name -> everything needed to build, train and load the model.
REFERENCE_MODELS: dict[str, dict[str, Any]] = {
    "mnist": dict(
        unet=MNIST_UNET_CONFIG,
        scheduler=MNIST_SCHEDULER_CONFIG,
        dataset="mnist",
        # Defaults used to produce the shipped weights (~30 min on one CPU core).
        train=dict(steps=1800, batch_size=64, lr=2e-3, warmup=100, ema_decay=0.995),
    ),
    "cifar10": dict(
        unet=CIFAR10_UNET_CONFIG,
        scheduler=MNIST_SCHEDULER_CONFIG,
        dataset="cifar10",
        # a CPU budget (~1 h on one core), far from converged: see training_info.json
        train=dict(steps=1500, batch_size=48, lr=2e-3, warmup=100, ema_decay=0.995),
    ),
}


def available_reference_models() -> list[str]:
    """Names accepted by :func:`reference_model` and :func:`train_reference`."""
    return sorted(REFERENCE_MODELS)


def _spec(name: str) -> dict[str, Any]:
    if name not in REFERENCE_MODELS:
        raise ValueError(
            f"unknown reference model {name!r}; available: {', '.join(available_reference_models())}"
        )
    return REFERENCE_MODELS[name]


def reference_model_path(name: str = "mnist") -> Path:
    """Folder where the shipped weights of reference model ``name`` live."""
    _spec(name)
    return ASSETS_DIR / name


def reference_model(
    name: str = "mnist",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
):
    """Load a reference model with diffusers' ``from_pretrained``.

    Args:
        name: reference model name (see :func:`available_reference_models`).
        device, dtype: where / in which dtype to put the U-Net.
        path: load from this diffusers-style folder instead of the shipped assets
            (e.g. the ``out_dir`` of :func:`train_reference`).

    Returns:
        ``(unet, scheduler)``: a ``UNet2DModel`` in eval mode and a ``DDPMScheduler``.
    """
    _spec(name)
    root = Path(path) if path is not None else reference_model_path(name)
    required = [
        root / "unet" / "config.json",
        root / "unet" / "diffusion_pytorch_model.safetensors",
        root / "scheduler" / "scheduler_config.json",
    ]
    missing = [str(p) for p in required if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"reference model {name!r} is missing files: {', '.join(missing)}. "
            f"Create them with `qdcompile train-reference` "
            f"(or `python bench/train_reference.py --model {name}`)."
        )

    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(
        str(root), subfolder="unet", torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=False
    )
    scheduler = DDPMScheduler.from_pretrained(str(root), subfolder="scheduler", local_files_only=True)
    return unet.to(device).eval(), scheduler


def _load_training_images(dataset: str) -> torch.Tensor:
    """Training images as float32 ``[N, C, H, W]`` scaled to [-1, 1]."""
    if dataset == "mnist":
        from .data import load_mnist

        images, _ = load_mnist("t10k")
        return images.unsqueeze(1).float().div_(127.5).sub_(1.0)
    if dataset == "cifar10":
        from .data import load_cifar10

        images, _ = load_cifar10("train")
        return images.float().div_(127.5).sub_(1.0)
    raise ValueError(f"no loader for dataset {dataset!r}")


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup for ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _save_atomically(target: Path, write) -> None:
    """Call ``write(tmp_dir)`` on a fresh sibling folder, then move it to ``target``.

    An interrupted run leaves at most a stray ``.tmp`` sibling, never a half-written
    ``target``; an existing ``target`` is swapped out and removed only once the new
    one is complete.
    """
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; give the final folder normal permissions
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)  # put the previous model back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def train_reference(
    name: str = "mnist",
    out_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    warmup: int | None = None,
    ema_decay: float | None = None,
    snr_gamma: float | None = 5.0,
    log_every: int = 100,
) -> Path:
    """Train reference model ``name`` from scratch and save it (EMA weights).

    Training objective: standard DDPM epsilon prediction with t ~ U{0..999}, MSE
    loss with min-SNR-gamma weighting (Hang et al. 2023; weight min(SNR, gamma)/SNR
    for epsilon prediction, ``snr_gamma=None`` for the plain loss), which speeds up
    convergence of short runs. AdamW, linear warmup + cosine learning-rate decay,
    gradient clipping at 1.0, and an exponential moving average of the weights
    (with the usual ``(1 + step) / (10 + step)`` ramp) that is what gets saved.

    ``None`` for ``steps``/``batch_size``/``lr``/``warmup``/``ema_decay`` picks the
    model's defaults in ``REFERENCE_MODELS[name]["train"]``. Uses whatever
    ``torch.get_num_threads()`` is; set it before calling.

    Args:
        out_dir: output folder (diffusers layout); default the package assets folder,
            i.e. this overwrites the shipped model. Written atomically.
        progress: show a tqdm progress bar.

    Returns:
        The folder the model was saved to.
    """
    from diffusers import DDPMScheduler, UNet2DModel
    from tqdm.auto import tqdm

    spec = _spec(name)
    defaults = spec["train"]
    steps = int(steps if steps is not None else defaults["steps"])
    batch_size = int(batch_size if batch_size is not None else defaults["batch_size"])
    lr = float(lr if lr is not None else defaults["lr"])
    warmup = int(warmup if warmup is not None else defaults["warmup"])
    ema_decay = float(ema_decay if ema_decay is not None else defaults["ema_decay"])
    out_dir = Path(out_dir) if out_dir is not None else reference_model_path(name)
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = _load_training_images(spec["dataset"])
    n = data.shape[0]

    unet = UNet2DModel(**spec["unet"])
    scheduler = DDPMScheduler(**spec["scheduler"])
    unet.train()
    ema = [p.detach().clone() for p in unet.parameters()]
    alphas_cumprod = scheduler.alphas_cumprod.float()
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    if snr_gamma is not None:
        loss_weight = snr.clamp(max=snr_gamma) / snr  # epsilon-prediction min-SNR weights
    else:
        loss_weight = torch.ones_like(snr)

    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    n_params = sum(p.numel() for p in unet.parameters())
    logger.info(
        "training %r: %d params, %d images, %d steps x batch %d, lr %g, seed %d, %d threads",
        name, n_params, n, steps, batch_size, lr, seed, torch.get_num_threads(),
    )

    order = torch.randperm(n, generator=gen)
    cursor = 0
    window_loss, window_start = 0.0, time.time()
    loss_history: list[tuple[int, float]] = []
    start = time.time()
    bar = tqdm(range(steps), desc=f"train {name}", disable=not progress)
    for step in bar:
        if cursor + batch_size > n:  # new epoch
            order = torch.randperm(n, generator=gen)
            cursor = 0
        x0 = data[order[cursor : cursor + batch_size]]
        cursor += batch_size
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)

        pred = unet(noisy, t).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()

        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)

        window_loss += loss.item()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            count = (step % log_every) + 1
            mean = window_loss / count
            loss_history.append((step + 1, mean))
            logger.info(
                "step %d/%d loss %.4f lr %.2e %.2f s/step",
                step + 1, steps, mean, sched.get_last_lr()[0], (time.time() - window_start) / count,
            )
            window_loss, window_start = 0.0, time.time()
    bar.close()
    elapsed = time.time() - start

    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    unet.eval()

    info = dict(
        name=name,
        dataset=spec["dataset"],
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        ema_decay=ema_decay,
        snr_gamma=snr_gamma,
        seed=seed,
        num_params=n_params,
        train_seconds=round(elapsed, 1),
        threads=torch.get_num_threads(),
        final_loss=loss_history[-1][1],
        loss_history=loss_history,
        torch=torch.__version__,
        python=platform.python_version(),
        weights="EMA",
    )

    def write(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")

    _save_atomically(out_dir, write)
    logger.info("saved %r to %s (%.0f s, final loss %.4f)", name, out_dir, elapsed, info["final_loss"])
    return out_dir


def generate_samples(
    unet,
    scheduler,
    num_samples: int = 64,
    num_inference_steps: int = 50,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Seeded ancestral sampling (:func:`qdcompile.sample`); float32 images in ``[0, 1]`` on the CPU."""
    from .sampling import sample

    return sample(unet, scheduler, num_images=num_samples, num_inference_steps=num_inference_steps,
                  generator=torch.Generator().manual_seed(seed), batch_size=batch_size, progress=progress,
                  to_image=True).cpu()
