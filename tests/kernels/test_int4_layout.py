"""int4 storage layout: pack/unpack round trip and the documented nibble order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdcompile.kernels import pack_int4, prepare_weight, unpack_int4
from qdcompile.kernels.layout import unpack_weight


@settings(max_examples=100, deadline=None)
@given(lead=st.lists(st.integers(1, 5), max_size=2), size=st.integers(1, 67), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(lead, size, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (*lead, size), generator=gen, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, (size + 1) // 2)
    assert torch.equal(unpack_int4(packed, size), q)


def test_nibble_order_and_twos_complement():
    q = torch.tensor([[1, -2, 7, -8, 3]], dtype=torch.int8)
    packed = pack_int4(q)
    # even index → low nibble; -2 → 0xE, -8 → 0x8; odd length padded with a zero code
    assert packed.tolist() == [[0xE1, 0x87, 0x03]]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(1, 9), k=st.sampled_from([1, 3]), bits=st.sampled_from([4, 8]),
       seed=st.integers(0, 2**31 - 1))
def test_prepare_weight_conv_order(n, c, k, bits, seed):
    """Conv weights are reordered to k = (kh·KW + kw)·C + c, packed along K, row-summed."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.randint(lo, hi, (n, c, k, k), generator=gen, dtype=torch.int8)
    prepared = prepare_weight(q, bits)
    flat = unpack_weight(prepared.w, k * k * c, bits)
    for kh in range(k):
        for kw in range(k):
            assert torch.equal(flat[:, (kh * k + kw) * c:(kh * k + kw + 1) * c], q[:, :, kh, kw])
    assert torch.equal(prepared.rowsum, q.reshape(n, -1).sum(1, dtype=torch.int32))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(TypeError, match="int8"):
        pack_int4(torch.tensor([1], dtype=torch.int32))
