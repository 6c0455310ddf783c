"""int4 storage: two signed 4-bit codes per byte (METHODS §1).

Along the packed (last) dimension, the code at even index ``2i`` goes to the low nibble of
byte ``i`` and the code at odd index ``2i + 1`` to the high nibble; nibbles hold
two's-complement codes in ``[-8, 7]``. An odd length is padded with a zero code. These two
helpers are the only place that defines the layout: kernels unpack exactly this.
"""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 codes (int8 storage, values in [-8, 7]) along the last dim → uint8."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {q.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4: codes must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [..., ceil(size/2)] → int8 codes [..., size]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8 packed codes, got {packed.dtype}")
    if packed.shape[-1] != (size + 1) // 2:
        raise ValueError(f"unpack_int4: {size} codes need {(size + 1) // 2} bytes, got {packed.shape[-1]}")
    p = packed.to(torch.int16)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    out = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], -1)[..., :size]
    return torch.where(out >= 8, out - 16, out).to(torch.int8)
