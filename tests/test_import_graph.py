"""The layering check (qdcompile/tools/import_graph.py): on small made-up checkouts it finds cycles
(function-local imports included) and upward imports; this checkout has neither."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qdcompile.tools.import_graph import build_graph, cycles, layer_of, main, problems, upward_imports

REPO = Path(__file__).resolve().parents[1]



def _checkout(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"qdcompile/__init__.py": "", "kernels/__init__.py": "", "passes/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_layers():
    assert [layer_of(m) for m in ("qdcompile.kernels.ops", "qdcompile.passes.backend", "qdcompile.recipe",
                                  "qdcompile.cli", "qdcompile.evaluation.fid", "qdcompile.commands.sample")] == \
        ["kernels", "passes", "core", "tools", "tools", "tools"]


def test_function_local_imports_make_a_cycle(tmp_path):
    repo = _checkout(tmp_path, {
        "qdcompile/a.py": "from .b import f\n",
        "qdcompile/b.py": "def f():\n    from . import c\n    return c\n",
        "qdcompile/c.py": "import qdcompile.a\n",
        "qdcompile/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n",
    })
    graph = build_graph(repo)
    assert cycles(graph) == [["qdcompile.a", "qdcompile.b", "qdcompile.c"]]
    assert graph.imports("qdcompile.d") == []             # TYPE_CHECKING imports never run
    assert upward_imports(graph) == []


def test_upward_imports_through_packages_and_relative_levels(tmp_path):
    repo = _checkout(tmp_path, {
        "kernels/ops.py": "def g():\n    from ..recipe import R\n",          # kernels -> core
        "passes/backend.py": "from ..kernels import ops\nfrom ..kernels.ops import g\n",
        "qdcompile/recipe.py": "R = 1\n",
        "qdcompile/evaluation/__init__.py": "",
        "qdcompile/evaluation/fid.py": "from ..recipe import R\n",
        "qdcompile/sampling.py": "from qdcompile.evaluation.fid import x\n",   # core -> tools (and its package)
    })
    graph = build_graph(repo)
    assert graph.imports("qdcompile.passes.backend") == ["qdcompile.kernels", "qdcompile.kernels.ops"]
    assert [(m, t) for m, t, _ in upward_imports(graph)] == [
        ("qdcompile.kernels.ops", "qdcompile.recipe"),
        ("qdcompile.sampling", "qdcompile.evaluation"), ("qdcompile.sampling", "qdcompile.evaluation.fid")]
    assert cycles(graph) == [] and len(problems(graph)) == 3
    assert main(["--check", "--repo", str(repo)]) == 1
    (repo / "kernels/ops.py").write_text("def g():\n    return 1\n")
    (repo / "qdcompile/sampling.py").write_text("from .recipe import R\n")
    assert main(["--check", "--repo", str(repo)]) == 0


def test_this_checkout_has_no_cycle_and_no_upward_import():
    graph = build_graph(REPO)
    assert len(graph.files) > 40 and "qdcompile.kernels.quantizers" in graph.files
    assert problems(graph) == []
    assert main(["--check"]) == 0
    # the contract does not depend on the algorithms that fill it
    assert not {"qdcompile.ptqd", "qdcompile.calibration"} & set(graph.imports("qdcompile.metadata"))


def test_command_line_prints_the_layers():
    proc = subprocess.run([sys.executable, "-m", "qdcompile.tools.import_graph"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.index("[tools]") < proc.stdout.index("[core]") < proc.stdout.index("[passes]") \
        < proc.stdout.index("[kernels]")
    assert "  passes.quantize_layers -> " in proc.stdout and "kernels.ops" in proc.stdout
