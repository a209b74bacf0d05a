"""A character-recognition task built from the fonts matplotlib ships (in the manner of Chars74K's font subset).

No download: every glyph is rendered with matplotlib's FreeType binding from the TrueType files in
``matplotlib/mpl-data/fonts/ttf`` (18 faces: DejaVu Sans / Sans Mono / Serif and STIX General in
regular, bold, italic and bold italic, and the Computer Modern roman, bold, sans, typewriter and
italic faces). Construction, all seeded:

1. Each of the 34 classes (digits 0-9 and the capitals A-Z without ``O`` and ``I``, which no font
   tells apart from ``0`` and ``1``) is rendered in each face at 48 px, cropped to its ink, and
   centred, aspect kept, in a 32x32 prototype whose longer side spans 26 px.
2. A sample picks a face and a class uniformly, thickens (p = 0.25) or thins (p = 0.25) the
   strokes by a 3x3 max/min filter, and maps the prototype to ``size`` x ``size`` by a random
   affine transform: rotation +-18 degrees, scale 0.75-1.1, aspect 0.85-1.15, shear +-0.3,
   translation +-12% of the side (bilinear sampling, zero fill).
3. Clutter: with p = 0.5 a piece of another random glyph at 30-60% intensity, shifted by 55-80% of
   the side so that only its edge enters the frame; then a random contrast in 0.6-1.0 and Gaussian
   noise with sigma in 0.03-0.15; values clipped to [0, 1].

The train, validation and test splits are drawn from the same faces with different seeds, so no
image is shared; the validation split is for every choice a method makes, the test split for the
reported numbers only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from graphfold.train.data import DigitsSplit

__all__ = ["CLASSES", "FACES", "load_fonts_split", "render_prototypes"]

CLASSES = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
FACES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf",
)
_PROTO = 32
_SPLIT_SEEDS = {"train": 1001, "val": 2002, "test": 3003}


def _render(path: Path, char: str) -> np.ndarray:
    from matplotlib.ft2font import LOAD_NO_HINTING, FT2Font

    font = FT2Font(str(path))
    font.set_size(48, 72)
    font.set_text(char, 0.0, flags=LOAD_NO_HINTING)
    font.draw_glyphs_to_bitmap(antialiased=True)
    ink = np.asarray(font.get_image(), dtype=np.float32) / 255.0
    rows, cols = np.nonzero(ink > 0.05)
    if len(rows) == 0:
        raise ValueError(f"font {path.name} has no glyph for {char!r}")
    return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _centre(glyph: np.ndarray) -> torch.Tensor:
    h, w = glyph.shape
    scale = 26.0 / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = F.interpolate(torch.from_numpy(glyph)[None, None], size=(nh, nw), mode="area")[0, 0]
    canvas = torch.zeros(_PROTO, _PROTO)
    top, left = (_PROTO - nh) // 2, (_PROTO - nw) // 2
    canvas[top:top + nh, left:left + nw] = small
    return canvas


@lru_cache(maxsize=1)
def render_prototypes() -> torch.Tensor:
    """``[faces, classes, 32, 32]`` glyph prototypes in [0, 1], rendered once per process."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return torch.stack([torch.stack([_centre(_render(folder / face, c)) for c in CLASSES]) for face in FACES])


def _affine(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Random ``[n, 2, 3]`` matrices for ``affine_grid`` (output coordinates -> prototype coordinates)."""
    angle = np.deg2rad(rng.uniform(-18, 18, n))
    scale = rng.uniform(0.75, 1.1, n)
    aspect = rng.uniform(0.85, 1.15, n)
    shear = rng.uniform(-0.3, 0.3, n)
    shift = rng.uniform(-0.24, 0.24, (n, 2))  # +-12% of the side in [-1, 1] coordinates
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.zeros((n, 2, 2))
    forward[:, 0, 0], forward[:, 0, 1] = scale * aspect * cos, scale * aspect * (-sin + shear * cos)
    forward[:, 1, 0], forward[:, 1, 1] = scale / aspect * sin, scale / aspect * (cos + shear * sin)
    inverse = np.linalg.inv(forward)
    theta = np.concatenate([inverse, -inverse @ shift[:, :, None]], axis=2)
    return torch.from_numpy(theta.astype(np.float32))


def _strokes(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    choice = torch.from_numpy(rng.choice(3, size=len(images), p=[0.5, 0.25, 0.25]))
    thick = F.max_pool2d(images, 3, 1, 1)
    thin = -F.max_pool2d(-images, 3, 1, 1)
    out = torch.where((choice == 1)[:, None, None, None], thick, images)
    return torch.where((choice == 2)[:, None, None, None], thin, out)


def _generate(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    protos = render_prototypes()
    rng = np.random.default_rng(seed)
    faces = rng.integers(len(FACES), size=n)
    labels = rng.integers(len(CLASSES), size=n)
    images = _strokes(protos[faces, labels][:, None], rng)
    grid = F.affine_grid(_affine(rng, n), [n, 1, size, size], align_corners=False)
    x = F.grid_sample(images, grid, align_corners=False)
    # Clutter: the edge of another glyph entering the frame from a random direction.
    other = protos[rng.integers(len(FACES), size=n), rng.integers(len(CLASSES), size=n)][:, None]
    direction = rng.uniform(0, 2 * math.pi, n)
    distance = rng.uniform(1.1, 1.6, n)
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2], theta[:, 1, 2] = distance * np.cos(direction), distance * np.sin(direction)
    clutter = F.grid_sample(other, F.affine_grid(torch.from_numpy(theta), [n, 1, size, size],
                                                 align_corners=False), align_corners=False)
    weight = rng.uniform(0.3, 0.6, n) * (rng.random(n) < 0.5)
    x = torch.maximum(x, clutter * torch.from_numpy(weight.astype(np.float32))[:, None, None, None])
    contrast = torch.from_numpy(rng.uniform(0.6, 1.0, n).astype(np.float32))[:, None, None, None]
    sigma = torch.from_numpy(rng.uniform(0.03, 0.15, n).astype(np.float32))[:, None, None, None]
    noise = torch.from_numpy(rng.standard_normal((n, 1, size, size)).astype(np.float32))
    x = (x * contrast + sigma * noise).clamp(0.0, 1.0)
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))




def load_fonts_split(size: int = 20, n_train: int = 6800, n_val: int = 1700, n_test: int = 3400) -> DigitsSplit:
    """Train / validation / test tensors of the rendered-fonts task (34 classes, ``size`` x ``size``)."""
    x_train, y_train = _generate(n_train, size, _SPLIT_SEEDS["train"])
    x_val, y_val = _generate(n_val, size, _SPLIT_SEEDS["val"])
    x_test, y_test = _generate(n_test, size, _SPLIT_SEEDS["test"])
    return DigitsSplit(x_train, y_train, x_val, y_val, x_test, y_test)
