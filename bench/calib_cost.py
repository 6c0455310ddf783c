"""What Q-Diffusion calibration costs on a Stable Diffusion 1.5 U-Net, per reconstruction block.

Random weights with SD 1.5's exact ``UNet2DConditionModel`` configuration (the cost does not
depend on the weight values); text conditioning is random ``encoder_hidden_states``
[1, 77, 768] broadcast to the batch. Runs the real ``qdcompile.calibrate`` (W4A8, BRECQ +
AdaRound + LSQ, shortcut-split) and reports, per block: seconds (capture of the block's
inputs/targets + AdaRound + LSQ), the iterations, and on CUDA the peak GPU memory; plus the
whole run's wall time and peak memory.

On a GPU, run it at SD's real latent size (64² for 512² images)::

    python bench/calib_cost.py --latent 64 --calib-samples 8 --steps 20 --recon-iters 100

On the CPU (no GPU here) it runs at a small latent size and few iterations: the per-block
times then show the structure (which blocks dominate), not the cost on a GPU. Seconds per
block grow about linearly with ``recon_iters`` and with the latent area.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent", type=int, default=16, help="latent side (SD 1.5 at 512²: 64)")
    p.add_argument("--calib-samples", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the calibration trajectory")
    p.add_argument("--recon-iters", type=int, default=4)
    p.add_argument("--lsq-iters", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="reconstruction minibatch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file (default: bench/results/calib-cost-sd15-<device>.json)")
    args = p.parse_args(argv)

    from diffusers import DDIMScheduler, UNet2DConditionModel

    import qdcompile
    from qdcompile.benchmarks.configs import SD15_UNET_CONFIG

    torch.manual_seed(0)
    cfg = {**SD15_UNET_CONFIG, "sample_size": args.latent}
    unet = UNet2DConditionModel(**cfg).to(args.device).eval()
    params = sum(p.numel() for p in unet.parameters())
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    emb = torch.randn(1, 77, 768, device=args.device)
    recipe = qdcompile.QuantRecipe.w4a8(recon_iters=args.recon_iters, act_lsq_iters=args.lsq_iters,
                                        recon_batch_size=args.batch)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    meta = qdcompile.calibrate(unet, sched, recipe, num_samples=args.calib_samples, num_inference_steps=args.steps,
                               sample_kwargs={"encoder_hidden_states": emb}, progress=False, attach=False)
    total = time.perf_counter() - t0
    blocks = meta.calibration["reconstruction"]
    result = {
        "model": "UNet2DConditionModel, Stable Diffusion 1.5 config, random weights",
        "parameters": params, "latent": args.latent, "device": (torch.cuda.get_device_name() if
                                                                  args.device.startswith("cuda") else platform.processor() or "cpu"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
        "calib_samples": args.calib_samples, "steps": args.steps, "calib_set_size": meta.calibration["calib_set_size"],
        "recon_iters": args.recon_iters, "lsq_iters": args.lsq_iters, "recon_batch": args.batch,
        "layers_quantized": len(meta.layers), "split_layers": len(meta.calibration["split_layers"]),
        "total_s": total, "reconstruction_s": sum(b["seconds"] for b in blocks),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": (torch.cuda.max_memory_allocated() / 2 ** 20 if args.device.startswith("cuda") else None),
        "blocks": [{"block": b["unit"], "layers": b["layers"], "seconds": round(b["seconds"], 3),
                    **({"peak_gpu_mb": round(b["peak_gpu_mb"], 1)} if "peak_gpu_mb" in b else {})} for b in blocks],
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"calib-cost-sd15-{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from qdcompile.io import atomic_write

    atomic_write(out, json.dumps(result, indent=2))
    slow = sorted(result["blocks"], key=lambda b: -b["seconds"])[:5]
    print(f"SD 1.5 U-Net ({params / 1e6:.0f}M params) at latent {args.latent}², {args.device}: {len(blocks)} blocks, "
          f"calibration {total:.0f}s (reconstruction {result['reconstruction_s']:.0f}s), peak RSS "
          f"{result['peak_rss_mb']:.0f} MB" + (f", peak GPU {result['peak_gpu_mb']:.0f} MB" if result["peak_gpu_mb"] else ""))
    for b in slow:
        print(f"  {b['block']:<45} {b['layers']:>3} layers  {b['seconds']:8.2f}s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
