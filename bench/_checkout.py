"""Make ``qdcompile`` (with ``qdcompile.kernels`` / ``qdcompile.passes``) importable from a source checkout.

The installed package maps ``kernels/`` and ``passes/`` into ``qdcompile`` (pyproject's
``package-dir``); a bare checkout on a GPU machine (``git clone`` + ``python bench/...``, no
``pip install``) has no such mapping. :func:`use_checkout` loads ``qdcompile`` from the
checkout with the repository root as an extra submodule location, so ``qdcompile.kernels``
resolves to ``<root>/kernels``. An installed ``qdcompile`` is left alone.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_checkout() -> str:
    """Import ``qdcompile`` (installed, or from this checkout); return where it came from."""
    try:
        import qdcompile.kernels  # noqa: F401
        import qdcompile
        return str(Path(qdcompile.__file__).parent)
    except ImportError:
        for name in [m for m in sys.modules if m == "qdcompile" or m.startswith("qdcompile.")]:
            del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        "qdcompile", ROOT / "qdcompile" / "__init__.py",
        submodule_search_locations=[str(ROOT / "qdcompile"), str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["qdcompile"] = module
    spec.loader.exec_module(module)
    return f"{ROOT} (checkout, not installed)"
