"""The one SNR/PSNR definition (qdcompile.metrics) and the one JSON/atomic-write helper (qdcompile.io)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from qdcompile.io import atomic_write, default_file_mode, json_text, jsonable, write_json
from qdcompile.metrics import norm_ratio, psnr_db, snr_db, snr_q, to_db


def _pair(seed: int, shape=(3, 4, 5, 6), noise_scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(*shape, generator=g)
    return ref, ref + noise_scale * torch.randn(*shape, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snr_is_the_energy_ratio_and_agrees_with_snr_q(seed):
    ref, test = _pair(seed)
    signal, noise = float(ref.double().pow(2).sum()), float((test.double() - ref.double()).pow(2).sum())
    expect = 10 * math.log10(signal / noise)
    assert snr_db(ref, test) == pytest.approx(expect, abs=1e-9)
    assert to_db(snr_q(ref, test), power=False) == pytest.approx(snr_db(ref, test), abs=1e-9)   # PTQD's SNR_Q in dB
    assert norm_ratio(signal, noise) == pytest.approx(snr_q(ref, test), rel=1e-12)


def test_psnr_of_images():
    img, _ = _pair(3)
    img = img.sigmoid().double()
    assert psnr_db(img, img + 0.1) == pytest.approx(20.0, abs=1e-9)
    assert psnr_db(img * 255, img * 255 + 25.5, peak=255) == pytest.approx(20.0, abs=1e-9)


def test_edge_cases_inf_nan_and_no_clamping():
    ref, test = _pair(4)
    assert math.isinf(snr_db(ref, ref)) and snr_db(ref, ref) > 0
    assert math.isinf(psnr_db(ref, ref)) and math.isinf(snr_q(ref, ref)) and math.isinf(norm_ratio(1.0, 0.0))
    bad = test.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert math.isnan(snr_db(ref, bad)) and math.isnan(psnr_db(ref, bad)) and math.isnan(snr_q(ref, bad))
    bad[0, 0, 0, 0] = float("inf")
    assert math.isnan(snr_db(ref, bad)) and math.isnan(snr_db(bad, ref))
    assert snr_db(torch.zeros_like(ref), test) == -math.inf                  # no clamping of a zero signal
    small_ref, small_test = ref.double() * 1e-14, test.double() * 1e-14     # energies far below any clamp
    assert snr_db(small_ref, small_test) == pytest.approx(snr_db(ref, test), abs=1e-9)
    assert to_db(None, power=True) is None and to_db(0.0, power=True) == -math.inf
    assert to_db(100.0, power=True) == pytest.approx(20.0) and to_db(100.0, power=False) == pytest.approx(40.0)


def test_jsonable_and_write_json(tmp_path):
    data = {"a": (1, 2.5, math.nan, math.inf, -math.inf), 3: tmp_path, "b": {"c": [True, None, "x"]},
            "dtype": torch.float16}
    plain = jsonable(data)
    assert plain == {"a": [1, 2.5, None, "inf", "-inf"], "3": str(tmp_path), "b": {"c": [True, None, "x"]},
                     "dtype": "torch.float16"}
    path = write_json(tmp_path / "sub" / "r.json", data)
    assert json.loads(path.read_text()) == plain and path.read_text() == json_text(data)
    assert os.stat(path).st_mode & 0o777 == default_file_mode()              # an ordinary file's mode, not 0600
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]              # no temporary left behind


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = atomic_write(tmp_path / "f.txt", "old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
