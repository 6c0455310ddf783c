"""Image grids (PNG), written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .io import atomic_write


def to_uint8_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """``[N, C, H, W]`` in [0, 1] → ``[rows·(H+2), nrow·(W+2), C]`` uint8 with 2-px borders."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + 2), nrow * (w + 2), c), 255, dtype=np.uint8)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, col * (w + 2) + 1: col * (w + 2) + 1 + w] = arr[i]
    return grid


def save_comparison_grid(rows: Sequence[tuple[str, torch.Tensor]], path: str | os.PathLike, nrow: int = 8,
                         scale: int = 2) -> Path:
    """One labelled block per entry (e.g. FP and quantized samples from the same seeds)."""
    from PIL import Image, ImageDraw

    blocks = []
    for label, images in rows:
        g = to_uint8_grid(images, min(nrow, images.shape[0]))
        img = Image.fromarray(g.squeeze(-1) if g.shape[-1] == 1 else g).convert("RGB")
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        canvas = Image.new("RGB", (img.width, img.height + 16), "white")
        ImageDraw.Draw(canvas).text((4, 2), label, fill="black")
        canvas.paste(img, (0, 16))
        blocks.append(canvas)
    width = max(b.width for b in blocks)
    out = Image.new("RGB", (width, sum(b.height for b in blocks)), "white")
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height
    return atomic_write(path, lambda tmp: out.save(tmp, format="PNG"))
