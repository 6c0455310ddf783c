"""Dynamo reuses one graph for every instance of a module class; the qdiff backend must not
run one model's baked-in quantized weights for another instance."""

import pytest
import torch

import qdcompile
from equivalence import rel
from qdcompile import QuantRecipe
from tiny_models import scheduler, tiny_unet2d


@pytest.mark.inductor   # Inductor's caches must not mix up the instances either
def test_two_instances_each_get_their_own_quantized_weights():
    a, b = tiny_unet2d(seed=10), tiny_unet2d(seed=11)
    for m in (a, b):
        qdcompile.calibrate(m, scheduler(), QuantRecipe.w8a8(), num_samples=2, num_inference_steps=4, progress=False)
    plain = tiny_unet2d(seed=12)  # no metadata: must run in float
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    fa, fb, fp = (torch.compile(m, backend="qdiff") for m in (a, b, plain))
    with torch.no_grad():
        ya, yb, yp = fa(x, t).sample, fb(x, t).sample, fp(x, t).sample
        ra, rb, rp = a(x, t).sample, b(x, t).sample, plain(x, t).sample
    assert rel(ra, ya) < 0.2 and rel(rb, yb) < 0.2      # each near its own float model
    assert rel(ra, yb) > 0.5 and rel(rb, ya) > 0.5      # not the other's
    assert rel(rp, yp) < 1e-4                           # float model stays float
    assert qdcompile.report(fb).counts["quantized"] == qdcompile.report(fb).counts["layers"]
