"""The shipped sm_90 facts and the float-vs-integer choice built on them (no GPU, no compiler)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qdcompile.kernels import sm90_choice
from qdcompile.kernels.autotune import CANDIDATES
from qdcompile.kernels.sm90_choice import FactsError, choose, decide, load_facts, main, write_facts

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "bench" / "results" / "sm90-report-triton3.7.1-after.json"


def test_shipped_facts_load_and_cover_every_candidate_tile():
    f = load_facts()
    assert f.commit and f.triton == "3.7.1"
    for variant in sm90_choice.REQUIRED:
        assert set(CANDIDATES) <= set(f.variants[variant]), variant
    k = f.variants["gemm:8:codes"][CANDIDATES[1]]
    assert k.registers > 0 and k.loop_instructions > 0 and k.shared_bytes > 0


def test_shipped_facts_are_the_reports(tmp_path):
    """Regenerating from the committed report gives exactly the shipped model facts."""
    out = tmp_path / "facts.json"
    assert main([str(REPORT), "--commit", load_facts().commit, "--out", str(out)]) == 0
    assert load_facts(out).variants == load_facts().variants
    assert not [p for p in tmp_path.iterdir() if p.name != "facts.json"]    # no temporary left behind


def test_report_model_from_shipped_facts_matches_the_committed_report():
    """bench/sm90_report.py's model decides through the same estimate: the shipped facts give the
    committed report's per-layer float-faster column and speed-ups."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("sm90_report_for_test", ROOT / "bench" / "sm90_report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    shipped = json.loads(sm90_choice.FACTS_PATH.read_text())["facts"]
    m = mod.model(shipped)
    committed = json.loads(REPORT.read_text())["model"]
    assert m["speedup"] == pytest.approx(committed["speedup"], rel=1e-12)
    assert [r["prefer_float"] for r in m["rows"]] == [r["prefer_float"] for r in committed["rows"]]
    assert any(r["prefer_float"] for r in m["rows"]) and not all(r["prefer_float"] for r in m["rows"])


@pytest.mark.parametrize("text, match", [
    ("{not json", "not a readable JSON"),
    ('{"format": 99, "commit": "x", "facts": []}', "format 1, got format 99"),
    ('[1, 2]', "format 1"),
    ('{"format": 1, "commit": "x", "facts": {}}', "'facts' \\(a list\\)"),
    ('{"format": 1, "commit": "x", "facts": [{"variant": "gemm:8:codes@128x64", "registers": 1, "shared_bytes": 1, '
     '"loop_instructions": 1, "epilogue_instructions": 1, "wait_depth": 0}]}', "tile name '128x64'"),
    ('{"format": 1, "commit": "x", "facts": [{"variant": "gemm:8:codes@64x64x64w4s4", "registers": "many", '
     '"shared_bytes": 1, "loop_instructions": 1, "epilogue_instructions": 1, "wait_depth": 0}]}',
     "\\['registers'\\] must be integers"),
])
def test_corrupt_facts_file_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "sm90_facts.json"
    path.write_text(text)
    with pytest.raises(FactsError, match=match):
        load_facts(path)


def test_facts_that_miss_a_candidate_tile_are_rejected(tmp_path):
    """A facts file written before the autotune candidates changed does not match the kernels."""
    data = json.loads(sm90_choice.FACTS_PATH.read_text())
    gone = "gemm:4:codes@64x64x64w4s4"
    data["facts"] = [f for f in data["facts"] if f["variant"] != gone]
    path = tmp_path / "sm90_facts.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FactsError, match="no facts for gemm:4:codes at tiles \\['64x64x64w4s4'\\]"):
        load_facts(path)
    with pytest.raises(FactsError, match="not found"):
        load_facts(tmp_path / "absent.json")


def test_cli_refuses_a_report_without_facts_and_leaves_the_target_alone(tmp_path, capsys):
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps({"triton": "3.7.1", "model": {}}))
    out = tmp_path / "facts.json"
    out.write_text("old")
    assert main([str(bad), "--commit", "abc", "--out", str(out)]) == 2
    assert "no 'facts' list" in capsys.readouterr().err
    assert out.read_text() == "old"
    with pytest.raises(FactsError):
        write_facts(bad, out, "abc")


SM90 = (9, 0)


def test_time_embedding_stays_float_on_sm90():
    # SD 1.5 time embedding at batch 2: M = 2 rows, 320 → 1280 and 1280 → 1280
    assert choose("linear", (1280, 320), 2, 8, SM90) == "float"
    assert choose("linear", (1280, 1280), 2, 4, SM90) == "float"
    d = decide("linear", (1280, 1280), 2, 8, SM90)
    assert d.reason.startswith("float faster on sm_90 (static model): FP16 ") and "at M=2" in d.reason


def test_big_conv_and_big_linear_run_integer_on_sm90():
    # 64² latent 3×3 conv at batch 2 (M = 8192) and a feed-forward linear on 4096 tokens × 2
    assert choose("conv2d", (320, 320, 3, 3), 8192, 8, SM90, act_elems=8192 * 320) == "int"
    assert choose("conv2d", (320, 320, 3, 3), 8192, 4, SM90, act_elems=8192 * 320) == "int"
    assert choose("linear", (2560, 320), 8192, 8, SM90) == "int"
    assert decide("conv2d", (320, 320, 3, 3), 8192, 8, SM90).reason.startswith("integer faster on sm_90")


@pytest.mark.parametrize("capability", [None, (8, 0), (8, 9), (10, 0), (12, 0)])
def test_no_float_choice_off_sm90(capability):
    d = decide("linear", (1280, 320), 2, 8, capability)
    assert d.choice == "int" and "sm_90 only" in d.reason
    assert choose("linear", (1280, 320), 2, 8, capability) == "int"


def test_capability_lookup_off_cuda_is_none():
    import torch
    assert sm90_choice.device_capability(torch.device("cpu")) is None
    assert sm90_choice.device_capability("cpu") is None


def test_bad_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="op must be 'conv2d' or 'linear', got 'matmul'"):
        choose("matmul", (4, 4), 2, 8, SM90)
