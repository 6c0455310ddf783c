"""The quality harness: signal metrics with known values, FID/KID formulas, the torch-fidelity
feature extractor (skipped where torch-fidelity cannot be imported), and ``qdcompile eval``
end to end on tiny models."""

import argparse
import json
import math
import sys

import numpy as np
import pytest
import torch

from qdcompile.commands.eval import add_parser, parse_recipe_set
from qdcompile.evaluation.configs import CONFIGS, EvalConfig, NotAvailable, correlated_snr_check, quantized_model
from qdcompile.evaluation.fid import (MNIST_FEATURES, FidelityUnavailable, _import_torch_fidelity, fid_kid,
                                     kernel_distance, paired_fid_delta, real_mnist_images,
                                     register_mnist_feature_extractor, uint8_to_mnist)
from qdcompile.evaluation.metrics import colour_moments, colour_w2, frechet_distance, to_uint8
from qdcompile.evaluation.runner import EvalOptions
from qdcompile.evaluation.trajectory import snr_f, step_snr, summarize_snr
from qdcompile.metrics import psnr_db, snr_db, snr_q
from qdcompile.trajectory import TrajectoryRecorder
from qdcompile.sampling import call_unet, sample
from tiny_models import scheduler, tiny_unet2d


def _fidelity_or_skip():
    try:
        return _import_torch_fidelity()
    except FidelityUnavailable as e:
        pytest.skip(f"torch-fidelity unavailable: {e}")


def _mnist_or_skip(n):
    try:
        return real_mnist_images(n)
    except FileNotFoundError as e:
        pytest.skip(f"MNIST test set not found (shared data): {e}")


# ---------------------------------------------------------------------------- signal metrics
def test_snr_psnr_known_values():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) + 0.5
    signs = torch.where(torch.rand(ref.shape, generator=g) > 0.5, 1.0, -1.0).double()
    # noise with exactly 1/100 of the signal energy
    noise = signs * ref.pow(2).mean().sqrt() * 0.1
    assert snr_db(ref, ref + noise) == pytest.approx(20.0, abs=1e-9)
    assert snr_q(ref, ref + noise) == pytest.approx(10.0, rel=1e-12)
    img = torch.full((2, 1, 4, 4), 0.5, dtype=torch.float64)
    assert psnr_db(img, img + 0.1) == pytest.approx(20.0, abs=1e-9)   # MSE 0.01
    assert psnr_db(img, img + 0.01) == pytest.approx(40.0, abs=1e-9)
    assert psnr_db(img * 255, img * 255 + 25.5, peak=255) == pytest.approx(20.0, abs=1e-9)
    assert math.isinf(snr_db(ref, ref)) and math.isinf(snr_q(ref, ref)) and math.isinf(psnr_db(img, img))


def test_snr_f_is_alpha_bar_ratio():
    s = scheduler()
    for t in (0, 499, 999):
        a = float(s.alphas_cumprod[t])
        assert snr_f(s, torch.tensor(t)) == pytest.approx(a / (1 - a))
    assert snr_f(object(), 10) is None


def test_step_snr_along_fp_trajectory_with_a_callable():
    unet, sched = tiny_unet2d(seed=1), scheduler()
    rec = TrajectoryRecorder(limit=3)
    sample(unet, sched, num_images=4, num_inference_steps=3, batch_size=2, generator=torch.Generator().manual_seed(0),
           progress=False, callback=rec)
    traj = rec.finish(unet)
    assert traj.num_images == 3 and len(traj.steps) == 6            # batches of 2 + 1 kept, 3 steps each
    assert {s.x.shape[0] for s in traj.steps} == {2, 1}

    def quant(x, t, kw):                                            # ε̂ = 1.1 ε: SNR_Q = 10 exactly
        return 1.1 * call_unet(unet, x, t, kw)

    steps = step_snr(traj, quant, sched)
    assert [s.step for s in steps] == [0, 1, 2]
    for s in steps:
        assert s.snr_q == pytest.approx(10.0, rel=1e-4) and s.snr_q_db == pytest.approx(20.0, abs=1e-3)
        a = float(sched.alphas_cumprod[s.timestep])
        assert s.snr_f == pytest.approx(a / (1 - a)) and s.snr_f_db == pytest.approx(10 * math.log10(a / (1 - a)))
    assert all(math.isinf(s.snr_q) for s in step_snr(traj, unet, sched))   # FP against itself
    summary = summarize_snr(steps)
    assert summary["mean_snr_q_db"] == pytest.approx(20.0, abs=1e-3)
    # SNR_F grows past 10 as t -> 0 only for small t; the rule flags exactly the steps with SNR_Q <= SNR_F
    assert summary["steps_snr_q_below_snr_f"] == [s.step for s in steps if s.snr_f >= s.snr_q]


