"""Checks shared by several test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def assert_png_drawn(path: Path, min_size: tuple[int, int], min_coloured: int) -> None:
    """``path`` decodes as a PNG of at least ``min_size`` (width, height) pixels, is not one flat
    colour, and has at least ``min_coloured`` clearly coloured (not grey) pixels: the data drawn,
    not only black axes and text on white."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG", f"{path.name} is {im.format}, not PNG"
        rgb = np.asarray(im.convert("RGB")).astype(np.int16)  # decodes every row: a truncated file fails
    height, width, _ = rgb.shape
    assert width >= min_size[0] and height >= min_size[1], f"{path.name} is only {width}x{height}"
    assert rgb.std() > 10, f"{path.name} is (nearly) one flat colour"
    colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
    assert colours >= 16, f"{path.name} has only {colours} distinct colours"
    coloured = int((rgb.max(axis=2) - rgb.min(axis=2) > 80).sum())
    assert coloured >= min_coloured, f"{path.name} has {coloured} coloured pixels, expected {min_coloured}+"
