"""Benchmark library and scripts: size/BOPs arithmetic, PTQD Table 2, latency --smoke."""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from qdcompile import QuantRecipe
from qdcompile.benchmarks.census import census, config_census
from qdcompile.benchmarks.latency import classify_kernel
from qdcompile.benchmarks.ptqd_table import ptqd_table2
from qdcompile.benchmarks.size import bops, model_size
from qdcompile.commands.bench import add_parser

ROOT = Path(__file__).resolve().parents[1]


class _Toy(nn.Module):
    """conv_in 3→8 (3×3, pad 1), GroupNorm(2, 8), a grouped conv (no integer kernel),
    self-attention over the 16 pixels (diffusers Attention, one head of 8), linear 8→4."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2, bias=False)
        self.attn = Attention(8, heads=1, dim_head=8)
        self.proj = nn.Linear(8, 4)

    def forward(self, x, t=None):
        h = self.grouped(self.norm(self.conv_in(x)))          # [1, 8, 4, 4]
        tokens = h.flatten(2).transpose(1, 2)                   # [1, 16, 8]
        return self.proj(self.attn(tokens))                     # [1, 16, 4]


def _toy_census():
    with torch.device("meta"):
        m = _Toy()
    return census(m, inputs=(torch.empty(1, 3, 4, 4, device="meta"), torch.empty(0), {}), name="toy")


def test_census_counts_by_hand():
    c = _toy_census()
    by = {layer.name: layer for layer in c.layers}
    assert set(by) == {"conv_in", "grouped", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj"}
    assert (by["conv_in"].weight_params, by["conv_in"].bias_params, by["conv_in"].macs) == (216, 8, 16 * 8 * 27)
    assert (by["grouped"].weight_params, by["grouped"].macs) == (32, 16 * 8 * 4)
    assert by["grouped"].unsupported and "groups" in by["grouped"].unsupported
    for n in ("attn.to_q", "attn.to_k", "attn.to_v"):
        assert (by[n].weight_params, by[n].bias_params, by[n].macs) == (64, 0, 16 * 64)
    assert (by["attn.to_out.0"].bias_params, by["proj"].weight_params, by["proj"].macs) == (8, 32, 16 * 32)
    assert c.attention_macs == {"attn": 2 * 16 * 16 * 8}        # QKᵀ and AV, 16 tokens, inner dim 8
    assert c.other_params == {"GroupNorm": 16}
    assert c.total_params == 216 + 8 + 16 + 32 + 3 * 64 + 64 + 8 + 32 + 4


def test_size_and_bops_by_hand():
    c = _toy_census()
    fp32 = model_size(c, None, float_bytes=4)
    assert fp32.total_bytes == 4 * c.total_params == 4 * 572
    # W8A8: 6 quantized layers (grouped conv stays float): codes 1 B/weight; scales 4 B/out channel + 8 B/layer
    w8 = model_size(c, QuantRecipe.w8a8(), float_bytes=4)
    q_weights = 216 + 3 * 64 + 64 + 32
    assert w8.bytes["weights_q"] == q_weights
    assert w8.bytes["scales"] == 4 * (8 + 8 + 8 + 8 + 8 + 4) + 6 * 8
    assert w8.bytes["float_weights"] == 4 * 32 and w8.bytes["bias"] == 4 * 20 and w8.bytes["other"] == 4 * 16
    assert model_size(c, QuantRecipe.w8a8(), count_scales=False).total_bytes == q_weights + 4 * (32 + 20 + 16)
    assert w8.runtime_bytes == 4 * 44
    # W4A8 keeps conv_in at 8 bit; int4 rows of K=8 pack into 4 bytes
    w4 = model_size(c, QuantRecipe.w4a8(), float_bytes=2, count_scales=False)
    assert w4.bytes["weights_q"] == 216 + 4 * (8 * 4) + 4 * 4
    assert w4.bytes["float_weights"] == 2 * 32 and w4.params["quantized_8bit"] == 216
    # the asymmetric 4-bit grid adds one zero-point byte per output channel of each 4-bit layer (not conv_in)
    sym, asym = (model_size(c, QuantRecipe.w4a8(weight_grid=g, weight_observer="qdiff-mse"))
                 for g in ("symmetric", "asymmetric"))
    assert asym.bytes["scales"] - sym.bytes["scales"] == 8 + 8 + 8 + 8 + 4
    assert asym.bytes["weights_q"] == sym.bytes["weights_q"]
    macs_conv, macs_lin, macs_grouped = 16 * 8 * 27, 4 * 16 * 64 + 16 * 32, 16 * 8 * 4
    b = bops(c, QuantRecipe.w4a8())
    assert b["layers"] == macs_conv * 8 * 8 + macs_lin * 4 * 8 + macs_grouped * 32 * 32
    assert b["attention"] == 2 * 16 * 16 * 8 * 32 * 32
    assert bops(c, None, float_bits=16)["layers"] == (macs_conv + macs_lin + macs_grouped) * 256
    # weight-only recipe: activations stay float
    wo = QuantRecipe.w8a8(act_bits=None)
    assert bops(c, wo)["layers"] == (macs_conv + macs_lin) * 8 * 32 + macs_grouped * 32 * 32
    # torchao-style linear-only quantization
    lin = model_size(c, QuantRecipe.w8a8(), ops=("linear",), count_scales=False)
    assert lin.bytes["weights_q"] == 4 * 64 + 32


def test_ptqd_table2_sizes_reproduced():
    t = ptqd_table2()
    assert t["params"] == 400_920_579 and t["groupnorm_params"] == 82_560
    for row in t["rows"]:
        assert round(row["exact_convention_MB"], 2) == row["paper_MB"], row
        assert abs(row["first_last_convention_MB"] - row["paper_MB"]) < 0.011, row
    fp = t["rows"][0]
    assert abs(fp["qdcompile_TBOPs"] - fp["paper_TBOPs"]) / fp["paper_TBOPs"] < 0.001   # FP32 BOPs agree to 0.1 %


def test_sd_configs_param_counts():
    assert config_census("sd15").total_params == 859_520_964
    sdxl = config_census("sdxl")
    assert sdxl.total_params == 2_567_463_684 and sdxl.resolution == (128, 128)


@pytest.mark.parametrize("name,cat", [
    ("_qgemm_kernel", "qdiff int GEMM/conv (Triton)"), ("_qconv2d_kernel", "qdiff int GEMM/conv (Triton)"),
    ("_quantize_act_kernel", "qdiff act quantize"),
    ("triton_red_fused_native_group_norm_3", "norms"), ("triton_poi_fused_add_convolution_7", "elementwise/other"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "attention"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "float GEMM/conv (cuBLAS/cuDNN/Inductor)"),
    ("void cudnn::ops::nchwToNhwcKernel", "elementwise/other"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16", "float GEMM/conv (cuBLAS/cuDNN/Inductor)"),
    ("void at::native::vectorized_elementwise_kernel<4, SiLU>", "elementwise/other"),
])
def test_classify_kernel(name, cat):
    assert classify_kernel(name) == cat


def test_bench_size_subcommand(capsys, tmp_path):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "size", "--models", "mnist", "--recipes", "fp32", "w8a8",
                              "--json", str(tmp_path / "s.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "w8a8" in out
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["fp32", "w8a8"] and rows[1]["MB"] < rows[0]["MB"] / 3


def test_latency_smoke_cpu_writes_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(QDCOMPILE_KERNELS="reference", QDCOMPILE_INDUCTOR="0", CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "latency.py"), "--smoke", "--device", "cpu",
                           "--out-dir", str(tmp_path), "--tag", "smoke"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU timings say nothing about GPU speed" in proc.stdout
    (path,) = tmp_path.glob("latency-cpu-*-smoke.json")
    data = json.loads(path.read_text())
    assert {"torch", "triton", "diffusers", "gpu"} <= set(data["env"]) and "latency.py" in data["command"]
    rows = {r["contender"]: r for r in data["rows"]}
    assert rows["fp-eager"]["status"] == "ok" and rows["fp-eager"]["step_s"] > 0
    q = rows["qdiff-w8a8"]
    assert q["status"] == "ok", q
    assert q["step_s"] > 0 and q["e2e_s"] > 0 and q["weight_bytes"] < rows["fp-eager"]["weight_bytes"]
    assert q["layers"]["quantized"] > 0 and q["snr_db_vs_fp_eager"] > 10
    assert q["profile"]["per_step_ms"]["qdiff int GEMM/conv (Triton)"] > 0
    m = rows["qdiff-mixed"]
    assert m["status"] == "ok", m
    assert sum(m["precision_plan"].values()) > 0 and set(m["step_s_by_precision"]) == set(m["precision_plan"])
    assert min(m["step_s_by_precision"].values()) <= m["step_s"] <= max(m["step_s_by_precision"].values())
    assert m["e2e_s"] > 0 and m["graphs_compiled_after_first_call"] == 0
    assert rows["torchao-int8"]["status"] in ("unavailable", "skipped", "ok")
    assert path.with_suffix(".csv").exists() and (tmp_path / (path.stem + "-profile.txt")).exists()
    print(f"latency --smoke took {time.perf_counter() - t0:.1f}s")


def _fid_sensitivity():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import fid_sensitivity
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return fid_sensitivity


def test_fid_sensitivity_perturbations_have_their_stated_size():
    from qdcompile.evaluation.metrics import colour_moments

    g = torch.Generator().manual_seed(3)
    fp = 0.2 + 0.6 * torch.rand(16, 3, 8, 8, generator=g)        # away from 0 and 1: no clamping
    cast = [12.0, -5.0, 7.5]
    p = _fid_sensitivity().perturbations(fp, cast)
    assert torch.equal(p["FP"], fp)
    shift = 255 * (p["FP + the row's colour cast"] - fp).mean(dim=(0, 2, 3))
    assert torch.allclose(shift, torch.tensor(cast), atol=1e-3)
    assert torch.allclose(255 * (p["FP + twice that cast"] - fp).mean(dim=(0, 2, 3)), 2 * torch.tensor(cast), atol=1e-3)
    assert torch.allclose(p["FP + 25 levels grey"] - fp, torch.full_like(fp, 25 / 255), atol=1e-6)
    std = colour_moments(p["FP, contrast x 0.9"])[:, 3:] / colour_moments(fp)[:, 3:]
    assert std.mean().item() == pytest.approx(0.9, abs=0.02)      # uint8 rounding
    noise = p["FP + noise, 8 levels"] - fp
    assert 255 * noise.std().item() == pytest.approx(8.0, rel=0.05) and abs(255 * noise.mean().item()) < 0.5
    blur = p["FP, 3x3 box blur"]
    assert blur.shape == fp.shape and blur.var() < fp.var()


def test_replicates_summary_across_calibrations(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("replicates", ROOT / "bench" / "replicates.py")
    rep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rep)
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    deltas = (torch.randn(4, generator=g) + 0.5).tolist()   # ptqd − ptqd-raw per run
    paths = []
    for seed, d in zip((3, 1, 4, 2), deltas, strict=True):
        lo, hi = d - 0.3, d + 0.3
        fp = {"key": "fp", "status": "ok", "fid": 20.0}
        raw = {"key": "ptqd-raw", "status": "ok", "fid": 19.0, "fid_vs_fp_samples": 0.4,
               "fid_delta": [{"vs": "fp", "delta": -1.0, "ci95": [-1.5, -0.5]}],
               "colour_delta": [{"vs": "fp", "delta": 15.0 + seed, "ci95": [10.0 + seed, 20.0 + seed]}]}
        row = {"key": "ptqd", "status": "ok", "fid": 19.0 + d, "fid_vs_fp_samples": 0.3, "noise_space": "output",
               "fid_delta": [{"vs": "fp", "delta": d - 1.0, "ci95": [d - 1.3, d - 0.7]},
                             {"vs": "ptqd-raw", "delta": d, "ci95": [lo, hi]}]}
        run = {"model": "cifar10", "qdcompile_version": "0", "torch_version": "0", "device": "cpu",
               "date": "today", "command": f"bench/quality.py --seed {seed}", "options": {"seed": seed},
               "configs": [fp, raw, row]}
        paths.append(tmp_path / f"run{seed}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "summary.md"
    assert rep.main([*map(str, paths), "--out", str(out)]) == 0
    text = out.read_text()
    seeds = [int(line.split("|")[1]) for line in text.splitlines() if line.startswith("| ") and "seed" not in line]
    assert seeds == [1, 2, 3, 4]   # sorted by seed
    t = torch.tensor(deltas, dtype=torch.float64)
    want = f"{t.mean():+.2f} ± {t.std() / 2:.2f}"
    above = sum(d - 0.3 > 0 for d in deltas)
    below = sum(d + 0.3 < 0 for d in deltas)
    assert f"* ΔFID ptqd − ptqd-raw: {want}; intervals: {above} above 0, {below} below 0, {4 - above - below} contain 0" \
        in text
    assert "* ΔFID ptqd-raw − FP: -1.00 ± 0.00; intervals: 0 above 0, 4 below 0" in text
    assert "* Δ colour W2 ptqd-raw − FP: +17.50 ± 0.65; intervals: 4 above 0, 0 below 0, 0 contain 0" in text
    assert "Δ colour W2 ptqd −" not in text.split("Across")[1]   # no such record: no line
    bad = json.loads(paths[0].read_text())
    bad["configs"][2]["status"] = "failed"
    paths[0].write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="configuration 'ptqd' did not run"):
        rep.main([str(p) for p in paths])


def test_bench_options_cover_every_command_line_option(capsys, tmp_path):
    """The library entry points take options objects with the command's option names: every option of
    ``qdcompile bench size`` / ``latency`` is a field, and run_size runs from the object alone."""
    import dataclasses

    from qdcompile.benchmarks.latency import LatencyOptions
    from qdcompile.benchmarks.size_report import SizeOptions, run_size
    from qdcompile.commands.bench import add_latency_arguments, add_size_arguments, options_from_args

    for add, cls in ((add_size_arguments, SizeOptions), (add_latency_arguments, LatencyOptions)):
        parser = argparse.ArgumentParser()
        add(parser)
        args = parser.parse_args([])
        assert set(vars(args)) == {f.name for f in dataclasses.fields(cls)}
        assert options_from_args(cls, args) == cls()          # same defaults as the command line
    ours = lambda: {k: v for k, v in os.environ.items() if k.startswith("QDCOMPILE")}  # noqa: E731
    before, threads = ours(), torch.get_num_threads()
    assert run_size(SizeOptions(models=["mnist"], recipes=["w8a8"], json=str(tmp_path / "s.json"))) == 0
    assert ours() == before and torch.get_num_threads() == threads
    assert json.loads((tmp_path / "s.json").read_text())["rows"][0]["recipe"] == "w8a8"
    assert "mnist" in capsys.readouterr().out


def test_fidelity_recipes_and_per_layer_errors():
    """bench/fidelity.py: both sides get the shared budget; the per-layer error is the fake-quantized
    layer's relative output error on its FP input."""
    import importlib.util

    from qdcompile.calibration import calibrate
    from qdcompile.trajectory import TrajectoryRecorder
    from qdcompile.sampling import sample
    from qdcompile.simulate import dequantized_weight, fake_quant_input
    from tiny_models import scheduler, tiny_unet2d

    spec = importlib.util.spec_from_file_location("bench_fidelity", ROOT / "bench" / "fidelity.py")
    fid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fid)
    r = fid.build_recipe("w4a4", {"recon_iters": 7}, {"act_observer": "search"})
    assert (r.name, r.weight_bits, r.act_bits, r.recon_iters, r.act_observer) == ("w4a4", 4, 4, 7, "search")

    unet = tiny_unet2d()
    meta = calibrate(unet, scheduler(), QuantRecipe.w4a4(), num_samples=2, num_inference_steps=3, progress=False,
                     attach=False)
    rec = TrajectoryRecorder(2)
    sample(unet, scheduler(), num_images=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
           progress=False, callback=rec)
    traj = rec.finish(unet)
    errs = fid.layer_errors(unet, meta, traj)
    assert set(errs) == set(meta.layers) and all(0 < e < 1 for e in errs.values())
    x = torch.cat([s.x for s in traj.steps])   # conv_in sees the U-Net input itself
    conv = unet.conv_in
    with torch.no_grad():
        y = conv(x)
        yq = torch.nn.functional.conv2d(fake_quant_input(meta.layers["conv_in"], x),
                                        dequantized_weight(meta.layers["conv_in"]), conv.bias, padding=conv.padding)
    assert errs["conv_in"] == pytest.approx(float((yq - y).pow(2).sum() / y.pow(2).sum()), rel=1e-5)