# ---------------------------------------------------------------------------- FID / KID formulas
def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(f, f)) < 1e-8
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert frechet_distance(f, f + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-8)
    # f2 = 2 f: Σ₂ = 4 Σ₁, so FID = ‖μ₁‖² + tr Σ₁ + 4 tr Σ₁ − 4 tr Σ₁
    expected = float(f.mean(0).pow(2).sum() + torch.cov(f.T).trace())
    assert frechet_distance(f, 2 * f) == pytest.approx(expected, rel=1e-8)


def test_paired_fid_delta_interval():
    g = torch.Generator().manual_seed(7)
    mix = torch.randn(5, 5, generator=g, dtype=torch.float64)
    real = torch.randn(400, 5, generator=g, dtype=torch.float64) @ mix
    a = torch.randn(120, 5, generator=g, dtype=torch.float64) @ mix
    same = paired_fid_delta(a, a.clone(), real, boots=50)
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0]
    # a small perturbation of each sample: a difference within the sampling noise
    near = paired_fid_delta(a + 0.01 * torch.randn(a.shape, generator=g, dtype=torch.float64), a, real, boots=100)
    assert near["ci95"][0] < near["delta"] < near["ci95"][1] and near["ci95"][0] <= 0 <= near["ci95"][1]
    # a shifted set is clearly worse: the whole interval is above 0
    far = paired_fid_delta(a + 2.0, a, real, boots=100)
    assert far["ci95"][0] > 0 and far["ci95"][0] < far["delta"] < far["ci95"][1]
    with pytest.raises(ValueError, match="one shape"):
        paired_fid_delta(a, a[:10], real)


def test_colour_w2_measures_casts_in_levels():
    g = torch.Generator().manual_seed(11)
    base = torch.randint(40, 200, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    m = colour_moments(base)
    assert m.shape == (64, 6) and m.dtype == torch.float64
    assert torch.allclose(m[:, :3], base.double().mean(dim=(2, 3))) and torch.allclose(m[:, 3:], base.double().std(dim=(2, 3)))
    assert torch.equal(colour_moments(base.float() / 255), m)   # floats in [0, 1] are the same images
    assert colour_w2(m, m.clone()) == pytest.approx(0.0, abs=1e-6)
    red = base.clone()
    red[:, 0] += 9                                                  # a uniform cast of 9 levels on one channel
    assert colour_w2(colour_moments(red), m) == pytest.approx(9.0, rel=1e-6)
    flat = ((base.double() - 120) * 0.5 + 120).round().to(torch.uint8)   # halved contrast, same mean
    assert colour_w2(colour_moments(flat), m) > 5
    # the paired bootstrap takes it as its distance: the cast is a significant, exact difference
    other = torch.randint(40, 200, (200, 3, 8, 8), generator=g, dtype=torch.uint8)
    d = paired_fid_delta(colour_moments(red), m, colour_moments(other), boots=50, distance=colour_w2)
    ref = colour_moments(other)
    assert d["delta"] == pytest.approx(colour_w2(colour_moments(red), ref) - colour_w2(m, ref))
    assert d["ci95"][0] > 0


def test_correlated_snr_check_counts_steps_with_positive_k():
    def snr(values):
        return [{"step": i, "snr_q_db": v} for i, v in enumerate(values)]

    rows = [{"key": "fp", "status": "ok"},
            {"key": "ptqd-raw", "status": "ok", "snr_steps": snr([20.0, 21.0, 22.0, 23.0]),
             "ptqd_steps": [{"step": i, "k": 0.0} for i in range(4)]},
            {"key": "ptqd-k", "status": "ok", "corrections": "k", "snr_steps": snr([20.0, 21.5, 21.9, 23.0]),
             "ptqd_steps": [{"step": 0, "k": 0.0}, {"step": 1, "k": 0.02}, {"step": 2, "k": 0.01},
                            {"step": 3, "k": 0.0}]},
            {"key": "ptqd-k-bc", "status": "ok", "corrections": "k+bias", "snr_steps": snr([21.0, 21.2, 22.5, 23.5]),
             "ptqd_steps": [{"step": i, "k": 0.0} for i in range(4)]},
            # the PTQD row whose correction check dropped k: nothing to check
            {"key": "ptqd", "status": "ok", "corrections": "bias+VSC", "snr_steps": snr([20.0, 21.0, 22.0, 23.0]),
             "ptqd_steps": [{"step": 1, "k": 0.02}]}]
    correlated_snr_check(rows)
    c = rows[2]["snr_where_k_positive"]
    assert c["vs"] == "ptqd-raw" and c["steps"] == [1, 2] and c["raised"] == [1]
    assert c["mean_gain_db"] == pytest.approx((0.5 - 0.1) / 2)
    assert rows[3]["snr_where_k_positive"]["steps"] == [] and rows[3]["snr_where_k_positive"]["mean_gain_db"] is None
    assert all("snr_where_k_positive" not in rows[i] for i in (0, 1, 4))


def test_kernel_distance_matches_direct_mmd():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g) + 0.7
    k = lambda a, b: ((a.double() @ b.double().T) / 5 + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x).numpy(), k(y, y).numpy(), k(x, y).numpy()
    m = 40
    direct = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    mean, std = kernel_distance(x, y, subset_size=40, subsets=3)   # full sets: every subset is the same
    assert mean == pytest.approx(direct, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    a, b = torch.randn(400, 5, generator=g), torch.randn(400, 5, generator=g)
    same_dist, _ = kernel_distance(a, b, subset_size=200, subsets=10)
    shifted, _ = kernel_distance(a, b + 0.7, subset_size=200, subsets=10)
    assert abs(same_dist) < shifted / 20
    with pytest.raises(ValueError, match="larger than a feature set"):
        kernel_distance(x, y, subset_size=41)


def test_uint8_conversion_for_the_classifier():
    g = torch.Generator().manual_seed(0)
    gray = to_uint8(torch.rand(3, 1, 28, 28, generator=g))
    assert gray.dtype == torch.uint8
    one = uint8_to_mnist(gray)
    torch.testing.assert_close(one, uint8_to_mnist(gray.expand(-1, 3, -1, -1)))   # gray replicated to RGB
    assert one.shape == (3, 1, 28, 28) and 0 <= one.min() and one.max() <= 1
    assert uint8_to_mnist(to_uint8(torch.rand(2, 3, 32, 32, generator=g))).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="expected uint8"):
        uint8_to_mnist(torch.rand(2, 1, 28, 28))


