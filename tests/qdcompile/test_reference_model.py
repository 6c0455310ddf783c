"""The embedded default model, end to end: W8A8 calibrate → compile → sample (issue "done when")."""

import json

import pytest
import torch

import qdcompile
from equivalence import assert_equals_fake_quant64
from qdcompile.classifier import digit_metrics
from qdcompile.cli import main


@pytest.fixture(scope="module")
def w8a8():
    unet, scheduler = qdcompile.reference_model("mnist")
    meta = qdcompile.calibrate(unet, scheduler, qdcompile.QuantRecipe.w8a8(), num_samples=32,
                               num_inference_steps=50, progress=False)
    return unet, scheduler, meta


def test_shipped_model_makes_digits():
    unet, scheduler = qdcompile.reference_model("mnist")
    assert type(unet).__name__ == "UNet2DModel" and type(scheduler).__name__ == "DDPMScheduler"
    images = qdcompile.sample(unet, scheduler, num_images=32, num_inference_steps=50,
                              generator=torch.Generator().manual_seed(0), progress=False)
    m = digit_metrics(images)
    # A 1.1M-parameter DDPM trained for ~1 h on one CPU core. The classifier (99.0% held-out
    # accuracy; confident > 0.9 on 96.7% of real digits) is confident on 0.76-0.81 of its
    # 50-step samples (512 and 64 samples measured); random noise or a collapsed model scores
    # near 0 and hits few classes. 0.6 leaves room for the 32-sample draw here.
    assert m["confident_fraction"] >= 0.6 and m["mean_confidence"] >= 0.8, m
    assert sum(c > 0 for c in m["histogram"]) >= 8, m["histogram"]  # no mode collapse


@pytest.mark.inductor   # the embedded model through Inductor, fullgraph
def test_compiled_w8a8_is_accurate_and_matches_metadata(w8a8):
    unet, scheduler, meta = w8a8
    fast = torch.compile(unet, backend="qdiff", fullgraph=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 28, 28, generator=g)
    snrs = []
    with torch.no_grad():
        for t in (999, 500, 100, 10):
            tt = torch.full((8,), t)
            fp = unet(x, tt).sample
            # exact: the float64 fake-quant of the metadata, followed only at rounding ties
            out = assert_equals_fake_quant64(fast, unet, meta, x, tt)["out"]
            snrs.append(float(10 * torch.log10(fp.pow(2).mean() / (out - fp).pow(2).mean())))
    assert min(snrs) >= 30.0, snrs
    rep = qdcompile.report(fast)
    assert rep.counts["quantized"] == rep.counts["layers"] == len(meta.layers)


def test_quantized_samples_stay_digits(w8a8, monkeypatch):
    unet, scheduler, meta = w8a8
    fast = torch.compile(unet, backend="qdiff")
    kw = dict(num_images=16, num_inference_steps=25, progress=False)
    quant = qdcompile.sample(fast, scheduler, generator=torch.Generator().manual_seed(2), **kw)
    fp = qdcompile.sample(unet, scheduler, generator=torch.Generator().manual_seed(2), **kw)
    mq, mf = digit_metrics(quant), digit_metrics(fp)
    assert mq["confident_fraction"] >= mf["confident_fraction"] - 0.1, (mq, mf)
    agree = float((mq["predictions"] == mf["predictions"]).float().mean())
    assert agree >= 0.8, agree  # same seeds → mostly the same digits


# The README's command as a user runs it, except that the rewritten graph runs without Inductor (the
# autouse fixture in conftest.py): the embedded model through Inductor is the test above; this one
# checks what the command adds (calibration, files, report, summary) and would compile the same graph.
def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--num-images", "4", "--steps", "10", "--calib-samples", "8", "--out", str(tmp_path),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "on integer kernels" in out and "CPU timings say nothing about GPU speed" in out
    assert "this takes minutes once, later calls reuse the compiled code" in out   # why the first call is slow
    assert (tmp_path / "mnist.w8a8.png").is_file() and (tmp_path / "mnist.w8a8.qdiff").is_file()
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["eps_snr_db_t500"] > 20
    qdcompile.load_metadata(tmp_path / "mnist.w8a8.qdiff")
