"""The command line on diffusers folders written with save_pretrained (the real loading code)."""

import os
import re

import pytest
import torch

from qdcompile.cli import main
from tiny_models import scheduler, tiny_unet2d, tiny_unet2d_condition


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny_unet2d(seed=5).save_pretrained(root / "unet")
    scheduler().save_pretrained(root / "scheduler")
    return root


def test_calibrate_then_sample(model_dir, tmp_path, capsys):
    meta = tmp_path / "tiny.w8a8.qdiff"
    assert main(["calibrate", "--model", str(model_dir), "--recipe", "w8a8", "--out", str(meta),
                 "--num-samples", "2", "--steps", "4", "--quiet"]) == 0
    assert meta.is_file() and "51 layers quantized" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert meta.stat().st_mode & 0o777 == 0o666 & ~umask   # not the temporary file's 0600
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(model_dir), "--metadata", str(meta), "--out", str(grid),
                 "--num-images", "2", "--steps", "3", "--compare-fp", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert grid.is_file() and grid.stat().st_size > 100 and grid.stat().st_mode & 0o777 == 0o666 & ~umask
    assert "sample PSNR vs FP" in out and "51 conv/linear layers: 51 on integer kernels" in out
    assert re.search(r"colour shift vs FP \(mean per channel, 8-bit levels\): [+-]\d+\.\d$", out, re.M)   # 1 channel


