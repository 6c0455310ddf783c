"""qdcompile: post-training quantization of diffusion U-Nets with real integer kernels.

Typical use::

    unet, scheduler = qdcompile.reference_model("mnist")
    meta = qdcompile.calibrate(unet, scheduler, qdcompile.QuantRecipe.w8a8())
    fast = torch.compile(unet, backend="qdiff")
    images = qdcompile.sample(fast, scheduler, num_images=16)
    print(qdcompile.report(fast))

Importing this package is cheap: the names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "QuantRecipe": "recipe",
    "QuantMetadata": "metadata", "LayerQuant": "metadata", "SplitPart": "metadata",
    "MetadataError": "metadata", "load_metadata": "metadata",
    "calibrate": "calibration", "collect_calibration_set": "calibration",
    "attach": "api", "detach": "api", "report": "api",
    "sample": "sampling",
    "QuantizedUNet": "pipeline", "Corrections": "pipeline", "quantize_pipeline": "pipeline",
    "reference_model": "reference_models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qdcompile' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover
    from .api import attach, detach, report
    from .calibration import calibrate, collect_calibration_set
    from .pipeline import Corrections, QuantizedUNet, quantize_pipeline
    from .metadata import LayerQuant, MetadataError, QuantMetadata, SplitPart, load_metadata
    from .recipe import QuantRecipe
    from .reference_models import reference_model
    from .sampling import sample