def test_fidelity_across_calibration_seeds():
    """bench/fidelity.py --calib-seeds: the spread of the paired change over calibration seeds is the
    mean of the per-seed changes with a Student t interval (n − 1 degrees of freedom)."""
    import importlib.util
    import statistics

    spec = importlib.util.spec_from_file_location("bench_fidelity", ROOT / "bench" / "fidelity.py")
    fid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fid)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    vals = (torch.randn(4, 3, generator=gen, dtype=torch.float64)).tolist()   # 4 seeds x 3 metrics
    reps = [{"paired": {"snr_q_db": {"mean": v[0]}, "psnr_vs_fp_db": {"mean": v[1]}, "fid": {"delta": v[2]}}}
            for v in vals]
    out = fid.across_seeds(reps)
    assert set(out) == {"snr_q_db", "psnr_vs_fp_db", "fid"}       # metrics a replicate lacks are left out
    for j, key in enumerate(("snr_q_db", "psnr_vs_fp_db", "fid")):
        col = [v[j] for v in vals]
        m, sd = statistics.fmean(col), statistics.stdev(col)
        half = 3.182 * sd / 2.0                                      # t(0.975, 3) · s / sqrt(4)
        assert out[key]["per_seed"] == col and out[key]["mean"] == pytest.approx(m)
        assert out[key]["ci95"] == pytest.approx([m - half, m + half])
        assert out[key]["positive"] == sum(c > 0 for c in col) and out[key]["seeds"] == 4