def test_builtin_fid_with_classifier_features_on_real_digits():
    real = _mnist_or_skip(600)
    a, b = real[:300], real[300:]
    fid_same = fid_kid(a, b, backend="builtin", kid_subsets=10)
    shifted = torch.roll(a, shifts=(4, 4), dims=(2, 3))
    fid_shifted = fid_kid(shifted, b, backend="builtin", kid_subsets=10)
    # identical sets: 0 up to the square roots of round-off-sized eigenvalues (~1e-6 on FIDs of ~10-100)
    assert abs(fid_kid(a, a, backend="builtin", kid_subsets=2)["fid"]) < 1e-4
    assert fid_shifted["fid"] > 5 * fid_same["fid"] and fid_shifted["kid_mean"] > fid_same["kid_mean"]
    assert fid_same["kid_subset_size"] == 300


def test_torch_fidelity_registered_extractor_and_builtin_agree():
    _fidelity_or_skip()
    real = _mnist_or_skip(400)
    a, b = real[:200], real[200:]
    assert register_mnist_feature_extractor() == register_mnist_feature_extractor() == MNIST_FEATURES
    same = fid_kid(a, a, backend="torch-fidelity", kid_subsets=5)
    assert abs(same["fid"]) < 1e-3
    shifted = torch.roll(a, shifts=(4, 4), dims=(2, 3))
    tf = fid_kid(shifted, b, backend="torch-fidelity", kid_subsets=5)
    builtin = fid_kid(shifted, b, backend="builtin", kid_subsets=5)
    assert tf["fid"] > 1.0
    assert builtin["fid"] == pytest.approx(tf["fid"], rel=1e-4)
    assert builtin["kid_mean"] == pytest.approx(tf["kid_mean"], rel=1e-4, abs=1e-7)


def test_fidelity_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)   # as if not installed
    with pytest.raises(FidelityUnavailable, match=r'pip install -e "\.\[eval\]"'):
        _import_torch_fidelity()


