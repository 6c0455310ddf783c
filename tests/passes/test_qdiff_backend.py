"""The qdiff backend on diffusers U-Nets: rewrite counts, fullgraph, equivalence with the
fake-quant simulation, the report, fallbacks and the split-concat route."""

import pytest
import torch
import torch.nn.functional as F

import qdcompile
from equivalence import assert_equals_fake_quant64, assert_matches_simulation, rel
from qdcompile import QuantRecipe
from qdcompile.api import report
from qdcompile.kernels import prepare_weight, qconv2d, qconv2d_split, qlinear
from qdcompile.layers import conv_linear_layers
from qdcompile.passes.backend import last_rewrite_stats
from qdcompile.simulate import dequantized_weight, fake_quant_input, simulate
from tiny_models import scheduler, tiny_unet2d, tiny_unet2d_condition


def _calibrated(model_fn, recipe, **kw):
    unet = model_fn()
    meta = qdcompile.calibrate(unet, scheduler(), recipe, num_samples=4, num_inference_steps=6, progress=False, **kw)
    return unet, meta


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    return torch.randn(batch, c, s, s, generator=g), torch.randint(0, 1000, (batch,), generator=g)


@pytest.mark.parametrize("recipe", [QuantRecipe.w8a8(), QuantRecipe.w4a8(method="rtn", split=False)],
                         ids=["w8a8", "w4a8-rtn"])
def test_unet2d_fullgraph_matches_simulation(recipe):
    unet, meta = _calibrated(tiny_unet2d, recipe)
    n_conv = sum(op == "conv2d" for _, op in conv_linear_layers(unet).values())
    n_lin = sum(op == "linear" for _, op in conv_linear_layers(unet).values())
    x, t = _inputs(unet)
    fast = torch.compile(unet, backend="qdiff", fullgraph=True)
    if recipe.weight_bits == 8:   # called as a user would, without torch.no_grad(): inference still runs
        out = fast(x, t).sample
        assert out.requires_grad   # ... and a backward through it says why it cannot
        with pytest.raises(RuntimeError, match="qdcompile: quantized models are inference only"):
            out.sum().backward()
        out = out.detach()
    else:
        with torch.no_grad():
            out = fast(x, t).sample
    with torch.no_grad():
        fp = unet(x, t).sample
    stats = last_rewrite_stats()
    assert (stats.conv2d, stats.linear, stats.split, stats.fallback) == (n_conv, n_lin, 0, {})
    rep = report(fast)
    assert len(rep.rows) == n_conv + n_lin and rep.counts["quantized"] == n_conv + n_lin
    assert all(r.kernel in ("qdiff.qconv2d [reference]", "qdiff.qlinear [reference]") for r in rep.rows)
    if recipe.weight_bits == 4:
        bits = {r.name: r.bits for r in rep.rows}
        assert bits["conv_in"] == "W8A8" and bits["down_blocks.0.resnets.0.conv1"] == "W4A8"
    # exact: the float64 fake-quant of the metadata, following the compiled model only at rounding ties
    # (this tiny W8A8 net is tie-chaotic: fp32 vs fp64 simulation alone differ by ~1e-2 relative)
    assert torch.equal(assert_equals_fake_quant64(fast, unet, meta, x, t)["out"], out)
    assert rel(fp, out) < 0.5  # quantized, but still the same function


@pytest.mark.inductor   # a whole conditional U-Net (attention, cross-attention) through Inductor
def test_unet2d_condition_fullgraph_matches_simulation():
    emb = torch.randn(1, 5, 24)
    unet, meta = _calibrated(tiny_unet2d_condition, QuantRecipe.w8a8(), sample_kwargs={"encoder_hidden_states": emb})
    x, t = _inputs(unet)
    ctx = emb.expand(2, -1, -1)
    fast = torch.compile(unet, backend="qdiff", fullgraph=True)
    with torch.no_grad():
        out = fast(x, t, encoder_hidden_states=ctx).sample
    stats = last_rewrite_stats()
    layers = conv_linear_layers(unet)
    assert stats.rewritten == len(layers) and not stats.fallback
    assert report(fast).counts["quantized"] == len(layers)
    assert_matches_simulation(out, unet, meta, x, t, encoder_hidden_states=ctx)