def test_bias_probe_fold_removes_the_channel_mean_error():
    """bench/bias_probe.py: the per-channel mean of a layer's output error, folded into its bias,
    leaves no mean error on the data it was estimated from (first layer: its input does not move)."""
    import importlib.util

    from qdcompile.calibration import calibrate
    from qdcompile.sampling import sample
    from qdcompile.trajectory import TrajectoryRecorder
    from tiny_models import scheduler, tiny_unet2d

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_bias_probe", ROOT / "bench" / "bias_probe.py")
        probe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(probe)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    unet = tiny_unet2d()
    meta = calibrate(unet, scheduler(), QuantRecipe.w4a4(), num_samples=2, num_inference_steps=3, progress=False,
                     attach=False)
    rec = TrajectoryRecorder(2)
    sample(unet, scheduler(), num_images=2, num_inference_steps=3,
           generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()))), progress=False,
           callback=rec)
    traj = rec.finish(unet)
    before = probe.channel_mean_errors(unet, meta, traj)
    assert set(before) == set(meta.layers)
    assert before["conv_in"].shape == (unet.conv_in.out_channels,) and before["conv_in"].abs().max() > 0
    fixed = copy.deepcopy(unet)
    probe.fold_bias(fixed, before)
    assert torch.allclose(fixed.conv_in.bias.double(), unet.conv_in.bias.double() - before["conv_in"], atol=1e-7)
    # on conv_in (its input is the trajectory itself) the folded bias cancels the mean error exactly
    from qdcompile.simulate import dequantized_weight, fake_quant_input
    x = torch.cat([s.x for s in traj.steps])
    rec_in, conv = meta.layers["conv_in"], unet.conv_in
    with torch.no_grad():
        y = conv(x).double()
        err = {k: nn.functional.conv2d(fake_quant_input(rec_in, x), dequantized_weight(rec_in), b,
                                       padding=conv.padding).double() - y
               for k, b in (("plain", conv.bias), ("folded", fixed.conv_in.bias))}
    mean = {k: e.mean(dim=(0, 2, 3)) for k, e in err.items()}
    assert torch.allclose(mean["plain"], before["conv_in"], rtol=1e-4, atol=1e-7)
    assert mean["folded"].abs().max() < 1e-3 * mean["plain"].abs().max()
