"""The compiled model equals the float64 fake-quant of its metadata (issue 21).

The reference is built from ``meta.layers`` alone (tests/equivalence.py: ``fake_quant64``). A
plain float64 comparison fails on some inputs for any recipe and reconstruction length: where a
layer input lies within float rounding of a code boundary, fp32 (the compiled model) and float64
pick adjacent codes, and the quantized network spreads that one flip to quantization-noise size
(the 74.6 / 33.2 dB of the issue). The check therefore follows the compiled model's code only at
such ties (within 1e-3 code units of the boundary) and is exact everywhere else.

The reconstruction here is short because the ties do not depend on its length: on the issue's
models (bench/fake_quant64_ties.py) the plain float64 comparison gave 33-66 dB on 3 to 5 of 6
inputs after 50/20 and after 1000/300 AdaRound/LSQ iterations, and 146-148 dB following the ties.
"""

import dataclasses

import pytest
import torch

import qdcompile
from equivalence import assert_equals_fake_quant64, fake_quant64, rel
from qdcompile import QuantRecipe
from tiny_models import scheduler, tiny_unet2d_condition

RECON = dict(recon_iters=20, act_lsq_iters=10, recon_batch_size=8)


@pytest.fixture(scope="module")
def reconstructed():
    """A tiny conditional U-Net calibrated W4A8 with block reconstruction (AdaRound + LSQ, split)."""
    unet = tiny_unet2d_condition(seed=4)
    emb = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(4))
    meta = qdcompile.calibrate(unet, scheduler(), QuantRecipe.w4a8(**RECON), num_samples=2, num_inference_steps=4,
                               sample_kwargs={"encoder_hidden_states": emb}, progress=False)
    return unet, meta, emb


@pytest.fixture
def compiled(reconstructed, monkeypatch):
    monkeypatch.setenv("QDCOMPILE_INDUCTOR", "0")   # the rewritten graph eagerly: the same integer ops, no build
    unet, meta, emb = reconstructed
    qdcompile.attach(unet, meta)
    return torch.compile(unet, backend="qdiff", fullgraph=True)


def _inputs(unet, emb, seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    return (torch.randn(batch, c, s, s, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            {"encoder_hidden_states": emb.expand(batch, -1, -1)})


def _tie(scale: float, zero_point: int, bits: int) -> tuple[float, int, int]:
    """An fp32 input whose code differs between the fp32 quotient (what the kernels compute,
    correctly rounded) and the float64 one: ``(x, fp32 code, float64 code)``."""
    s32 = torch.tensor(scale, dtype=torch.float32)
    for k in range(10, (1 << bits) - zero_point - 2):
        x = torch.tensor((k + 0.5) * scale, dtype=torch.float32)
        for _ in range(8):
            q32 = int(torch.round(x / s32)) + zero_point
            q64 = int(torch.round(x.double() / scale)) + zero_point
            if q32 != q64:
                return float(x), q32, q64
            x = torch.nextafter(x, torch.tensor(float("inf")))
    raise AssertionError(f"no fp32 rounding tie found for Δ={scale}")


def test_one_rounding_tie_moves_the_plain_float64_comparison_but_not_the_check(reconstructed, compiled):
    """Constructed deterministically: one input element of ``conv_in`` (the U-Net input itself, the
    same number in fp32 and float64) exactly at a rounding tie. The plain float64 fake-quant then
    differs from the compiled model far beyond float rounding (the issue's symptom); following that
    single code, it equals the compiled output to float rounding."""
    unet, meta, emb = reconstructed
    x, t, kw = _inputs(unet, emb, seed=0)
    rec = meta.layers["conv_in"]
    value, q32, q64 = _tie(rec.act_scale, rec.act_zero_point, rec.act_bits)
    assert abs(q32 - q64) == 1
    x[0, 0, 3, 4] = value
    got = assert_equals_fake_quant64(compiled, unet, meta, x, t, **kw)
    conv_in = [f for f in got["followed"] if f[0] == "conv_in"]
    assert len(conv_in) == 1 and conv_in[0][1] == 1 and conv_in[0][2] < 1e-5
    assert got["snr_db"] > 120
    plain, _ = fake_quant64(unet, meta, x, t, **kw)
    # the flip of one code of 256 at the first layer spreads through the network
    assert rel(plain, got["out"]) > 1e-3, rel(plain, got["out"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reconstructed_w4a8_equals_float64_fake_quant(reconstructed, compiled, seed):
    """Random inputs: every activation code equals the float64 one except at rounding ties, and the
    output equals the float64 fake-quant to float rounding."""
    unet, meta, emb = reconstructed
    assert any(r.split for r in meta.layers.values()) and len(meta.calibration["reconstruction"]) > 10
    got = assert_equals_fake_quant64(compiled, unet, meta, *_inputs(unet, emb, seed)[:2],
                                     **_inputs(unet, emb, seed)[2])
    assert got["snr_db"] > 120
    assert sum(n for _, n, _ in got["followed"]) <= 3   # ties are rare: a few codes of ~100k at most


def _with(meta, name, **changes):
    layers = dict(meta.layers)
    layers[name] = dataclasses.replace(layers[name], **changes)
    return dataclasses.replace(meta, layers=layers)


def _nudged_split(meta):
    name = next(n for n, r in meta.layers.items() if r.split)
    rec = meta.layers[name]
    part = dataclasses.replace(rec.split[1], act_scale=rec.split[1].act_scale * (1 + 1e-3))
    return _with(meta, name, split=[rec.split[0], part]), name


def _flipped_weight(meta):
    name = "mid_block.resnets.0.conv1"
    q = meta.layers[name].weight_q.clone()
    q[0, 0, 1, 1] = 7 if q[0, 0, 1, 1] != 7 else 6
    return _with(meta, name, weight_q=q), name


MUTATIONS = {
    "act-scale": lambda m: (_with(m, "down_blocks.0.resnets.0.conv2",
                                  act_scale=m.layers["down_blocks.0.resnets.0.conv2"].act_scale * (1 + 1e-3)),
                            "down_blocks.0.resnets.0.conv2"),
    "zero-point": lambda m: (_with(m, "mid_block.attentions.0.proj_in",
                                   act_zero_point=m.layers["mid_block.attentions.0.proj_in"].act_zero_point + 1),
                             "mid_block.attentions.0.proj_in"),
    "split-part-scale": _nudged_split,
    "one-weight-code": _flipped_weight,
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_check_fails_when_compiled_model_and_metadata_differ(reconstructed, compiled, mutation):
    """The tolerance for ties admits no real difference: a 0.1% activation scale, a zero point off by
    one (also on one part of a split layer) or one weight code changed in the metadata the
    reference is built from fails the check."""
    unet, meta, emb = reconstructed
    other, name = MUTATIONS[mutation](meta)
    x, t, kw = _inputs(unet, emb, seed=1)
    with pytest.raises(AssertionError) as err:
        assert_equals_fake_quant64(compiled, unet, meta, x, t, reference_meta=other, **kw)
    if mutation != "one-weight-code":   # a weight code shows downstream, not at its own layer's input
        assert name in str(err.value)
