"""Weight algebra for folding ONNX convolutions, in plain numpy.

ONNX conventions throughout: a Conv weight is [M, C/g, k_1..k_N], pads are (begin_1..begin_N,
end_1..end_N), a ConvTranspose weight is [C_in, M/g, k_1..k_N]; N is 1, 2 or 3. E = d*(k-1)+1 is a
kernel's dilated extent on an axis.

Identities, and when they are exact:

* Affine after a linear op: s*(W*x + b) + t = (s*W)*x + (s*b + t) per output channel. Exact.
  BatchNormalization at inference is such a map: s = gamma/sqrt(var+eps), t = beta - mean*s.
* Scale before a conv: conv(s[c]*x) = conv'(x) with W'[m, c] = W[m, c]*s[c]. Exact, padding
  included, because a scaled zero is still zero.
* Shift before a conv: conv(x + t[c]) = conv(x) + sum over (c, taps) of W[m, c]*t[c]. Exact only
  when the conv is unpadded: a padded conv reads zeros, not t, in its border.
* Composition second(first(x)) is one conv with stride s1*s2, extent E1 + (E2-1)*s1, pads
  p1b + p2b*s1 and p1e + p2e*s1 and bias b2 + sum W2*b1. Those pads give the same output size for
  every input size (floor(floor(a/s1)/s2) = floor(a/(s1*s2))). It is
  - exact everywhere when `second` has no padding;
  - exact up to an input-independent map when `second` is padded and `first` is pointwise: the
    linear parts agree, only b1 leaks into second's zero border (`border_correction`; zero when
    b1 = 0);
  - exact only in the interior when both are spatial and `second` is padded: the zero border that
    `second` adds is not the image of the input's zero border.
* A sum of parallel branches sum_i conv_i(x) is one conv on the union of their taps. Exact
  everywhere when the strides are equal and every branch has the same output size for every input
  size (pb + pe - E equal per axis): with zero padding a tap then reads the same input position, or
  the same zero, in its branch and in the merged conv.

Inputs narrower than float64 are computed in float64 and cast back to the weight dtype once, at the
end, so each fold rounds once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np

__all__ = [
    "ConvParams",
    "NotMergeable",
    "affine_after_conv",
    "affine_after_conv_transpose",
    "affine_after_gemm",
    "affine_before_conv",
    "affine_before_gemm",
    "bn_scale_shift",
    "border_correction",
    "compose",
    "compose_matmul",
    "conv_reference",
    "detect_groups",
    "expand_groups",
    "identity_params",
    "merge_parallel",
    "narrow",
    "output_spatial",
    "pad_kernel",
    "parallel_shape",
]


class NotMergeable(ValueError):
    """Raised with a readable reason (str(e)) when an algebraic merge is impossible."""


def _f64(a: np.ndarray | float) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _out_dtype(*arrays: np.ndarray) -> np.dtype:
    # Folds keep the model's float type; anything non-float (never expected) becomes float64.
    dtype = np.result_type(*arrays)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def narrow(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` cast to the model's float type; a merge whose result does not fit is not made
    (float16 weights multiplied together overflow to inf)."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating) or not values.size:
        return values.astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        narrowed = values.astype(dtype)
    _check_finite(narrowed, values)
    return narrowed


def _check_finite(narrowed: np.ndarray, values: np.ndarray | None = None) -> None:
    """Raise ``NotMergeable`` if a merged array holds inf or NaN: an overflow when it was cast
    from the wider ``values``, else non-finite weights to begin with."""
    # Any of them shows as a non-finite extreme: two passes, no temporary as large as the weights.
    if not narrowed.size or (np.isfinite(narrowed.min()) and np.isfinite(narrowed.max())):
        return
    values = narrowed if values is None else values
    with np.errstate(invalid="ignore"):
        largest = float(np.max(np.abs(values)))
    raise NotMergeable(f"the merged values (up to {largest:.3g}) overflow {narrowed.dtype.name}")


def _per_channel(values: np.ndarray | float, count: int, name: str) -> np.ndarray:
    values = _f64(values)
    try:
        return np.broadcast_to(values.reshape(-1) if values.ndim else values, (count,))
    except ValueError:
        raise ValueError(f"{name} has shape {values.shape}, expected [{count}] or a scalar") from None


@dataclass(eq=False)  # eq would compare arrays elementwise and fail; compare fields explicitly
class ConvParams:
    """An ONNX Conv: weight [M, C/g, *k], bias [M], per-axis strides/dilations, 2N pads."""

    weight: np.ndarray
    bias: np.ndarray
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    group: int = 1

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight)
        self.bias = np.asarray(self.bias)
        self.strides = tuple(int(v) for v in self.strides)
        self.dilations = tuple(int(v) for v in self.dilations)
        self.pads = tuple(int(v) for v in self.pads)
        self.group = int(self.group)
        n = self.weight.ndim - 2
        if n < 1:
            raise ValueError(f"weight must be [M, C/g, *k], got shape {self.weight.shape}")
        if len(self.strides) != n or len(self.dilations) != n or len(self.pads) != 2 * n:
            raise ValueError(f"a rank-{n} conv needs {n} strides, {n} dilations and {2 * n} pads")
        if min(self.strides + self.dilations) < 1 or (self.pads and min(self.pads) < 0):
            raise ValueError("strides and dilations must be >= 1 and pads >= 0")
        if self.group < 1 or self.weight.shape[0] % self.group:
            raise ValueError(f"group {self.group} does not divide {self.weight.shape[0]} outputs")
        if self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"bias must be [{self.weight.shape[0]}], got {self.bias.shape}")

    @classmethod
    def create(
        cls,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        strides: Sequence[int] | None = None,
        dilations: Sequence[int] | None = None,
        pads: Sequence[int] | None = None,
        group: int = 1,
    ) -> ConvParams:
        """Fill ONNX defaults: zero bias, stride 1, dilation 1, no padding."""
        weight = np.asarray(weight)
        n = weight.ndim - 2
        return cls(
            weight=weight,
            bias=np.zeros(weight.shape[0], weight.dtype) if bias is None else np.asarray(bias),
            strides=(1,) * n if strides is None else tuple(strides),
            dilations=(1,) * n if dilations is None else tuple(dilations),
            pads=(0,) * (2 * n) if pads is None else tuple(pads),
            group=group,
        )

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.group

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def rank(self) -> int:
        return self.weight.ndim - 2

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilations, self.kernel_shape))

    @property
    def is_pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel_shape)

    @property
    def pads_begin(self) -> tuple[int, ...]:
        return self.pads[: self.rank]

    @property
    def pads_end(self) -> tuple[int, ...]:
        return self.pads[self.rank :]


def output_spatial(p: ConvParams, in_spatial: Sequence[int]) -> tuple[int, ...]:
    """ONNX output size per axis: floor((n + pb + pe - E) / s) + 1."""
    if len(in_spatial) != p.rank:
        raise ValueError(f"expected {p.rank} spatial sizes, got {tuple(in_spatial)}")
    out = []
    for axis, size in enumerate(in_spatial):
        span = size + p.pads_begin[axis] + p.pads_end[axis] - p.extent[axis]
        if span < 0:
            raise ValueError(f"axis {axis}: padded input {size} is smaller than extent {p.extent[axis]}")
        out.append(span // p.strides[axis] + 1)
    return tuple(out)


def conv_reference(x: np.ndarray, p: ConvParams) -> np.ndarray:
    """ONNX Conv on x [B, C, *spatial]: zero padding, floor output size, float64 accumulation."""
    x = np.asarray(x)
    if x.ndim != p.rank + 2 or x.shape[1] != p.in_channels:
        raise ValueError(f"input {x.shape} does not fit a conv with {p.in_channels} input channels")
    out_sp = output_spatial(p, x.shape[2:])
    batch, g = x.shape[0], p.group
    widths = [(0, 0), (0, 0)] + list(zip(p.pads_begin, p.pads_end))
    xp = np.pad(_f64(x), widths)
    xp = xp.reshape(batch, g, p.in_channels // g, *xp.shape[2:])
    w = _f64(p.weight).reshape(g, p.out_channels // g, p.weight.shape[1], *p.kernel_shape)
    y = np.zeros((batch, g, p.out_channels // g, math.prod(out_sp)))
    # One matmul per tap (im2col one column at a time): python loops over k^N taps, never pixels.
    for tap in np.ndindex(*p.kernel_shape):
        window = tuple(
            slice(t * d, t * d + s * (o - 1) + 1, s)
            for t, d, s, o in zip(tap, p.dilations, p.strides, out_sp)
        )
        patch = xp[(slice(None),) * 3 + window].reshape(batch, g, -1, y.shape[-1])
        y += np.matmul(w[(Ellipsis,) + tap], patch)
    y = y.reshape(batch, p.out_channels, *out_sp) + _f64(p.bias).reshape(-1, *[1] * p.rank)
    return y.astype(_out_dtype(x, p.weight))


def bn_scale_shift(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization at inference as y = scale*x + shift (per channel)."""
    dtype = _out_dtype(gamma, beta, mean, var)
    scale = _f64(gamma) / np.sqrt(_f64(var) + float(eps))
    shift = _f64(beta) - _f64(mean) * scale
    return scale.astype(dtype), shift.astype(dtype)