@pytest.mark.parametrize("model_fn", [tiny_unet2d, tiny_unet2d_condition], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_every_layer_matches_fake_quant_given_the_same_input(model_fn):
    """Teacher-forced: each layer's integer op on the simulation's own input equals the
    fake-quant layer up to fp32 epilogue rounding (a few ulp of the output's magnitude)."""
    kw = {"encoder_hidden_states": torch.randn(1, 5, 24)} if model_fn is tiny_unet2d_condition else {}
    unet, meta = _calibrated(model_fn, QuantRecipe.w8a8(), sample_kwargs=kw or None)
    x, t = _inputs(unet)
    kw = {k: v.expand(2, -1, -1) for k, v in kw.items()}
    modules = dict(unet.named_modules())
    worst = {}

    def check(name):
        rec = meta.layers[name]

        def hook(mod, args, out):
            pw = prepare_weight(rec.weight_q, rec.weight_bits)
            if rec.op == "conv2d":
                y = qconv2d(args[0], pw, rec.weight_scale, rec.act_scale, rec.act_zero_point, rec.act_bits,
                            mod.kernel_size, mod.stride, mod.padding, bias=mod.bias)
            else:
                y = qlinear(args[0], pw, rec.weight_scale, rec.act_scale, rec.act_zero_point, rec.act_bits, bias=mod.bias)
            worst[name] = float((y - out).abs().max() / out.abs().max().clamp_min(1e-12))
        return hook

    handles = [modules[n].register_forward_hook(check(n)) for n in meta.layers]
    with torch.no_grad(), simulate(unet, meta):
        unet(x, t, **kw)
    for h in handles:
        h.remove()
    assert set(worst) == set(meta.layers)
    # fp32 reduction order differs (float conv vs exact integer sum): bound 1e-5 of the output scale
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_no_metadata_compiles_in_float():
    unet = tiny_unet2d(seed=3)
    x, t = _inputs(unet)
    with torch.no_grad():
        out = torch.compile(unet, backend="qdiff")(x, t).sample
        ref = unet(x, t).sample
    stats = last_rewrite_stats()
    assert stats.rewritten == 0 and len(stats.fallback) == len(conv_linear_layers(unet))
    assert all(r == "no quantization record bound to this weight" for r in stats.fallback.values())
    assert rel(ref, out) < 1e-4
    assert all(r.kernel == "float" and "no qdcompile metadata" in r.reason for r in report(unet).rows)


class _Grouped(torch.nn.Module):
    """Not a U-Net: a grouped conv (no kernel) next to a plain one."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        return self.b(F.silu(self.a(x)))


def test_unsupported_layer_falls_back_visibly():
    from qdcompile.layers import unsupported_reason

    m = _Grouped().eval()
    assert "groups=2" in unsupported_reason(m.b, "conv2d")
    # Bind records for both convs by hand (calibrate only takes U-Nets): the grouped one must
    # fall back with the reason, the other runs the kernel.
    from qdcompile.calibration import quantize_layer
    from qdcompile.passes import registry

    decisions = {}
    for name in ("a", "b"):
        mod = getattr(m, name)
        rec = quantize_layer(mod, "conv2d", 8, 8, (-3.0, 3.0))
        registry.bind(mod.weight, registry.Binding(name, rec, decisions))
    with torch.no_grad():
        torch.compile(m, backend="qdiff", fullgraph=True)(torch.randn(1, 4, 6, 6))
    stats = last_rewrite_stats()
    assert stats.conv2d == 1 and "groups=2" in stats.fallback["b"]
    assert decisions["b"].kernel == "float" and "groups=2" in decisions["b"].reason
    assert decisions["a"].kernel == "qdiff.qconv2d [reference]"


def test_split_concat_layers_route_to_split_kernel():
    """A record with `split` on an up-block conv_shortcut (input = cat(deep, skip)) becomes
    qconv2d_split fed by the two concat inputs, and still matches the simulation."""
    from qdcompile.observers import observe_ranges
    from qdcompile.kernels.quantizers import act_qparams, quantize_weight, weight_scales
    from qdcompile.metadata import SplitPart

    # The timestep embedding stays float: Inductor's vectorised sin/cos differ from eager's by up to
    # ~3e-5 on some CPUs (measured on AVX2), enough to flip a quantized time-embedding input code,
    # which moves every output. On that CPU this test missed by 2% end to end with it quantized
    # (most of the miss went away with t < 5; the split op alone matches to 1.6e-7).
    unet, meta = _calibrated(tiny_unet2d, QuantRecipe.w8a8(skip=("time_embedding.*",)), attach=False)
    name = "up_blocks.0.resnets.0.conv_shortcut"
    mod = dict(unet.named_modules())[name]
    deep = unet.config.block_out_channels[-1]
    channels = [deep, mod.in_channels - deep]
    # per-part ranges from the same kind of calibration pass
    captured = []
    h = mod.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    x, t = _inputs(unet)
    with torch.no_grad():
        unet(x, t)
    h.remove()
    parts = []
    for chunk, w in zip(torch.split(captured[0], channels, 1), torch.split(mod.weight.detach(), channels, 1)):
        s = weight_scales(w, 8)
        a_scale, a_zp = act_qparams(float(chunk.min()), float(chunk.max()), 8)
        parts.append(SplitPart(channels=chunk.shape[1], act_bits=8, act_scale=a_scale, act_zero_point=a_zp,
                               weight_q=quantize_weight(w, s, 8), weight_scale=s))
    rec = meta.layers[name]
    rec.split = parts
    rec.weight_q = torch.cat([p.weight_q for p in parts], 1)
    rec.weight_scale = torch.stack([p.weight_scale for p in parts])   # [parts, N], as metadata documents
    rec.act_scale = rec.act_zero_point = rec.act_bits = None
    qdcompile.attach(unet, meta)
    fast = torch.compile(unet, backend="qdiff", fullgraph=True)
    with torch.no_grad():
        out = fast(x, t).sample
    assert last_rewrite_stats().split == 1
    row = {r.name: r for r in report(fast).rows}[name]
    assert row.kernel == "qdiff.qconv2d_split [reference]" and row.bits == "W8A8/8 split"
    assert_matches_simulation(out, unet, meta, x, t)
    # the split op itself on the layer's real input: fake-quant to float rounding
    deep_in, skip_in = torch.split(captured[0], channels, 1)
    ref = F.conv2d(fake_quant_input(rec, captured[0]), dequantized_weight(rec), mod.bias, mod.stride, mod.padding)
    got = qconv2d_split([deep_in, skip_in], [prepare_weight(p.weight_q, 8) for p in parts],
                        [p.weight_scale for p in parts], [p.act_scale for p in parts],
                        [p.act_zero_point for p in parts], [8, 8], mod.kernel_size, mod.stride, mod.padding,
                        bias=mod.bias)
    assert rel(ref, got) < 1e-5


def _attached_plain_module(seed=0):
    """A plain module (not a U-Net) with metadata attached through the public API."""
    from qdcompile.calibration import quantize_layer
    from qdcompile.metadata import QuantMetadata, model_identity

    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 6 * 6, 5)).eval()
    layers = {"0": quantize_layer(m[0], "conv2d", 8, 8, (-3.0, 3.0)), "3": quantize_layer(m[3], "linear", 8, 8, (0.0, 3.0))}
    meta = QuantMetadata(QuantRecipe.w8a8(), model_identity(m), layers)
    qdcompile.attach(m, meta)
    return m, meta


def test_plain_module_runs_without_no_grad_and_refuses_backward(monkeypatch):
    """Not a U-Net, grad mode on (the Inductor path is covered by the U-Net test above; skipped
    here for time): the result of the integer graph, and a clear error on backward."""
    monkeypatch.setenv("QDCOMPILE_INDUCTOR", "0")
    m, meta = _attached_plain_module()
    x = torch.randn(3, 4, 6, 6)
    out = torch.compile(m, backend="qdiff")(x)   # weights require grad, grad mode on
    with torch.no_grad():
        h = torch.nn.functional.conv2d(fake_quant_input(meta.layers["0"], x), dequantized_weight(meta.layers["0"]),
                                       m[0].bias, padding=1)
        h = torch.nn.functional.silu(h).flatten(1)
        ref = torch.nn.functional.linear(fake_quant_input(meta.layers["3"], h), dequantized_weight(meta.layers["3"]),
                                         m[3].bias)
    assert rel(ref, out.detach()) < 1e-4
    assert report(m).counts["quantized"] == 2
    with pytest.raises(RuntimeError, match="quantized models are inference only"):
        out.sum().backward()
    assert m[0].weight.grad is None


def test_report_tells_the_truth_after_a_failed_compile(monkeypatch):
    from qdcompile.passes import backend

    m, _ = _attached_plain_module(seed=1)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated Inductor failure")
    monkeypatch.setattr(backend, "_lower", broken)
    with pytest.raises(Exception, match="simulated Inductor failure"):
        with torch.no_grad():
            torch.compile(m, backend="qdiff")(torch.randn(1, 4, 6, 6))
    rep = report(m)
    assert rep.counts == {"layers": 2, "quantized": 0, "pending": 0, "failed": 2, "float": 0}
    assert all(r.kernel == "failed" and "simulated Inductor failure" in r.reason for r in rep.rows)
    assert "2 failed to compile" in str(rep)