# ---------------------------------------------------------------------------- configurations
def test_configs_build_their_recipes_or_say_why():
    from qdcompile import QuantRecipe

    assert CONFIGS["fp"].recipe() is None
    r = CONFIGS["w8a8"].recipe()
    assert (r.weight_bits, r.act_bits, r.method) == (8, 8, "rtn")
    r = CONFIGS["w4a8-rtn"].recipe({"recon_iters": 7})
    assert (r.weight_bits, r.method, getattr(r, "split", False)) == (4, "rtn", False)
    bogus = EvalConfig("x", "X", "w4a8", (("weight_bits", 3),))
    with pytest.raises(NotAvailable, match="weight_bits must be 4 or 8"):
        bogus.recipe()
    for key in ("w4a8-qdiff", "w4a8-qdiff-split"):   # built, or not available with a reason
        try:
            r = CONFIGS[key].recipe()
        except NotAvailable as e:
            assert str(e)
        else:
            assert r.method != "rtn" and isinstance(r, QuantRecipe)
    assert parse_recipe_set("recon_iters=20, act_lsq_iters=5,act_observer=percentile") == (
        ("recon_iters", 20), ("act_lsq_iters", 5), ("act_observer", "percentile"))
    with pytest.raises(ValueError, match="not QuantRecipe fields"):
        EvalOptions(recipe_overrides=(("recon_iter", 5),))
    with pytest.raises(ValueError, match="unknown configuration"):
        EvalOptions(configs=("w9a9",))