def test_bad_inputs_exit_with_a_message(model_dir, tmp_path, capsys):
    assert main(["calibrate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.qdiff")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["calibrate", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "x.qdiff")]) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err
    junk = tmp_path / "junk.qdiff"
    junk.write_bytes(torch.randn(64).numpy().tobytes())
    assert main(["sample", "--model", str(model_dir), "--metadata", str(junk), "--quiet"]) == 2
    assert "not a readable qdcompile metadata file" in capsys.readouterr().err
    # metadata calibrated for another model (same class, other weights)
    other = tmp_path / "other"
    tiny_unet2d(seed=6).save_pretrained(other / "unet")
    scheduler().save_pretrained(other / "scheduler")
    meta = tmp_path / "other.qdiff"
    assert main(["calibrate", "--model", str(other), "--out", str(meta), "--num-samples", "1", "--steps", "2",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["sample", "--model", str(model_dir), "--metadata", str(meta), "--quiet"]) == 2
    assert "weights differ from the weights this metadata was calibrated on" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written


def test_conditional_model_needs_prompt_embeds(tmp_path, capsys):
    root = tmp_path / "cond"
    tiny_unet2d_condition().save_pretrained(root / "unet")
    scheduler().save_pretrained(root / "scheduler")
    assert main(["calibrate", "--model", str(root), "--out", str(tmp_path / "c.qdiff")]) == 2
    assert "pass --prompt-embeds" in capsys.readouterr().err
    emb = tmp_path / "emb.pt"
    torch.save(torch.randn(1, 5, 24), emb)
    assert main(["calibrate", "--model", str(root), "--out", str(tmp_path / "c.qdiff"), "--prompt-embeds", str(emb),
                 "--num-samples", "2", "--steps", "3", "--quiet"]) == 0


def test_sample_with_mixed_metadata_prints_the_plan(model_dir, tmp_path, capsys):
    from qdcompile import QuantRecipe, calibrate

    # sampler-space statistics, fixed: the DDIM warning below is about them ("auto" may pick either
    # space for this tiny model, depending on the CPU's rounding)
    meta = calibrate(tiny_unet2d(seed=5), scheduler(), QuantRecipe.mixed(recon_iters=4, act_lsq_iters=2, noise_samples=2,
                                                                         noise_space="sampler"),
                     num_samples=2, num_inference_steps=4, progress=False, attach=False)
    path = meta.save(tmp_path / "tiny.mixed.qdiff")
    assert main(["sample", "--model", str(model_dir), "--metadata", str(path), "--num-images", "2", "--steps", "4",
                 "--scheduler", "ddim", "--eta", "0.5", "--quiet"]) == 0
    out = capsys.readouterr().out
    # the corrections the calibration's check kept, and the check's numbers
    from qdcompile.pipeline import Corrections

    kept = Corrections.default_for(meta)
    assert kept.variance and kept == Corrections(**meta.calibration["correction_check"]["kept"])
    assert f"precision plan (mixed, rule SNR_Q > SNR_F (PTQD), corrections {kept.label()}" in out
    assert "correction check (8 samples, mean squared difference to FP's): none " in out
    assert main(["sample", "--model", str(model_dir), "--metadata", str(path), "--num-images", "2", "--steps", "4",
                 "--scheduler", "ddim", "--eta", "0.5", "--quiet", "--all-corrections"]) == 0
    out = capsys.readouterr().out
    assert "precision plan (mixed, rule SNR_Q > SNR_F (PTQD), corrections k+bias+VSC" in out
    # calibrated on the clipping DDPM scheduler, sampled with DDIM: said, not silently mixed up
    assert "DDIMScheduler does not clip" in out
    used = {b for _, b in meta.precision_plan}
    assert all(f"A{b}: " in out for b in used) and "correlated-noise k" in out
    # both ways to give the quantization, or eta without DDIM: clear errors
    assert main(["sample", "--model", str(model_dir), "--metadata", str(path), "--recipe", "mixed", "--quiet"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["sample", "--model", str(model_dir), "--metadata", str(path), "--no-correction", "--all-corrections",
                 "--quiet"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["sample", "--model", str(model_dir), "--metadata", str(path), "--eta", "0.5", "--quiet"]) == 2
    assert "--scheduler ddim" in capsys.readouterr().err
    assert main(["sample", "--model", str(model_dir), "--metadata", str(path), "--snr-margin", "20", "--quiet"]) == 2
    assert "--recipe mixed" in capsys.readouterr().err


def test_stable_diffusion_folder_with_a_prompt(tmp_path, capsys):
    """A pipeline folder written with save_pretrained: --prompt encodes the text with its CLIP
    encoder, calibrates on it, then runs the diffusers pipeline itself, quantized (CFG, VAE)."""
    pytest.importorskip("transformers")
    from PIL import Image

    from tiny_models import tiny_sd_pipeline

    (tmp_path / "tok").mkdir()
    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "sd")
    sd, meta, grid = str(tmp_path / "sd"), tmp_path / "sd.w8a8.qdiff", tmp_path / "sd.png"
    assert main(["calibrate", "--model", sd, "--prompt", "a photo of a cat", "--out", str(meta),
                 "--num-samples", "2", "--steps", "3", "--guidance-scale", "4", "--quiet"]) == 0
    import qdcompile
    cal = qdcompile.load_metadata(meta).calibration
    assert cal["guidance_scale"] == 4.0 and cal["calib_set_size"] == 2 * 2 * 3   # both halves of each guided call
    capsys.readouterr()
    assert main(["sample", "--model", sd, "--metadata", str(meta), "--prompt", "a red house in the snow",
                 "--num-images", "2", "--steps", "3", "--guidance-scale", "4", "--scheduler", "ddim", "--eta", "0.5",
                 "--compare-fp", "--out", str(grid), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "sample PSNR vs FP" in out and "on integer kernels" in out
    assert re.search(r"colour shift vs FP .*: ([+-]\d+\.\d/){2}[+-]\d+\.\d$", out, re.M)   # decoded RGB images
    with Image.open(grid) as im:   # FP and quantized rows of two decoded 16x16 RGB images (2 px gaps, x2, labels)
        assert im.mode == "RGB" and im.size == (2 * 2 * (16 + 2), 2 * (2 * (16 + 2) + 16))
    # what cannot work says why
    assert main(["sample", "--model", "mnist", "--recipe", "w8a8", "--prompt", "a cat", "--quiet"]) == 2
    assert "model_index.json" in capsys.readouterr().err
    emb = tmp_path / "emb.pt"
    torch.save(torch.randn(1, 5, 24), emb)
    assert main(["sample", "--model", sd, "--metadata", str(meta), "--prompt", "a cat", "--prompt-embeds", str(emb),
                 "--quiet"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["sample", "--model", "mnist", "--recipe", "w8a8", "--guidance-scale", "3", "--quiet"]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["calibrate", "--model", "mnist", "--guidance-scale", "3", "--out", str(tmp_path / "x.qdiff"),
                 "--quiet"]) == 2
    assert "--prompt" in capsys.readouterr().err


# ---------------------------------------------------------------------------- no work lost to a mistake
def _no_calibration(monkeypatch):
    import qdcompile

    def fail(*a, **k):
        raise AssertionError("calibration started before the arguments were checked")
    monkeypatch.setattr(qdcompile, "calibrate", fail, raising=False)


def test_output_paths_checked_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    _no_calibration(monkeypatch)
    (tmp_path / "folder").mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [
        (["calibrate", "--model", str(model_dir), "--out", str(tmp_path / "folder")],
         "--out '.*folder' is an existing folder; give a file name"),
        (["calibrate", "--model", str(model_dir), "--out", str(blocker / "m.qdiff")], "is a file, not a folder"),
        (["calibrate", "--model", str(model_dir), "--out", str(tmp_path / "m.qdiff"), "--checkpoint",
          str(tmp_path / "folder")], "--checkpoint .* is an existing folder"),
        (["sample", "--model", str(model_dir), "--recipe", "w8a8", "--out", str(tmp_path / "folder")],
         "--out .* is an existing folder"),
        (["sample", "--model", str(model_dir), "--recipe", "w8a8", "--save-metadata", str(blocker / "x")],
         "--save-metadata .* is a file, not a folder"),
        (["demo", "--out", str(blocker)], "--out .*a-file' is an existing file, not a folder"),
    ]
    for argv, message in cases:
        assert main(argv + ["--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err) and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv,message", [
    (["calibrate", "--out", "x.qdiff", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["calibrate", "--out", "x.qdiff", "--num-samples", "-1"], "argument --num-samples: must be >= 1, got -1"),
    (["calibrate", "--out", "x.qdiff", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["calibrate", "--out", "x.qdiff", "--calib-steps", "x"], "argument --calib-steps: expected an integer >= 1"),
    (["demo", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["sample", "--num-images", "0"], "argument --num-images: must be >= 1, got 0"),
])
def test_counts_are_checked_with_the_option_names(model_dir, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    if argv[0] != "demo":
        argv = argv[:1] + ["--model", str(model_dir)] + argv[1:]
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    assert e.value.code == 2 and message in out.err and out.out == ""
    assert not list(tmp_path.iterdir())   # no empty output folder left behind (demo)


def test_sample_says_what_to_pass(model_dir, capsys, monkeypatch):
    _no_calibration(monkeypatch)
    assert main(["sample", "--model", str(model_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--metadata FILE" in err and "--recipe NAME" in err and "not both" not in err


def test_ctrl_c_is_one_line_and_a_rerun_resumes(model_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C during calibrate: one line, exit code 130; with --checkpoint the same command then
    resumes from the saved state (calibration set and ranges) and says so."""
    import qdcompile.calibration as calibration

    ckpt, out = tmp_path / "run.ckpt", tmp_path / "m.qdiff"
    argv = ["calibrate", "--model", str(model_dir), "--out", str(out), "--num-samples", "2", "--steps", "3",
            "--checkpoint", str(ckpt), "--quiet"]
    real = calibration._initial_records

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(calibration, "_initial_records", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qdcompile calibrate: interrupted; rerun the same command to resume from {ckpt}"]
    assert ckpt.is_file() and not out.exists()
    monkeypatch.setattr(calibration, "_initial_records", real)
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"resuming calibration from {ckpt} (0 blocks done)" in stdout and out.is_file()
    fresh = tmp_path / "fresh.qdiff"
    assert main(["calibrate", "--model", str(model_dir), "--out", str(fresh), "--num-samples", "2", "--steps", "3",
                 "--quiet"]) == 0
    import qdcompile

    a, b = qdcompile.load_metadata(out), qdcompile.load_metadata(fresh)
    assert all(torch.equal(a.layers[n].weight_q, b.layers[n].weight_q) and a.layers[n].act_scale == b.layers[n].act_scale
               for n in a.layers)   # the resumed run is the uninterrupted one


def test_non_diffusers_modules_get_a_type_error():
    import qdcompile

    seq = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.SiLU())
    for fn in (lambda: qdcompile.sample(seq, scheduler(), num_images=1, num_inference_steps=1, progress=False),
               lambda: qdcompile.calibrate(seq, scheduler(), num_samples=1, num_inference_steps=1, progress=False),
               lambda: qdcompile.sample(torch.compile(seq), scheduler(), progress=False)):
        with pytest.raises(TypeError, match="expects a diffusers UNet2DModel/UNet2DConditionModel .* got Sequential"):
            fn()


def test_demo_heartbeat_shows_progress_while_compiling(capsys):
    """The demo's compile step prints the elapsed time while it runs (quiet: nothing)."""
    import time

    from qdcompile.commands.common import heartbeat as _heartbeat

    with _heartbeat("      compiling", every=0.05):
        time.sleep(0.3)
    beats = capsys.readouterr().out.splitlines()
    assert len(beats) >= 3 and all(re.fullmatch(r" {6}compiling \.\.\. \d+s", b) for b in beats), beats
    with _heartbeat("      compiling", every=0.05, quiet=True):
        time.sleep(0.15)
    assert capsys.readouterr().out == ""