def affine_after_conv(p: ConvParams, scale: np.ndarray | float, shift: np.ndarray | float) -> ConvParams:
    """conv'(x) == scale[m]*conv(x) + shift[m]. Exact."""
    m = p.out_channels
    scale, shift = _per_channel(scale, m, "scale"), _per_channel(shift, m, "shift")
    # One product per weight, rounded once in the weight's precision (float32 for float16),
    # as torch's fuse_conv_bn_weights and onnxruntime's own Conv+BN fusion do: a float64
    # copy of every weight dominated the folding time of large models.
    work = np.float64 if p.weight.dtype == np.float64 else np.float32
    weight = p.weight.astype(work, copy=False) * scale.astype(work).reshape(m, *[1] * (p.weight.ndim - 1))
    bias = _f64(p.bias) * scale + shift
    return replace(p, weight=weight.astype(p.weight.dtype, copy=False), bias=bias.astype(p.weight.dtype))


def affine_after_conv_transpose(
    weight: np.ndarray,
    bias: np.ndarray | None,
    scale: np.ndarray | float,
    shift: np.ndarray | float,
    group: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold a per-output-channel affine map into an ONNX ConvTranspose. Exact.

    The weight is [C_in, M/g, *k]; output channel gi*(M/g) + j comes from column j of the rows of
    input group gi, so the scale is laid out as [g, 1, M/g] over [g, C_in/g, M/g].
    """
    weight = np.asarray(weight)
    c_in, m_per_group = weight.shape[:2]
    if c_in % group:
        raise ValueError(f"group {group} does not divide {c_in} input channels")
    m = m_per_group * group
    scale, shift = _per_channel(scale, m, "scale"), _per_channel(shift, m, "shift")
    spatial = [1] * (weight.ndim - 2)
    folded = _f64(weight).reshape(group, c_in // group, m_per_group, *weight.shape[2:])
    folded = folded * scale.reshape(group, 1, m_per_group, *spatial)
    new_bias = (np.zeros(m) if bias is None else _f64(bias)) * scale + shift
    return folded.reshape(weight.shape).astype(weight.dtype), new_bias.astype(weight.dtype)


def affine_after_gemm(
    b_matrix: np.ndarray,
    bias: np.ndarray | None,
    scale: np.ndarray | float,
    shift: np.ndarray | float,
    trans_b: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold scale*(x @ B + bias) + shift over the N output features into (B', bias'). Exact.

    Gemm's alpha/beta are the caller's to fold first. bias may be any shape that broadcasts to the
    [rows, N] output; bias' keeps that broadcast shape (at least [N]).
    """
    b_matrix = np.asarray(b_matrix)
    if b_matrix.ndim != 2:
        raise ValueError(f"B must be 2-D, got shape {b_matrix.shape}")
    n = b_matrix.shape[0] if trans_b else b_matrix.shape[1]
    scale, shift = _per_channel(scale, n, "scale"), _per_channel(shift, n, "shift")
    folded = _f64(b_matrix) * (scale[:, None] if trans_b else scale[None, :])
    new_bias = shift if bias is None else _f64(bias) * scale + shift
    return folded.astype(b_matrix.dtype), np.asarray(new_bias).astype(b_matrix.dtype)


def affine_before_conv(p: ConvParams, scale: np.ndarray | float, shift: np.ndarray | float) -> ConvParams:
    """conv(scale[c]*x + shift[c]) == conv'(x) per input channel c.

    The scale is exact for any padding; the shift only when ``p`` is unpadded (the caller's
    check): it enters the bias through every tap, and a padded conv's border taps read zero.
    In a grouped conv, input channel c belongs to group c // (C/g) and is column c % (C/g) of
    that group's rows. Raises NotMergeable when the result overflows the weight dtype.
    """
    g, c_per_group = p.group, p.weight.shape[1]
    scale = _per_channel(scale, p.in_channels, "scale").reshape(g, 1, c_per_group, *[1] * p.rank)
    shift = _per_channel(shift, p.in_channels, "shift")
    weight = _f64(p.weight).reshape(g, p.out_channels // g, c_per_group, *p.kernel_shape) * scale
    bias = _bias_through(p, shift)  # the shift meets the original weights, before the scale
    dtype = p.weight.dtype
    return replace(p, weight=narrow(weight.reshape(p.weight.shape), dtype), bias=narrow(bias, dtype))


def affine_before_gemm(
    b_matrix: np.ndarray,
    bias: np.ndarray | None,
    scale: np.ndarray | float,
    shift: np.ndarray | float,
    trans_b: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(scale[k]*x + shift[k]) @ B + bias == x @ B' + bias' over the K input features. Exact.

    B is [K, N] ([N, K] when ``trans_b``); Gemm's alpha/beta are the caller's to fold first. bias'
    is None only when there was no bias and the shift is zero. Raises NotMergeable on overflow.
    """
    b_matrix = np.asarray(b_matrix)
    if b_matrix.ndim != 2:
        raise ValueError(f"B must be 2-D, got shape {b_matrix.shape}")
    matrix = _f64(b_matrix).T if trans_b else _f64(b_matrix)  # [K, N]
    scale, shift = _per_channel(scale, matrix.shape[0], "scale"), _per_channel(shift, matrix.shape[0], "shift")
    folded = matrix * scale[:, None]
    dtype = b_matrix.dtype
    new_matrix = narrow(folded.T if trans_b else folded, dtype)
    if bias is None and not np.any(shift):
        return new_matrix, None
    through = shift @ matrix  # [N]
    new_bias = through if bias is None else _f64(bias) + through
    return new_matrix, narrow(np.asarray(new_bias), dtype)


def expand_groups(weight: np.ndarray, group: int) -> np.ndarray:
    """Grouped [M, C/g, *k] -> dense block-diagonal [M, C, *k] (a new array)."""
    weight = np.asarray(weight)
    m, c_per_group = weight.shape[:2]
    if m % group:
        raise ValueError(f"group {group} does not divide {m} output channels")
    kernel = weight.shape[2:]
    dense = np.zeros((m, c_per_group * group, *kernel), weight.dtype)
    diag = np.arange(group)
    # Indexing [diag, :, diag] of the [g, M/g, g, C/g, *k] view writes the diagonal blocks at once.
    dense.reshape(group, m // group, group, c_per_group, *kernel)[diag, :, diag] = weight.reshape(
        group, m // group, c_per_group, *kernel
    )
    return dense


def detect_groups(dense: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest g whose off-diagonal blocks are exactly zero, and the grouped weight."""
    dense = np.asarray(dense)
    m, c = dense.shape[:2]
    kernel = dense.shape[2:]
    if m > 1 and c > 1 and (np.any(dense[0, c - 1] != 0) or np.any(dense[m - 1, 0] != 0)):
        # Output 0 reading the last input channel (or the last output the first) is off the
        # block diagonal for every g >= 2: a dense weight is told at once, not by a full scan.
        return dense, 1
    nonzero = np.any(dense != 0, axis=tuple(range(2, dense.ndim)))  # NaN counts as nonzero
    total = np.count_nonzero(nonzero)
    common = math.gcd(m, c)
    for g in sorted((d for d in range(2, common + 1) if common % d == 0), reverse=True):
        diag = np.arange(g)
        if np.count_nonzero(nonzero.reshape(g, m // g, g, c // g)[diag, :, diag]) != total:
            continue
        blocks = dense.reshape(g, m // g, g, c // g, *kernel)[diag, :, diag]
        return blocks.reshape(m, c // g, *kernel), g
    return dense, 1


def pad_kernel(weight: np.ndarray, kernel_shape: Sequence[int]) -> np.ndarray:
    """Zero-pad each spatial axis of [M, C/g, *k] to kernel_shape, centred."""
    weight = np.asarray(weight)
    if len(kernel_shape) != weight.ndim - 2:
        raise ValueError(f"kernel_shape {tuple(kernel_shape)} does not match weight {weight.shape}")
    widths = [(0, 0), (0, 0)]
    for axis, (have, want) in enumerate(zip(weight.shape[2:], kernel_shape)):
        diff = int(want) - have
        if diff < 0:
            raise NotMergeable(f"axis {axis}: kernel size {have} is larger than the target {want}")
        if diff % 2:
            raise NotMergeable(
                f"axis {axis}: a size-{have} kernel cannot be centred in size {want} (odd difference)"
            )
        widths.append((diff // 2, diff // 2))
    return np.pad(weight, widths)


def identity_params(
    channels: int, kernel_shape: Sequence[int], dtype: np.dtype | type, group: int = 1
) -> ConvParams:
    """The conv that is exactly x: 1 at W[i, i mod (C/g), centre], stride 1, 'same' pads."""
    kernel = tuple(int(k) for k in kernel_shape)
    if any(k % 2 == 0 for k in kernel):
        # An even kernel has no centre: the identity tap would need asymmetric padding.
        raise NotMergeable(f"an identity kernel needs odd sizes, got {kernel}")
    if channels % group:
        raise ValueError(f"group {group} does not divide {channels} channels")
    weight = np.zeros((channels, channels // group, *kernel), dtype)
    rows = np.arange(channels)
    weight[(rows, rows % (channels // group)) + tuple(k // 2 for k in kernel)] = 1
    half = tuple(k // 2 for k in kernel)
    return ConvParams.create(weight, pads=half + half, group=group)


def _compose_geometry(
    first: ConvParams, second: ConvParams
) -> tuple[tuple[tuple[int, ...], ...], list[int], list[int]]:
    """(strides, dilations, kernel, pads) of the merged conv, and per axis the spacing of first's
    taps and of second's taps on the merged kernel."""
    strides, dilations, kernel, begins, ends, steps1, steps2 = ([] for _ in range(7))
    for axis in range(first.rank):
        s1 = first.strides[axis]
        # Taps of `first` sit d1 apart, taps of `second` s1*d2 apart (in input units); an axis with
        # a single tap has no step, so it must not force the lattice down to 1.
        step1 = first.dilations[axis] if first.kernel_shape[axis] > 1 else 0
        step2 = s1 * second.dilations[axis] if second.kernel_shape[axis] > 1 else 0
        lattice = math.gcd(step1, step2) or 1
        extent = first.extent[axis] + (second.extent[axis] - 1) * s1
        strides.append(s1 * second.strides[axis])
        dilations.append(lattice)
        kernel.append((extent - 1) // lattice + 1)
        begins.append(first.pads_begin[axis] + second.pads_begin[axis] * s1)
        ends.append(first.pads_end[axis] + second.pads_end[axis] * s1)
        steps1.append(max(step1 // lattice, 1))
        steps2.append(step2 // lattice)
    geometry = (tuple(strides), tuple(dilations), tuple(kernel), tuple(begins + ends))
    return geometry, steps1, steps2


def _tap_products(first: ConvParams, second: ConvParams) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """For each tap u of `second`: sum_c1 W2[:, c1, u] * W1[c1] as [M2, C0/g or C0, *k1].

    Grouped as [M2, C0/g] when both convs have the same g (the product is block diagonal with the
    same blocks); dense [M2, C0] otherwise. Only the weight with fewer groups is expanded, so the
    matmuls never run over the zero blocks of the finer one (depthwise stays cheap).
    """
    g1, g2 = first.group, second.group
    m1, m2, k1 = first.out_channels, second.out_channels, first.kernel_shape
    w1, w2 = _f64(first.weight), _f64(second.weight)
    taps = list(np.ndindex(*second.kernel_shape))
    if g1 <= g2:
        a = w2.reshape(g2, m2 // g2, m1 // g2, -1)
        b = (w1 if g1 == g2 else expand_groups(w1, g1)).reshape(g2, m1 // g2, -1)
        cols = b.shape[-1] // math.prod(k1)
        for i, tap in enumerate(taps):
            yield tap, np.matmul(a[..., i], b).reshape(m2, cols, *k1)
    else:
        a = expand_groups(w2, g2).reshape(m2, g1, m1 // g1, -1).transpose(1, 0, 2, 3)
        b = w1.reshape(g1, m1 // g1, -1)
        for i, tap in enumerate(taps):
            mix = np.matmul(a[..., i], b)  # [g1, M2, C0/g1 * k1]
            yield tap, mix.transpose(1, 0, 2).reshape(m2, first.in_channels, *k1)


def _bias_through(second: ConvParams, value: np.ndarray) -> np.ndarray:
    """b2 + sum over (c, taps) of W2 * value[c]: `second` applied to a constant map, no padding."""
    g, m1, m2 = second.group, second.in_channels, second.out_channels
    summed = _f64(second.weight).sum(axis=tuple(range(2, second.weight.ndim)))
    through = np.matmul(summed.reshape(g, m2 // g, m1 // g), _f64(value).reshape(g, m1 // g, 1))
    return _f64(second.bias) + through.reshape(m2)


def _check_chain(first: ConvParams, second: ConvParams) -> None:
    if first.rank != second.rank:
        raise NotMergeable(f"spatial ranks differ: {first.rank} and {second.rank}")
    if first.out_channels != second.in_channels:
        raise NotMergeable(
            f"channels do not chain: first has {first.out_channels} outputs, "
            f"second expects {second.in_channels} inputs"
        )


def compose_shape(first: ConvParams, second: ConvParams) -> ConvParams:
    """The conv ``compose`` returns, its weight's shape alone: the weight is all zeros (taking no
    memory), its group a lower bound -- ``compose`` may find more in block-diagonal weights -- and
    its bias the real one, which needs only ``second``'s weights summed over their taps. Raises
    ``NotMergeable`` as ``compose`` does. ``first`` may be such a shape itself."""
    _check_chain(first, second)
    (strides, dilations, kernel, pads), _, _ = _compose_geometry(first, second)
    # Both weights are block diagonal over a partition into gcd(g1, g2) groups, so is the product.
    group = math.gcd(first.group, second.group)
    dtype = _out_dtype(first.weight, second.weight)
    weight = np.broadcast_to(np.zeros((), dtype), (second.out_channels, first.in_channels // group, *kernel))
    return ConvParams(weight, narrow(_bias_through(second, first.bias), dtype), strides, dilations, pads, group)


def compose(first: ConvParams, second: ConvParams) -> ConvParams:
    """The single conv equal to second(first(x)); see the module docstring for where it is exact."""
    _check_chain(first, second)
    (strides, dilations, kernel, pads), steps1, steps2 = _compose_geometry(first, second)
    merged = None
    for tap, product in _tap_products(first, second):
        if merged is None:
            merged = np.zeros(product.shape[:2] + kernel)
        window = tuple(
            slice(u * st2, u * st2 + (k - 1) * st1 + 1, st1)
            for u, st1, st2, k in zip(tap, steps1, steps2, first.kernel_shape)
        )
        merged[(slice(None), slice(None)) + window] += product
    bias = _bias_through(second, first.bias)
    if first.group == second.group:
        weight, group = merged, first.group
    else:
        weight, group = detect_groups(merged)
    dtype = _out_dtype(first.weight, second.weight)
    return ConvParams(narrow(weight, dtype), narrow(bias, dtype), strides, dilations, pads, group)


def border_correction(first: ConvParams, second: ConvParams, in_spatial: Sequence[int]) -> np.ndarray:
    """C [1, M2, *out] with second(first(x)) == compose(first, second)(x) + C for every x of size
    in_spatial.

    Only defined when the linear parts agree: `second` unpadded (C = 0) or `first` pointwise.
    Then C = second(first(0)) - merged(0) = -(sum over the taps of `second` that fall in its zero
    border of W2*b1), which is computed per axis from tap masks rather than by a convolution.
    """
    mid = output_spatial(first, in_spatial)
    out = output_spatial(second, mid)
    m2 = second.out_channels
    dtype = _out_dtype(first.weight, second.weight)
    if not any(second.pads):
        return np.zeros((1, m2, *out), dtype)
    if not first.is_pointwise:
        raise NotMergeable(
            "second conv is padded after a spatial first conv: the border error depends on the "
            "input, so no constant correction exists (the merge is exact in the interior only)"
        )
    if not np.any(first.bias):
        return np.zeros((1, m2, *out), dtype)
    g, m1 = second.group, second.in_channels
    w2 = _f64(second.weight).reshape(g, m2 // g, m1 // g, -1)
    per_tap = np.einsum("gojt,gj->got", w2, _f64(first.bias).reshape(g, m1 // g))
    per_tap = per_tap.reshape(m2, *second.kernel_shape)  # response of each tap to b1
    inside = per_tap
    for axis in range(second.rank):
        positions = np.arange(out[axis])[:, None] * second.strides[axis]
        offsets = np.arange(second.kernel_shape[axis])[None, :] * second.dilations[axis]
        read = positions + offsets - second.pads_begin[axis]
        lands = ((read >= 0) & (read < mid[axis])).astype(np.float64)  # [out, k]
        # Always contract axis 1: tensordot appends the new output axis at the end.
        inside = np.tensordot(inside, lands, axes=([1], [1]))
    total = per_tap.reshape(m2, -1).sum(axis=1).reshape(m2, *[1] * second.rank)
    return narrow((inside - total)[None], dtype)


def _misaligned(branches: Sequence[ConvParams], axis: int, spans: list[int]) -> NotMergeable:
    """A readable reason for branches whose output sizes differ on `axis`."""
    bad = next(i for i, span in enumerate(spans) if span != spans[0])
    a, b = branches[0], branches[bad]
    reason = (
        f"padding does not align on spatial axis {axis}: branch 0 (kernel {a.kernel_shape[axis]}, "
        f"dilation {a.dilations[axis]}, pads {a.pads_begin[axis]}/{a.pads_end[axis]}) and branch "
        f"{bad} (kernel {b.kernel_shape[axis]}, dilation {b.dilations[axis]}, pads "
        f"{b.pads_begin[axis]}/{b.pads_end[axis]}) give different output sizes"
    )
    if (a.extent[axis] - b.extent[axis]) % 2:
        reason += "; their extents differ by an odd amount, so symmetric padding cannot centre one in the other"
    return NotMergeable(reason)


def _parallel_geometry(
    branches: Sequence[ConvParams],
) -> tuple[tuple[tuple[int, ...], ...], list[list[slice]]]:
    """(dilations, kernel, pads) of the merged conv and, per branch, where its taps go on it."""
    n = branches[0].rank
    dilations, kernel, begins, ends = [], [], [], []
    windows: list[list[slice]] = [[] for _ in branches]
    for axis in range(n):
        # Same output size for every input size <=> pb + pe - E is the same for all branches.
        spans = [b.pads_begin[axis] + b.pads_end[axis] - b.extent[axis] for b in branches]
        if len(set(spans)) > 1:
            raise _misaligned(branches, axis, spans)
        # Tap t of a branch reads input offset -pb + t*d; the merged kernel covers every such
        # offset, on the coarsest lattice that holds all of them (a 1x1 fits anywhere).
        begin = max(b.pads_begin[axis] for b in branches)
        last = max(b.extent[axis] - 1 - b.pads_begin[axis] for b in branches)
        lattice = 0
        for b in branches:
            lattice = math.gcd(lattice, begin - b.pads_begin[axis])
            if b.kernel_shape[axis] > 1:
                lattice = math.gcd(lattice, b.dilations[axis])
        lattice = lattice or 1
        extent = begin + last + 1
        dilations.append(lattice)
        kernel.append((extent - 1) // lattice + 1)
        begins.append(begin)
        ends.append(spans[0] + extent - begin)
        for i, b in enumerate(branches):
            start = (begin - b.pads_begin[axis]) // lattice
            step = max(b.dilations[axis] // lattice, 1) if b.kernel_shape[axis] > 1 else 1
            windows[i].append(slice(start, start + (b.kernel_shape[axis] - 1) * step + 1, step))
    return (tuple(dilations), tuple(kernel), tuple(begins + ends)), windows


def merge_parallel(branches: Sequence[ConvParams]) -> ConvParams:
    """One conv equal to the sum of `branches` applied to the same input. Exact everywhere.

    The branches are summed in the layout of the gcd of their groups (a conv with g groups is
    also one with any divisor of g, with block-diagonal blocks), so a depthwise branch beside a
    dense one is never expanded to a dense array. Each merged weight is its float64 sum rounded
    once; where one branch alone covers the whole kernel (a 3x3 beside a 1x1 and an identity),
    the sum is formed only over the taps the others reach and the rest is that branch's copy.
    """
    shape = parallel_shape(branches)
    (_, kernel, _), windows = _parallel_geometry(branches)
    group, dtype = shape.group, shape.weight.dtype
    full = tuple(slice(0, size, 1) for size in kernel)
    base = next((i for i, (b, w) in enumerate(zip(branches, windows))
                 if b.group == group and tuple(w) == full), None)
    if base is None:
        merged = np.zeros(shape.weight.shape)
        for b, window in zip(branches, windows):
            _add_grouped(merged, group, b.weight, b.group, window)
        merged = narrow(merged, dtype)
    else:
        merged = branches[base].weight.astype(dtype)  # a copy
        others = [(b, w) for i, (b, w) in enumerate(zip(branches, windows)) if i != base]
        if others:
            # The taps the other branches reach: their bounding box, summed in float64 there.
            box = tuple(slice(min(w[a].start for _, w in others), max(w[a].stop for _, w in others))
                        for a in range(len(kernel)))
            region = (slice(None), slice(None)) + box
            total = merged[region].astype(np.float64)
            for b, window in others:
                moved = [slice(w.start - r.start, w.stop - r.start, w.step) for w, r in zip(window, box)]
                _add_grouped(total, group, b.weight, b.group, moved)
            merged[region] = narrow(total, dtype)
        _check_finite(merged)
    if len({b.group for b in branches}) > 1:
        # A branch declared dense may still be block-diagonal (an identity written as a dense
        # 1x1): keep the largest group the merged weights allow.
        merged, group = detect_groups(merged if group == 1 else expand_groups(merged, group))
    bias = np.sum([_f64(b.bias) for b in branches], axis=0)
    return ConvParams(merged, narrow(bias, dtype), shape.strides, shape.dilations, shape.pads, group)


def parallel_shape(branches: Sequence[ConvParams]) -> ConvParams:
    """The conv ``merge_parallel`` returns, all zeros: its attributes and weight shape, from the
    branches' shapes alone (the weights are not read, the zeros take no memory). Raises
    ``NotMergeable`` as ``merge_parallel`` does. Its group is a lower bound when the branches'
    groups differ (``merge_parallel`` may find block-diagonal weights)."""
    branches = list(branches)
    if not branches:
        raise ValueError("merge_parallel needs at least one branch")
    ref = branches[0]
    for i, b in enumerate(branches[1:], start=1):
        if b.rank != ref.rank:
            raise NotMergeable(f"spatial ranks differ: branch 0 has {ref.rank}, branch {i} has {b.rank}")
        if b.strides != ref.strides:
            raise NotMergeable(f"strides differ: branch 0 has {ref.strides}, branch {i} has {b.strides}")
        if (b.in_channels, b.out_channels) != (ref.in_channels, ref.out_channels):
            raise NotMergeable(
                f"channels differ: branch 0 maps {ref.in_channels}->{ref.out_channels}, "
                f"branch {i} maps {b.in_channels}->{b.out_channels}"
            )
    (dilations, kernel, pads), _ = _parallel_geometry(branches)
    group = math.gcd(*(b.group for b in branches))
    dtype = _out_dtype(*(b.weight for b in branches))
    weight = np.broadcast_to(np.zeros((), dtype), (ref.out_channels, ref.in_channels // group, *kernel))
    return ConvParams(weight, np.zeros(ref.out_channels, dtype), ref.strides, dilations, pads, group)


def _add_grouped(merged: np.ndarray, group: int, weight: np.ndarray, weight_group: int,
                 window: Sequence[slice]) -> None:
    """merged[:, :, window] += weight, a conv of ``weight_group`` groups written into one of
    ``group`` groups (a divisor): its blocks go on the diagonal of each of merged's groups."""
    spatial = tuple(window)
    if weight_group == group:
        merged[(slice(None), slice(None)) + spatial] += weight  # cast to float64 on the fly
        return
    inner = weight_group // group  # blocks of ``weight`` inside each of merged's groups
    m, cols = merged.shape[:2]
    rows, width = m // weight_group, cols // inner
    # [g, inner, rows, inner, width, *k]: weight's blocks sit at [:, d, :, d] for d < inner.
    view = merged.reshape(group, inner, rows, inner, width, *merged.shape[2:])
    diag = np.arange(inner)
    blocks = weight.reshape(group, inner, rows, width, *weight.shape[2:]).swapaxes(0, 1)
    view[(slice(None), diag, slice(None), diag, slice(None)) + spatial] += blocks


def compose_matmul(
    w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(x @ w1 + b1) @ w2 + b2 == x @ W + B. Exact; B is None only when both biases are."""
    w1, w2 = np.asarray(w1), np.asarray(w2)
    if w1.ndim != 2 or w2.ndim != 2 or w1.shape[1] != w2.shape[0]:
        raise NotMergeable(f"matrices do not chain: {w1.shape} then {w2.shape}")
    dtype = _out_dtype(w1, w2)
    weight = narrow(_f64(w1) @ _f64(w2), dtype)
    if b1 is None and b2 is None:
        return weight, None
    bias = np.zeros(w2.shape[1])
    if b1 is not None:
        # A scalar or [rows, 1] bias broadcasts over N1 before it meets w2.
        b1 = _f64(b1)
        bias = bias + np.broadcast_to(b1, np.broadcast_shapes(b1.shape, (w1.shape[1],))) @ _f64(w2)
    if b2 is not None:
        bias = bias + _f64(b2)
    return weight, narrow(bias, dtype)
