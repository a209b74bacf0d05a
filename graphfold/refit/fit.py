"""Ridge regression of a convolution on calibration activations, in closed form.

For a conv with kernel k, stride s, pads p and g groups, the output at one pixel is an affine map
of the input patch under it: ``y = W x + b``. Given inputs X (patches, by im2col) and target
outputs Y, the least-squares weights solve the normal equations

    (X1^T X1 + lambda * D) [W; b] = X1^T Y,    X1 = [X, 1],  D = diag(1, ..., 1, 0),

with ``lambda = ridge * mean(diag(X^T X))`` and the bias left unregularized. ``X^T X`` and
``X^T Y`` are summed in float64 batch by batch, so memory does not grow with the data: only one
batch's patches exist at a time (and a fixed share of their rows when ``max_rows`` caps them).
Groups fit independently (a depthwise conv is C regressions of k*k + 1 unknowns). Pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_RIDGE = 1e-5


def im2col(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int]) -> np.ndarray:
    """Patches of an [N, C, H, W] input: [N * Ho * Wo, C * kh * kw], columns ordered as ONNX's
    weight [M, C, kh, kw] flattens. ``pads`` are ONNX's (top, left, bottom, right)."""
    kh, kw = kernel
    top, left, bottom, right = pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1]]  # [N, C, Ho, Wo, kh, kw]
    n, c, ho, wo = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def rows_of(y: np.ndarray) -> np.ndarray:
    """An [N, M, Ho, Wo] output as rows matching ``im2col``'s: [N * Ho * Wo, M]."""
    return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])


@dataclass
class FitResult:
    weight: np.ndarray  # [M, C / group, kh, kw]
    bias: np.ndarray  # [M]
    residual: float  # ||X W + b - Y|| / ||Y - mean(Y)|| on the fitted rows (0: exact, 1: no better than the mean)
    rows: int


class ConvFit:
    """Accumulates the normal equations of one conv's fit; ``solve`` gives its weights."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], strides: Sequence[int] = (1, 1),
                 pads: Sequence[int] = (0, 0, 0, 0), group: int = 1, ridge: float = DEFAULT_RIDGE,
                 max_rows: int | None = None, seed: int = 0, gram: np.ndarray | None = None) -> None:
        if in_channels % group or out_channels % group:
            raise ValueError(f"channels {in_channels} -> {out_channels} do not split into {group} groups")
        self.in_channels, self.out_channels, self.group = in_channels, out_channels, group
        self.kernel, self.strides, self.pads = tuple(kernel), tuple(strides), tuple(pads)
        self.ridge, self.max_rows = ridge, max_rows
        self.rng = np.random.default_rng(seed)
        features = in_channels // group * int(np.prod(self.kernel)) + 1
        outs = out_channels // group
        # A fit of the same input and geometry (another region from the same tensor) has the same
        # X^T X: given, only X^T Y is summed.
        self.shared_gram = gram is not None
        self.gram = gram if gram is not None else np.zeros((group, features, features))
        self.cross = np.zeros((group, features, outs))
        self.y_sum = np.zeros((group, outs))
        self.y_squares = np.zeros((group, outs))
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """One batch: the conv's input [N, C, H, W] and the target output [N, M, Ho, Wo]."""
        patches, targets = im2col(x, self.kernel, self.strides, self.pads), rows_of(y)
        if patches.shape[0] != targets.shape[0]:
            raise ValueError(f"{patches.shape[0]} patches for {targets.shape[0]} target pixels: the geometry "
                             "does not produce the target's spatial size")
        if self.max_rows is not None and patches.shape[0] > self.max_rows:
            keep = np.sort(self.rng.choice(patches.shape[0], self.max_rows, replace=False))
            patches, targets = patches[keep], targets[keep]
        count, g = patches.shape[0], self.group
        ones = np.ones((count, 1))
        patches = patches.astype(np.float64).reshape(count, g, -1)
        targets = targets.astype(np.float64).reshape(count, g, -1)
        if g == 1:
            design = np.concatenate([patches[:, 0], ones], axis=1)
            if not self.shared_gram:
                self.gram[0] += design.T @ design
            self.cross[0] += design.T @ targets[:, 0]
        else:
            design = np.concatenate([patches, np.broadcast_to(ones[:, None], (count, g, 1))], axis=2)
            if not self.shared_gram:
                self.gram += np.einsum("pgf,pgh->gfh", design, design, optimize=True)
            self.cross += np.einsum("pgf,pgo->gfo", design, targets, optimize=True)
        self.y_sum += targets.sum(axis=0)
        self.y_squares += (targets * targets).sum(axis=0)
        self.rows += count

    def solve(self) -> FitResult:
        if self.rows == 0:
            raise ValueError("no data was added to the fit")
        features = self.gram.shape[1] - 1
        diag = np.einsum("gii->gi", self.gram[:, :features, :features])
        scale = self.ridge * float(diag.mean()) if diag.size else 0.0
        penalty = np.eye(features + 1)
        penalty[features, features] = 0.0  # the bias is not regularized
        solutions = _solve(self.gram + max(scale, 1e-300) * penalty, self.cross)  # [g, features + 1, outs]
        # ||X1 w - y||^2 = w^T G w - 2 w^T X^T y + y^T y, summed over groups and outputs.
        fitted = np.einsum("gfo,gfh,gho->", solutions, self.gram, solutions)
        error = fitted - 2 * np.einsum("gfo,gfo->", solutions, self.cross) + self.y_squares.sum()
        spread = self.y_squares.sum() - (self.y_sum ** 2).sum() / self.rows
        residual = float(np.sqrt(max(error, 0.0) / spread)) if spread > 0 else 0.0
        kh, kw = self.kernel
        cin = self.in_channels // self.group
        # [g, cin*kh*kw, outs] -> [g * outs, cin, kh, kw], the grouped ONNX weight layout.
        weight = solutions[:, :features].transpose(0, 2, 1).reshape(self.out_channels, cin, kh, kw)
        bias = solutions[:, features].reshape(self.out_channels)
        return FitResult(weight, bias, residual, self.rows)


def _solve(matrices: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Stacked solves, one per group; least norm for a group singular despite the ridge (constant inputs)."""
    try:
        return np.linalg.solve(matrices, rhs)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(m, r, rcond=None)[0] for m, r in zip(matrices, rhs)])
