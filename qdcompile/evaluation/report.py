"""Outputs of an evaluation run: the table, the markdown and JSON files, the sample grid and the
SNR plot."""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from ..images import save_comparison_grid
from ..io import atomic_write, json_text
from ..pipeline import format_correction_check, format_plan_runs
from .fid import CIFAR_FEATURES, REAL_SUBSET_SEED
from .metrics import format_colour_shift
from .trajectory import StepSNR

_COLUMNS = (
    ("configuration", lambda r: r["label"]),
    ("FID", lambda r: _fmt(r.get("fid"), "{:.3f}")),
    ("KID (mean ± std)", lambda r: (f"{r['kid_mean']:.4f} ± {r['kid_std']:.4f}" if r.get("kid_mean") is not None
                                    else "—")),
    ("mean SNR_Q dB", lambda r: _fmt(r.get("mean_snr_q_db"), "{:.1f}")),
    ("mean SNR_Q dB (sampler)", lambda r: _fmt(r.get("mean_snr_q_sampler_db"), "{:.1f}")),
    ("min SNR_Q dB (step)", lambda r: (f"{r['min_snr_q_db']:.1f} ({r['min_snr_q_step']})"
                                       if r.get("min_snr_q_db") is not None else "—")),
    ("colour W2", lambda r: _fmt(r.get("colour_w2"), "{:.2f}")),
    ("PSNR vs FP dB", lambda r: _fmt(r.get("psnr_vs_fp_db", r.get("sample_snr_vs_fp_db")), "{:.2f}")),
    ("colour shift vs FP", lambda r: (format_colour_shift(r["colour_shift_vs_fp"])
                                      if r.get("colour_shift_vs_fp") else "—")),
    ("digits ≥0.9", lambda r: _fmt(r.get("confident_digits"), "{:.0%}")),
    ("calib s", lambda r: _fmt(r.get("calibration_s"), "{:.1f}")),
    ("sample s", lambda r: _fmt(r.get("sampling_s"), "{:.1f}")),
)


