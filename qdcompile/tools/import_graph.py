"""The module import graph of qdcompile and its layering check.

``python -m qdcompile.tools.import_graph`` prints, per layer, each module and the modules it
imports; ``--check`` also exits non-zero when the graph has a cycle or an upward import.
``--dot`` prints the graph in Graphviz format instead.

Layers, lowest first; a module may import its own layer and the ones below, never above:

* ``kernels`` — ``qdcompile.kernels.*`` (Triton kernels, quantizers)
* ``passes`` — ``qdcompile.passes.*`` (the FX rewrite, the ``qdiff`` backend)
* ``core`` — everything else: recipe, metadata, observers, calibration, reconstruction,
  noise statistics, sampler and pipelines, model loading
* ``tools`` — evaluation, benchmarks, the command line, these tools

The graph is read from the source with :mod:`ast`, without importing anything, and counts every
import statement, function-local ones included (they run too, only later); imports under
``if TYPE_CHECKING:`` are left out (they never run). ``from pkg import name`` counts as an import
of ``pkg.name`` when that is a module, else of ``pkg``. Importing a submodule also runs its
parent packages' ``__init__``: those edges are added (except the root ``qdcompile`` package,
whose ``__init__`` imports nothing when it runs: its exports load on first use).
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

ROOT_PACKAGE = "qdcompile"
LAYERS = ("kernels", "passes", "core", "tools")
# the folders the installed package is made of (pyproject's package-dir)
_SOURCE_DIRS = {"qdcompile": "qdcompile", "qdcompile.kernels": "kernels", "qdcompile.passes": "passes"}
_TOOL_MODULES = ("qdcompile.cli",)
_TOOL_PACKAGES = ("qdcompile.commands", "qdcompile.evaluation", "qdcompile.benchmarks", "qdcompile.tools")


def layer_of(module: str) -> str:
    if module == "qdcompile.kernels" or module.startswith("qdcompile.kernels."):
        return "kernels"
    if module == "qdcompile.passes" or module.startswith("qdcompile.passes."):
        return "passes"
    if module in _TOOL_MODULES or any(module == p or module.startswith(p + ".") for p in _TOOL_PACKAGES):
        return "tools"
    return "core"


@dataclass
class Graph:
    files: dict[str, Path]                                   # module -> source file
    edges: dict[str, dict[str, int]] = field(default_factory=dict)   # module -> {imported module: first line}

    def imports(self, module: str) -> list[str]:
        return sorted(self.edges.get(module, {}))


def find_modules(repo: Path) -> dict[str, Path]:
    """``{module name: file}`` for every module of the package in the checkout at ``repo``."""
    modules: dict[str, Path] = {}
    for package, folder in _SOURCE_DIRS.items():
        base = repo / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "qdcompile" and parts and parts[0] in ("kernels", "passes"):
                continue   # not part of the package (the real ones live in kernels/ and passes/)
            modules[name] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def build_graph(repo: Path) -> Graph:
    files = find_modules(repo)
    graph = Graph(files)
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        targets: dict[str, int] = {}
        for node in _import_nodes(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = _resolve(module, is_package, node)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    names.append(sub if sub in files else base)
            for name in names:
                if not (name == ROOT_PACKAGE or name.startswith(ROOT_PACKAGE + ".")):
                    continue
                while name not in files and "." in name:        # an attribute path: its module
                    name = name.rsplit(".", 1)[0]
                chain = [name]
                parent = name
                while "." in parent:                             # parents' __init__ run first
                    parent = parent.rsplit(".", 1)[0]
                    if parent != ROOT_PACKAGE:
                        chain.append(parent)
                for target in chain:
                    if target != module and target in files and target != ROOT_PACKAGE \
                            and not module.startswith(target + "."):   # a package's own modules import it anyway
                        targets.setdefault(target, node.lineno)
        graph.edges[module] = targets
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph.files):
        if v not in index:
            visit(v)
    return sorted(out)


def upward_imports(graph: Graph) -> list[tuple[str, str, int]]:
    """``(module, imported module, line)`` where the import points to a higher layer."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [(m, t, line) for m, targets in sorted(graph.edges.items()) for t, line in sorted(targets.items())
            if rank[layer_of(t)] > rank[layer_of(m)]]


def problems(graph: Graph) -> list[str]:
    """One line per cycle and per upward import; empty when the layering holds."""
    lines = [f"cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    lines += [f"upward import: {m} ({layer_of(m)}) imports {t} ({layer_of(t)}) at {graph.files[m].name}:{line}"
              for m, t, line in upward_imports(graph)]
    return lines


def format_graph(graph: Graph) -> str:
    short = lambda m: m[len(ROOT_PACKAGE) + 1:] or m  # noqa: E731
    lines = []
    for layer in reversed(LAYERS):
        lines.append(f"[{layer}]")
        for m in sorted(m for m in graph.files if layer_of(m) == layer):
            deps = graph.imports(m)
            lines.append(f"  {short(m)}" + (f" -> {', '.join(short(d) for d in deps)}" if deps else ""))
    return "\n".join(lines)


def format_dot(graph: Graph) -> str:
    lines = ["digraph qdcompile {", "  rankdir=BT;"]
    for layer in LAYERS:
        lines.append(f"  subgraph cluster_{layer} {{ label={layer!r};".replace("'", '"'))
        lines += [f'    "{m}";' for m in sorted(graph.files) if layer_of(m) == layer]
        lines.append("  }")
    lines += [f'  "{m}" -> "{t}";' for m in sorted(graph.edges) for t in graph.imports(m)]
    return "\n".join(lines + ["}"])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qdcompile.tools.import_graph", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 on a cycle or an upward import")
    p.add_argument("--dot", action="store_true", help="print Graphviz dot instead of the layer listing")
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2],
                   help="checkout to read (default: the one this file is in)")
    args = p.parse_args(argv)
    graph = build_graph(args.repo)
    print(format_dot(graph) if args.dot else format_graph(graph))
    found = problems(graph)
    if found:
        print(f"\n{len(found)} layering problem(s):", *found, sep="\n")
    else:
        print(f"\nno cycle, no upward import ({len(graph.files)} modules, layers {' <- '.join(LAYERS)})")
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
