"""How reliable is the calibration's PTQD correction check (``QuantRecipe.check_samples``)?

For each reference model / recipe / noise space, calibrates exactly as ``qdcompile eval`` does
(16 samples x 50 steps, 20 kept, seed 1, recon 40 / LSQ 20 iterations), prints the check's
record (mean squared difference of the final samples to FP's, 8 validation seeds: none, k,
k + bias; what it kept), then measures the same distances on ``--holdout`` fresh seeds the
check never saw: the bias correction's paired per-image change ± its standard error, and whether
the check's decision agrees — it should drop the bias only where the held-out seeds show clear
harm (more than 2 standard errors, the check's own rule) and keep it where they do not. CPU,
simulate backend. ``auto`` cases say which space the check chose; the held-out seeds measure
the chosen space's corrections only.

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
from qdcompile.ptqd import change_verdict, paired_change
from qdcompile.sampling import sample

CASES = ("mnist:ptqd:sampler", "mnist:ptqd:output", "mnist:mixed:sampler", "mnist:mixed:output",
         "cifar10:ptqd:sampler", "cifar10:ptqd:output")
HOLDOUT_SEED = 2024


def distances(unet, sched, meta, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-image mean squared difference to FP's final samples, same seeds: none, k, bias, k + bias (no VSC)."""
    def run(model, s):
        return sample(model, s, num_images=n, num_inference_steps=50, generator=torch.Generator().manual_seed(seed),
                      progress=False, to_image=False, batch_size=64)

    fp = run(unet, sched)
    out = {}
    for corr in (Corrections.none(), Corrections(True, False, False), Corrections(False, True, False),
                 Corrections(True, True, False)):
        q = QuantizedUNet(unet, meta, backend="simulate", corrections=corr, mixed=bool(meta.precision_plan))
        out[corr.label()] = (run(q, q.wrap_scheduler(sched)) - fp).pow(2).flatten(1).mean(1).double()
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
        delta, se = paired_change(held[Corrections(kept.correlated, True, False).label()], base)
        verdict = change_verdict(delta, se)
        agrees = kept.bias != (verdict == "hurts")
        means = {k: float(v.mean()) for k, v in held.items()}
        print(f"  held-out {a.holdout} seeds: " + ", ".join(f"{k} {v:.4g}" for k, v in means.items())
              + f"; bias {delta:+.3g} ± {se:.2g} ({verdict}); check {'agrees' if agrees else 'DISAGREES'}",
              flush=True)
        rows.append({"case": case, "noise_space": meta.noise_space, "calibration_s": calib_s, "check": check,
                     "holdout": {"samples": a.holdout, "seed": HOLDOUT_SEED, "mse_vs_fp": means,
                                 "bias_change": {"delta": delta, "se": se, "verdict": verdict}},
                     "agrees": agrees})
    out = Path(a.out) / f"correction-check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_info = {"qdcompile": qdcompile.__version__, "torch": torch.__version__, "device": "cpu",
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "command": "python bench/correction_check.py " + " ".join(
                     f"--{k} {v}" for k, v in vars(a).items() if k != "out"), "rows": rows}
    from qdcompile.io import atomic_write

    atomic_write(out, json.dumps(meta_info, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
