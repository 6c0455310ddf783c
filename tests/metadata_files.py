"""Real ``.qdiff`` files of the three kinds (W8A8; W4A8 with split layers; mixed precision with
PTQD statistics) from quick calibrations of the tiny U-Net, a file of the previous format (5:
symmetric weights, recipe version 1), and raw access to their parts (header JSON, tensors) for
tests that edit them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from tiny_models import scheduler, tiny_unet2d

KINDS = ("w8a8", "w4a8-split", "mixed-ptqd")


def recipe_of(kind: str):
    from qdcompile import QuantRecipe

    quick = {"recon_iters": 2, "act_lsq_iters": 1, "recon_batch_size": 2}
    return {"w8a8": lambda: QuantRecipe.w8a8(),
            "w4a8-split": lambda: QuantRecipe.w4a8(**quick, weight_grid="asymmetric", weight_observer="qdiff-mse"),
            "mixed-ptqd": lambda: QuantRecipe.mixed(**quick, noise_samples=1, check_samples=0)}[kind]()


def calibrated_file(kind: str, folder: Path, seed: int = 1) -> tuple[object, Path]:
    """``(unet, path)``: the tiny U-Net (``seed``) and its metadata file of ``kind``."""
    import qdcompile

    unet = tiny_unet2d(seed=seed)
    meta = qdcompile.calibrate(unet, scheduler(), recipe_of(kind), num_samples=2, num_inference_steps=3,
                               progress=False, attach=False)
    return unet, meta.save(Path(folder) / f"tiny.{kind}.qdiff")


def previous_format_file(folder: Path, seed: int = 1) -> tuple[object, Path, Path]:
    """``(unet, format-5 path, current-format path)``: the mixed-precision PTQD recipe as format 5
    knew it (symmetric weights, MSE-searched scales, recipe version 1) calibrated once and written as
    format 5 wrote it (no ``weight_zero_point`` fields, no ``weight_grid``/``act_lsq_schedule`` in the recipe), and the
    same calibration saved by this qdcompile."""
    import qdcompile
    from qdcompile import QuantRecipe

    unet = tiny_unet2d(seed=seed)
    recipe = QuantRecipe.mixed(recon_iters=2, act_lsq_iters=1, recon_batch_size=2, noise_samples=1, check_samples=0,
                               weight_grid="symmetric", weight_observer="mse")
    meta = qdcompile.calibrate(unet, scheduler(), recipe, num_samples=2, num_inference_steps=3,
                               progress=False, attach=False)
    current = meta.save(Path(folder) / "tiny.mixed-v6.qdiff")
    file_meta, header, tensors = read_parts(current)
    for entry in header["layers"].values():
        assert entry.pop("weight_zero_point") is None
        for part in entry["split"] or ():
            assert part.pop("weight_zero_point") is None
    for field in ("weight_grid", "act_lsq_schedule"):   # recipe version 2 fields
        header["recipe"].pop(field)
    header["recipe"]["version"] = 1
    file_meta["format_version"] = "5"
    return unet, write_parts(Path(folder) / "tiny.mixed-v5.qdiff", file_meta, header, tensors), current


def read_parts(path) -> tuple[dict, dict, dict]:
    """``(file metadata strings, header JSON, tensors)`` of a ``.qdiff`` file."""
    with safe_open(str(path), framework="pt") as f:
        file_meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return file_meta, json.loads(file_meta["header"]), tensors


def write_parts(path, file_meta: dict, header: dict, tensors: dict, reseal: bool = True) -> Path:
    """Write the parts as a ``.qdiff`` file; ``reseal``: recompute the checksums (an edit made by
    someone who knows the format, so the loader's field checks are what must catch it)."""
    from qdcompile.metadata import payload_sha256

    file_meta = dict(file_meta)
    file_meta["header"] = json.dumps(header, sort_keys=True)
    if reseal:
        file_meta["header_sha256"] = hashlib.sha256(file_meta["header"].encode()).hexdigest()
        file_meta["payload_sha256"] = payload_sha256(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=file_meta)
    return Path(path)
