"""The size and BOPs report of ``qdcompile bench size`` / ``bench/size.py``: every model config under
every recipe, the parameters by role, and PTQD's Table 2 when LDM-4 is among the models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..io import write_json
from ..recipe import QuantRecipe
from .census import config_census, role_breakdown
from .ptqd_table import ptqd_table2
from .size import MB, MIB, bops, format_rows, model_size


def size_table(models: list[str], recipes: list[str], float_bytes: int = 4, count_scales: bool = True,
               batch: int = 1, resolution: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        c = config_census(name, batch=batch, resolution=resolution)
        for r in recipes:
            recipe = None if r in ("fp32", "fp16", "float") else QuantRecipe.preset(r)
            fb = 2 if r == "fp16" else float_bytes
            s = model_size(c, recipe, float_bytes=fb, count_scales=count_scales)
            fbits = 16 if r == "fp16" else 32 if recipe is None else fb * 8
            b = bops(c, recipe, float_bits=fbits)
            rows.append({"model": name, "recipe": s.recipe, "params": c.total_params, "roles": role_breakdown(c),
                         "bytes_by_part": s.bytes, "params_by_precision": s.params,
                         "quantized_params": s.params["quantized"] + s.params["quantized_8bit"],
                         "MB": s.mb, "MiB": s.total_bytes / MIB, "scales_MB": s.bytes["scales"] / MB,
                         "float_MB": (s.bytes["float_weights"] + s.bytes["bias"] + s.bytes["other"]) / MB,
                         "GMACs_layers": c.layer_macs / 1e9, "GMACs_attention": c.attn_macs / 1e9,
                         "TBOPs_layers": b["layers"] / 1e12, "TBOPs_attention_float": b["attention"] / 1e12,
                         "batch": c.batch, "resolution": list(c.resolution)})
    return rows


DEFAULT_SIZE_MODELS = ("ldm4-imagenet", "sd15", "sdxl", "mnist")
DEFAULT_SIZE_RECIPES = ("fp32", "fp16", "w8a8", "w4a8", "w4a4")


@dataclass
class SizeOptions:
    """What :func:`run_size` reports (the options of ``qdcompile bench size``)."""

    models: Optional[Sequence[str]] = None      # model configs (default DEFAULT_SIZE_MODELS)
    recipes: Optional[Sequence[str]] = None     # recipes (default DEFAULT_SIZE_RECIPES)
    float_fp16: bool = False                    # price float parameters at FP16 (default FP32)
    no_scales: bool = False                     # leave the weight/activation scale overhead out
    batch: int = 1
    resolution: Optional[int] = None            # latent resolution (default: the config's sample_size)
    json: Optional[str] = None                  # also write the numbers here


def run_size(opts: SizeOptions) -> int:
    """Print the size and BOPs tables (and PTQD's Table 2 with ``ldm4-imagenet``); write ``opts.json``."""
    models = list(opts.models or DEFAULT_SIZE_MODELS)
    recipes = list(opts.recipes or DEFAULT_SIZE_RECIPES)
    fb = 2 if opts.float_fp16 else 4
    print("Model size and BOPs per U-Net evaluation (sizes: MB = 10^6 bytes; BOPs = MACs x b_w x b_a)")
    print(f"  quantized conv/linear weights at the recipe's bits (keep_8bit layers: 8; int4 packed 2/byte); "
          f"biases, norms, embeddings, non-quantizable layers at {'FP16' if fb == 2 else 'FP32'}")
    print(f"  per-channel weight scales (fp32) + per-tensor act scale/zero-point: "
          f"{'counted' if not opts.no_scales else 'NOT counted'}; kernel row sums (int32/channel) not counted")
    print(f"  MACs: conv/linear at batch {opts.batch}, default latent resolution unless --resolution; "
          "attention matmuls (QK^T, AV) counted separately, always float\n")
    rows = size_table(models, recipes, fb, not opts.no_scales, opts.batch, opts.resolution)
    print(format_rows(rows, [("model", "model", ""), ("recipe", "recipe", ""), ("params", "params", ",d"),
                            ("MB", "MB", ".2f"), ("MiB", "MiB", ".2f"), ("scales_MB", "scales MB", ".3f"),
                            ("float_MB", "float MB", ".2f"), ("GMACs_layers", "GMACs", ".2f"),
                            ("TBOPs_layers", "TBOPs", ".3f"), ("GMACs_attention", "attn GMACs", ".2f"),
                            ("TBOPs_attention_float", "attn TBOPs", ".3f")]))
    print("\nParameters by role:")
    seen = set()
    for r in rows:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        print(f"  {r['model']}: " + ", ".join(f"{k} {v:,}" for k, v in r["roles"].items() if v))
    t2 = None
    if "ldm4-imagenet" in models:
        t2 = ptqd_table2()
        print("\nPTQD Table 2 (LDM-4 ImageNet 256², U-Net only, MB = 10^6 bytes):")
        print(format_rows(t2["rows"], [("bitwidth", "W/A", ""), ("paper_MB", "paper MB", ".2f"),
                                      ("exact_convention_MB", "reproduced MB", ".3f"),
                                      ("first_last_convention_MB", "first/last conv. MB", ".3f"),
                                      ("qdcompile_MB", "qdcompile MB", ".2f"), ("paper_TBOPs", "paper TBOPs", ".2f"),
                                      ("qdcompile_TBOPs", "our TBOPs", ".2f")]))
        print("  reproduced: GroupNorm params not counted; FP32 = time_embedding.linear_1 + all ResBlock "
              "time_emb_proj weights + conv_shortcut biases; everything else (incl. biases, LayerNorm) at the "
              "weight bits; no scale overhead. First/last convention: FP32 = time_embedding.linear_1, conv_in, "
              "conv_out + time_emb_proj. qdcompile: our own accounting (biases/norms FP32, scales counted).")
        print("  BOPs: PTQD's FP32 count matches ours to 0.05%; its W8A8/W4A8 counts imply ~1.94 GMACs at 32x32 "
              "bits that no natural layer group explains (ours: all conv/linear quantized).")
    if opts.json:
        payload = {"rows": rows, "float_bytes": fb, "scales_counted": not opts.no_scales,
                   "ptqd_table2": None if t2 is None else {k: v for k, v in t2.items() if k != "census"}}
        write_json(opts.json, payload)
        print(f"\nwrote {opts.json}")
    return 0