# ---------------------------------------------------------------------------- the command
def _tiny28(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def model28(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny28")
    _tiny28().save_pretrained(root / "unet")
    scheduler().save_pretrained(root / "scheduler")
    return root


def _parse(argv):
    parser = argparse.ArgumentParser(prog="qdcompile")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _small_eval(model, out, configs: str, samples: int, steps: int, extra=()):
    """Parsed ``qdcompile eval`` arguments for a small builtin-FID, simulated run."""
    return _parse(["eval", "--model", str(model), "--configs", configs, "--num-samples", str(samples),
                   "--steps", str(steps), "--calib-samples", "2", "--snr-samples", "2", "--real-samples", "100",
                   "--kid-subsets", "3", "--fid-backend", "builtin", "--backend", "simulate", "--out", str(out),
                   *extra, "--quiet"])


def test_eval_command_writes_table_json_and_pngs(model28, tmp_path, capsys):
    _mnist_or_skip(10)
    out = tmp_path / "out"
    args = _small_eval(model28, out, "fp,w8a8,w4a8-rtn", samples=4, steps=2)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "not comparable to published fids" in printed.lower() and "W4A8 (RTN)" in printed
    for pattern in ("quality-*.json", "quality-*.md", "quality-*-samples.png", "quality-*-snr.png"):
        assert len(list(out.glob(pattern))) == 1, pattern
    assert not list(out.glob(".*"))   # no temporary files left
    data = json.loads(next(out.glob("quality-*.json")).read_text())
    rows = {r["key"]: r for r in data["configs"]}
    assert data["fid"]["backend"] == "builtin" and "NOT comparable" in data["fid"]["note"]
    assert len(data["fid"]["weights_sha256"]) == 64 and data["fid"]["real_images"] == 100
    assert all(rows[k]["status"] == "ok" for k in ("fp", "w8a8", "w4a8-rtn"))
    for k in ("fp", "w8a8", "w4a8-rtn"):
        assert rows[k]["fid"] > 0 and rows[k]["kid_subset_size"] == 4
    for k in ("w8a8", "w4a8-rtn"):
        assert len(rows[k]["snr_steps"]) == 2 and math.isfinite(rows[k]["psnr_vs_fp_db"])
    assert rows["w8a8"]["mean_snr_q_db"] > rows["w4a8-rtn"]["mean_snr_q_db"]   # 8-bit weights are closer to FP
    for k in ("w8a8", "w4a8-rtn"):   # paired bootstrap ΔFID against FP
        (d,) = rows[k]["fid_delta"]
        assert d["vs"] == "fp" and d["ci95"][0] <= d["delta"] <= d["ci95"][1]
        assert d["delta"] == pytest.approx(rows[k]["fid"] - rows["fp"]["fid"], rel=1e-6)
    md = next(out.glob("quality-*.md")).read_text()
    assert "| W8A8 (RTN) |" in md and "NOT comparable" in md and "W8A8 (RTN) − fp:" in md


def test_eval_ptqd_rows_compare_with_their_uncorrected_row(model28, tmp_path, capsys):
    _mnist_or_skip(10)
    out = tmp_path / "out"
    args = _small_eval(model28, out, "fp,ptqd-raw,ptqd", samples=6, steps=3,
                       extra=("--recipe-set", "recon_iters=4,act_lsq_iters=2,noise_samples=2"))
    assert args.func(args) == 0
    rows = {r["key"]: r for r in json.loads(next(out.glob("quality-*.json")).read_text())["configs"]}
    assert [d["vs"] for d in rows["ptqd-raw"]["fid_delta"]] == ["fp"]
    vs_fp, vs_raw = rows["ptqd"]["fid_delta"]
    assert (vs_fp["vs"], vs_raw["vs"]) == ("fp", "ptqd-raw")
    assert vs_raw["delta"] == pytest.approx(rows["ptqd"]["fid"] - rows["ptqd-raw"]["fid"], rel=1e-6, abs=1e-9)
    assert "− ptqd-raw:" in next(out.glob("quality-*.md")).read_text()
    assert all(rows[k]["fid_vs_fp_samples"] > 0 for k in ("ptqd-raw", "ptqd")) and "fid_vs_fp_samples" not in rows["fp"]
    # colour: W2 vs real on every row, shift vs FP and paired deltas on the quantized ones
    assert all(rows[k]["colour_w2"] > 0 for k in ("fp", "ptqd-raw", "ptqd"))
    assert "colour_shift_vs_fp" not in rows["fp"] and len(rows["ptqd"]["colour_shift_vs_fp"]) == 1
    c_fp, c_raw = rows["ptqd"]["colour_delta"]
    assert (c_fp["vs"], c_raw["vs"]) == ("fp", "ptqd-raw")
    assert c_raw["delta"] == pytest.approx(rows["ptqd"]["colour_w2"] - rows["ptqd-raw"]["colour_w2"], abs=1e-9)
    check = rows["ptqd"]["snr_where_k_positive"]
    assert check["vs"] == "ptqd-raw" and set(check["raised"]) <= set(check["steps"]) <= {0, 1, 2}
    md = next(out.glob("quality-*.md")).read_text()
    assert "Δ colour W2" in md and "SNR_Q (sampler) at the steps where k > 0" in md


def test_eval_command_reports_unavailable_configs(model28, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(CONFIGS, "broken", EvalConfig("broken", "Broken", "w4a8", (("method", "nope"),)))
    args = _parse(["eval", "--model", str(model28), "--configs", "fp,broken", "--num-samples", "2", "--steps", "1",
                   "--no-fid", "--out", str(tmp_path), "--quiet"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "Broken" in printed and "not available" in printed and "method must be one of" in printed
    data = json.loads(next(tmp_path.glob("quality-*.json")).read_text())
    assert [r["status"] for r in data["configs"]] == ["ok", "not available"]


def test_eval_command_without_torch_fidelity_fails_clearly(model28, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    args = _parse(["eval", "--model", str(model28), "--configs", "fp", "--num-samples", "2", "--steps", "1",
                   "--out", str(tmp_path), "--quiet"])
    _mnist_or_skip(10)
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[eval\]"'):
        args.func(args)
    assert not list(tmp_path.iterdir())   # failed before doing any work


def test_qdiff_and_simulate_give_the_same_snr(monkeypatch):
    """The compiled integer path and the fake-quant simulation of one metadata agree."""
    from qdcompile import QuantRecipe
    from qdcompile.api import attached_metadata
    from qdcompile.calibration import calibrate

    monkeypatch.setenv("QDCOMPILE_INDUCTOR", "0")   # rewritten graph without Inductor: fast to compile
    unet, sched = tiny_unet2d(seed=2), scheduler()
    meta = calibrate(unet, sched, QuantRecipe.w8a8(), num_samples=2, num_inference_steps=2,
                               progress=False, attach=False)
    rec = TrajectoryRecorder(limit=2)
    sample(unet, sched, num_images=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
           progress=False, callback=rec)
    traj = rec.finish(unet)
    with quantized_model(unet, meta, "simulate") as sim:
        by_sim = step_snr(traj, sim, sched)
    with quantized_model(unet, meta, "qdiff") as fast:
        by_qdiff = step_snr(traj, fast, sched)
    assert attached_metadata(unet) is None          # the model itself stays float
    for a, b in zip(by_sim, by_qdiff):
        assert 10 < a.snr_q < math.inf
        assert b.snr_q_db == pytest.approx(a.snr_q_db, abs=0.5)


def test_bench_script_shares_the_command_options(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--inception-weights" in text and "w4a8-qdiff-split" in text and "bench/results" in text.replace("\n", "")