def _fmt(v, spec: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return spec.format(v)


def _rows(results: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in results["configs"]:
        if r["status"] == "ok":
            out.append([fn(r) for _, fn in _COLUMNS])
        else:
            out.append([r["label"], f"{r['status']}: {r.get('reason', '')}"] + [""] * (len(_COLUMNS) - 2))
    return out


def format_table(results: dict[str, Any]) -> str:
    """The plain-text table printed at the end of a run (with the FID note)."""
    headers = [h for h, _ in _COLUMNS]
    rows = _rows(results)
    ok = [headers] + [r for r in rows if r[2:] != [""] * (len(_COLUMNS) - 2)]
    widths = [max(len(r[i]) for r in ok) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    for r in rows:
        if r[2:] == [""] * (len(_COLUMNS) - 2):
            lines.append(f"{r[0].ljust(widths[0])}  {r[1]}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(lines + ["", _notes(results)])


def _notes(results: dict[str, Any]) -> str:
    o = results["options"]
    fid = results["fid"]
    lines = [f"Note: {fid['note']}"]
    if "feature_extractor" in fid:
        real = ("held-out CIFAR-10 test images" if fid["feature_extractor"] == CIFAR_FEATURES else
                f"MNIST test images (fixed subset, seed {REAL_SUBSET_SEED})")
        lines.append(f"FID/KID: {fid['feature_extractor']} features via {fid['backend']}, against {fid['real_images']} "
                     f"{real}; KID: {fid['kid_subsets']} subsets "
                     f"of min(1000, samples) — with {o['num_samples']} samples FID is biased upwards: compare "
                     "rows, not runs with other sample counts.")
    if results["configs"] and any(r.get("colour_w2") is not None for r in results["configs"]):
        lines.append("Colour W2: Wasserstein-2 distance (8-bit levels) between Gaussians fitted to each image's "
                     "per-channel mean and std, samples vs the same real images; it sees colour casts, which the "
                     "classifier features behind FID barely register. Colour shift vs FP: mean of each "
                     "channel minus FP's, 8-bit levels.")
    lines.append(f"SNR_Q: PTQD eq. 13 on the inputs of {min(o['snr_samples'], o['num_samples'])} FP trajectories, "
                 "in dB (20 log10 of the norm ratio), mean and min over the "
                 f"{o['steps']} steps (step 0 = noisiest), of the U-Net outputs and (sampler) of the ε the scheduler "
                 "step uses: after its x0 clipping (DDPM clip_sample) and any correction applied there. "
                 "PSNR: quantized vs FP samples from the same seeds.")
    return "\n".join(lines)


def _markdown(results: dict[str, Any]) -> str:
    o = results["options"]
    headers = [h for h, _ in _COLUMNS]
    lines = [f"# Quality: {results['model']} ({results['model_class']}, {results['scheduler']})", "",
             f"{results['date']} · qdcompile {results['qdcompile_version']} · torch {results['torch_version']} · "
             f"{results['device']} · quantized models via `{o['backend']}`", "",
             f"`{results['command']}`", "",
             f"{o['num_samples']} samples × {o['steps']} steps (seed {o['seed']}), calibration "
             f"{o['calib_samples']} samples (seed {o['seed'] + 1})"
             + (f", {o['calib_steps']} of the {o['steps']} steps kept" if o["calib_steps"] else "")
             + (f", recipe overrides {dict(o['recipe_overrides'])}" if o["recipe_overrides"] else "") + ".", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in _rows(results):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    lines += ["", _notes(results).replace("\n", "\n\n")]
    plans = [(r["label"].strip(), r["precision_plan"], r.get("corrections")) for r in results["configs"]
             if r.get("precision_plan")]
    if plans:
        lines += ["", "PTQD rows (corrections applied by the quantized sampler; per-step precision):", ""]

        lines += [f"* {label} — corrections {corr}: {format_plan_runs(plan)}" for label, plan, corr in plans]
        spaces = {r.get("noise_space") for r in results["configs"] if r.get("precision_plan")} - {None}
        if spaces:
            lines += ["", "k and bias corrected " + " / ".join(
                "in the scheduler step, after its x0 clipping (statistics of the ε it uses)" if sp == "sampler" else
                "on the U-Net output (statistics of the output)" for sp in sorted(spaces)) + "."]
        checked = [(r["label"].strip(), r["correction_check"]) for r in results["configs"] if r.get("correction_check")]
        if checked:
            lines += ["", "Rows marked PTQD run the corrections the calibration's check kept:", ""]
            lines += [f"* {label}: {format_correction_check(c)}" for label, c in checked]
    colour = [(r["label"].strip(), d) for r in results["configs"] for d in r.get("colour_delta", [])]
    if colour:
        lines += ["", "Δ colour W2 (paired bootstrap, 95% interval):", ""]
        lines += [f"* {label} − {d['vs']}: {d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
                  for label, d in colour]
    checks = [(r["label"].strip(), r["snr_where_k_positive"]) for r in results["configs"]
              if r.get("snr_where_k_positive")]
    if checks:
        lines += ["", "Correlated-noise correction, SNR_Q (sampler) at the steps where k > 0 (vs the uncorrected "
                  "row, same FP trajectories):", ""]
        for label, c in checks:
            lines.append(f"* {label}: k = 0 at every step" if not c["steps"] else
                         f"* {label}: k > 0 at {len(c['steps'])} step(s) {c['steps']}; SNR_Q raised at "
                         f"{len(c['raised'])} of them, mean {c['mean_gain_db']:+.3f} dB")
    deltas = [(r["label"].strip(), d) for r in results["configs"] for d in r.get("fid_delta", [])]
    if deltas:
        lines += ["", "ΔFID (paired bootstrap over the same-seed samples, 95% interval; an interval containing 0 "
                  "means the difference is within the noise of this sample count):", ""]
        lines += [f"* {label} − {d['vs']}: {d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
                  for label, d in deltas]
        lines += ["", "FID against the FP samples (same features; how far each row is from what the float model "
                  "draws): " + ", ".join(f"{r['label'].strip()} {r['fid_vs_fp_samples']:.2f}"
                                         for r in results["configs"] if r.get("fid_vs_fp_samples") is not None)]
    split = next((r for r in results["configs"] if r.get("split_ranges")), None)
    if split:
        lines += ["", f"Shortcut-split layers ({split['label'].strip()}): observed input range of each concat part "
                  "(upsampled path | skip connection); one quantizer for the concat would span both:", ""]
        for name, parts in split["split_ranges"].items():
            (a_lo, a_hi), (b_lo, b_hi) = parts[0], parts[-1]
            lo, hi = min(a_lo, b_lo), max(a_hi, b_hi)
            share = [(p_hi - p_lo) / (hi - lo) if hi > lo else 1.0 for p_lo, p_hi in parts]
            lines.append(f"* `{name}`: [{a_lo:.2f}, {a_hi:.2f}] | [{b_lo:.2f}, {b_hi:.2f}] — each part spans "
                         + " and ".join(f"{v:.0%}" for v in share) + f" of the concat's [{lo:.2f}, {hi:.2f}]")
    recipes = [(r["label"], r["recipe"]) for r in results["configs"] if r.get("recipe")]
    if recipes:
        lines += ["", "Recipes:", ""] + [f"* {label}: `{json.dumps(rec, sort_keys=True)}`" for label, rec in recipes]
    return "\n".join(lines) + "\n"


def _model_tag(model: str) -> str:
    name = Path(model).name if os.sep in model or Path(model).exists() else model
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike, stamp: Optional[str] = None) -> dict[str, Path]:
    """Write ``quality-<model>-<stamp>.json`` / ``.md`` / ``-samples.png`` / ``-snr.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    stamp = stamp or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    prefix = f"quality-{_model_tag(results['model'])}-{stamp}"
    paths: dict[str, Path] = {}
    samples = results["_samples"]
    n = min(results["options"]["grid_images"], next(iter(samples.values())).shape[0]) if samples else 0
    labels = {r["key"]: r["label"] for r in results["configs"]}
    if n and results["model_class"] == "UNet2DModel" and results["image_shape"][0] in (1, 3):
        rows = [("FP (same seeds)" if k == "fp" else labels.get(k, k), v[:n]) for k, v in samples.items()]
        paths["samples"] = save_comparison_grid(rows, out_dir / f"{prefix}-samples.png", nrow=min(n, 16))
    if results["_snr"]:
        paths["snr_plot"] = save_snr_plot({labels[k]: v for k, v in results["_snr"].items()},
                                          out_dir / f"{prefix}-snr.png")
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    public["files"] = {k: p.name for k, p in paths.items()}
    paths["json"] = atomic_write(out_dir / f"{prefix}.json",
                                  json_text(public).encode())
    paths["markdown"] = atomic_write(out_dir / f"{prefix}.md", _markdown(results).encode())
    return paths


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (23, 190, 207)]


def save_snr_plot(curves: dict[str, Sequence[StepSNR]], path: str | os.PathLike, size=(900, 520)) -> Path:
    """Line plot (PIL, log-scale y) of SNR_Q per step for each configuration, with SNR_F dashed.

    The y axis shows the ratios themselves, as PTQD compares them (``SNR_Q > SNR_F``); it spans
    the SNR_Q values with up to two decades of margin, and SNR_F is clipped to that range.
    """
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    left, right, top, bottom = 60, 20, 40, 60
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    first = next(iter(curves.values()), [])
    q_logs = [math.log10(s.snr_q) for c in curves.values() for s in c if 0 < s.snr_q < math.inf] or [0.0, 1.0]
    f_logs = [math.log10(s.snr_f) for s in first if s.snr_f is not None and 0 < s.snr_f < math.inf]
    y_lo = max(math.floor(min(q_logs + f_logs + [0.0])), math.floor(min(q_logs)) - 2)
    y_hi = min(math.ceil(max(q_logs + f_logs)), math.ceil(max(q_logs)) + 2)
    y_hi = max(y_hi, y_lo + 1)
    x_max = max(max((s.step for c in curves.values() for s in c), default=1), 1)

    def px(step: float) -> float:
        return left + (w - left - right) * step / x_max

    def py(value: float) -> float:
        v = min(max(math.log10(value), y_lo), y_hi) if value > 0 else y_lo
        return top + (h - top - bottom) * (y_hi - v) / (y_hi - y_lo)

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for decade in range(y_lo, y_hi + 1):
        y = py(10.0 ** decade)
        draw.line([left, y, w - right, y], fill=(225, 225, 225))
        draw.text((8, y - 6), f"1e{decade}", fill="black", font=font)
    stride = max(1, x_max // 8)
    ticks = list(range(0, x_max + 1, stride))
    if x_max - ticks[-1] >= stride / 2:
        ticks.append(x_max)
    for step in ticks:
        x = px(step)
        draw.line([x, h - bottom, x, h - bottom + 4], fill="black")
        draw.text((x - 8, h - bottom + 6), str(step), fill="black", font=font)
        t = next((s.timestep for s in first if s.step == step), None)
        if t is not None:
            draw.text((x - 12, h - bottom + 20), f"t={t}", fill=(90, 90, 90), font=font)
    draw.text((left, h - 18), "sampling step (t from T down to 0); y: ratio, log scale (SNR_Q in dB = 20 log10)",
              fill="black", font=font)
    draw.text((left, 10), "SNR_Q(t) = ||eps|| / ||eps_q - eps|| per configuration (solid), "
              "SNR_F(t) = abar / (1 - abar) (dashed grey, clipped)", fill="black", font=font)
    f_pts = [(px(s.step), py(s.snr_f)) for s in first if s.snr_f is not None]
    for (x0, y0), (x1, y1) in zip(f_pts, f_pts[1:]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) // 6))
        for k in range(0, n, 2):  # 6-px dashes
            a, b = k / n, min(k + 1, n) / n
            draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                      fill=(120, 120, 120), width=2)
    for i, (label, curve) in enumerate(curves.items()):
        color = _PALETTE[i % len(_PALETTE)]
        pts = [(px(s.step), py(s.snr_q)) for s in curve if s.snr_q < math.inf]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        ly = top + 8 + 16 * i
        draw.line([w - right - 230, ly + 6, w - right - 205, ly + 6], fill=color, width=3)
        draw.text((w - right - 200, ly), label, fill="black", font=font)
    path = Path(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())
