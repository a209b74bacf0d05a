"""scikit-learn's digits (8x8 grayscale, 1797 images, shipped inside the package: no download).

The split is fixed: 25% test, stratified, ``random_state=0``; an optional validation set is cut
from the training part the same way. Images are scaled to [0, 1] (background exactly 0, like
a convolution's zero padding) and upsampled bilinearly to give the CNNs spatial room.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DigitsSplit", "load_digits_split", "random_shift"]


@dataclass
class DigitsSplit:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape with a batch of 1, e.g. ``(1, 1, 16, 16)``."""
        return (1, *self.x_train.shape[1:])


def _to_images(x: np.ndarray, size: int) -> torch.Tensor:
    images = torch.from_numpy(x.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.contiguous()


def _to_labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64))


def load_digits_split(size: int = 16, val_fraction: float = 0.0) -> DigitsSplit:
    """Train / validation / test tensors; ``val_fraction`` of the training part becomes validation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y)
    if val_fraction > 0:
        x_train, x_val, y_train, y_val = train_test_split(
            x_train, y_train, test_size=val_fraction, random_state=0, stratify=y_train)
    else:
        x_val, y_val = x_train[:0], y_train[:0]
    return DigitsSplit(
        _to_images(x_train, size), _to_labels(y_train),
        _to_images(x_val, size), _to_labels(y_val),
        _to_images(x_test, size), _to_labels(y_test),
    )


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by a random whole number of pixels in [-max_shift, max_shift], zero fill."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return shifted.gather(3, cols)
