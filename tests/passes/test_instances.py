"""Dynamo reuses one graph for every instance of a module class; the qdiff backend must not
run one model's baked-in quantized weights for another instance."""

import pytest
import torch

import qdcompile
from equivalence import rel
from qdcompile import QuantRecipe
from tiny_models import scheduler, tiny_unet2d


def _calibrated(seed):
    m = tiny_unet2d(seed=seed)
    qdcompile.calibrate(m, scheduler(), QuantRecipe.w8a8(), num_samples=2, num_inference_steps=4, progress=False)
    return m


_X, _T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])


@pytest.mark.inductor   # Inductor's caches must not mix up the instances either
def test_two_instances_each_get_their_own_quantized_weights():
    a, b = _calibrated(10), _calibrated(11)
    fa, fb = (torch.compile(m, backend="qdiff") for m in (a, b))
    with torch.no_grad():
        ya, yb = fa(_X, _T).sample, fb(_X, _T).sample
        ra, rb = a(_X, _T).sample, b(_X, _T).sample
    assert rel(ra, ya) < 0.2 and rel(rb, yb) < 0.2      # each near its own float model
    assert rel(ra, yb) > 0.5 and rel(rb, ya) > 0.5      # not the other's
    assert qdcompile.report(fb).counts["quantized"] == qdcompile.report(fb).counts["layers"]


def test_an_instance_without_metadata_stays_float_beside_a_quantized_one():
    a, plain = _calibrated(10), tiny_unet2d(seed=12)   # plain: no metadata, must run in float
    fa, fp = (torch.compile(m, backend="qdiff") for m in (a, plain))
    with torch.no_grad():
        ya, yp = fa(_X, _T).sample, fp(_X, _T).sample
        ra, rp = a(_X, _T).sample, plain(_X, _T).sample
    assert rel(ra, ya) < 0.2 and rel(ra, ya) > 0   # quantized
    assert rel(rp, yp) < 1e-4                       # float model stays float
    assert qdcompile.report(fp).counts["quantized"] == 0
