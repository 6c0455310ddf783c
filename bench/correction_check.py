"""How reliable is the calibration's PTQD correction check (``QuantRecipe.check_samples``)?

For each reference model / recipe / noise space, calibrates exactly as ``qdcompile eval`` does
(16 samples x 50 steps, 20 kept, seed 1, recon 40 / LSQ 20 iterations), prints the check's
record (mean squared difference of the final samples to FP's, 8 validation seeds: none, k,
k + bias; what it kept), then measures the same distances on ``--holdout`` fresh seeds the
check never saw and says whether its decision agrees. CPU, simulate backend.

    python bench/correction_check.py [--holdout 64] [--cases mnist:ptqd:sampler,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import qdcompile
from qdcompile.pipeline import Corrections, QuantizedUNet, format_correction_check
from qdcompile.sampling import sample

CASES = ("mnist:ptqd:sampler", "mnist:ptqd:output", "mnist:mixed:sampler", "mnist:mixed:output",
         "cifar10:ptqd:sampler", "cifar10:ptqd:output")
HOLDOUT_SEED = 2024


def distances(unet, sched, meta, n: int, seed: int) -> dict[str, float]:
    """Mean squared difference to FP's final samples, same seeds: none, k, bias, k + bias (no VSC)."""
    def run(model, s):
        return sample(model, s, num_images=n, num_inference_steps=50, generator=torch.Generator().manual_seed(seed),
                      progress=False, to_image=False, batch_size=64)

    fp = run(unet, sched)
    out = {}
    for corr in (Corrections.none(), Corrections(True, False, False), Corrections(False, True, False),
                 Corrections(True, True, False)):
        q = QuantizedUNet(unet, meta, backend="simulate", corrections=corr, mixed=bool(meta.precision_plan))
        out[corr.label()] = float((run(q, q.wrap_scheduler(sched)) - fp).pow(2).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--holdout", type=int, default=64)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    rows = []
    for case in a.cases.split(","):
        model, preset, space = case.split(":")
        unet, sched = qdcompile.reference_model(model)
        recipe = getattr(qdcompile.QuantRecipe, preset)(recon_iters=40, act_lsq_iters=20, noise_space=space)
        t0 = time.perf_counter()
        meta = qdcompile.calibrate(unet, sched, recipe, num_samples=16, num_inference_steps=50, num_calib_steps=20,
                                   seed=1, progress=False, attach=False)
        calib_s = time.perf_counter() - t0
        check = meta.calibration["correction_check"]
        print(f"{case} (statistics in the {meta.noise_space} space, {calib_s:.0f}s): {format_correction_check(check)}",
              flush=True)
        held = distances(unet, sched, meta, a.holdout, HOLDOUT_SEED)
        kept = Corrections(**check["kept"])
        base = held[Corrections(kept.correlated, False, False).label()] if kept.correlated else held["none"]
        with_bias = held[Corrections(kept.correlated, True, False).label()]
        agrees = (with_bias <= base) == kept.bias
        print(f"  held-out {a.holdout} seeds: " + ", ".join(f"{k} {v:.4g}" for k, v in held.items())
              + f" -> bias {'helps' if with_bias <= base else 'hurts'}; check {'agrees' if agrees else 'DISAGREES'}",
              flush=True)
        rows.append({"case": case, "noise_space": meta.noise_space, "calibration_s": calib_s, "check": check,
                     "holdout": {"samples": a.holdout, "seed": HOLDOUT_SEED, "mse_vs_fp": held}, "agrees": agrees})
    out = Path(a.out) / f"correction-check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_info = {"qdcompile": qdcompile.__version__, "torch": torch.__version__, "device": "cpu",
                 "command": "python bench/correction_check.py " + " ".join(
                     f"--{k} {v}" for k, v in vars(a).items() if k != "out"), "rows": rows}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta_info, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
