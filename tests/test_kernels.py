"""graphfold.kernels against torch's convolutions (float64 on both sides, so any mismatch beyond
rounding is an algebra bug, not float noise)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphfold import kernels as K

torch = pytest.importorskip("torch")
F = torch.nn.functional

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def torch_conv(x: np.ndarray, p: K.ConvParams) -> np.ndarray:
    """ONNX Conv via torch: torch only pads symmetrically, so pad the input explicitly."""
    pad: list[int] = []
    for axis in reversed(range(p.rank)):  # F.pad lists the last axis first
        pad += [p.pads_begin[axis], p.pads_end[axis]]
    xt = F.pad(torch.from_numpy(np.asarray(x, np.float64)), pad)
    y = TORCH_CONV[p.rank](
        xt,
        torch.from_numpy(p.weight.astype(np.float64)),
        torch.from_numpy(p.bias.astype(np.float64)),
        stride=p.strides,
        dilation=p.dilations,
        groups=p.group,
    )
    return y.numpy()


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-10) -> None:
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale)


def make_conv(rng, c_in, c_out, group, kernel, strides=None, dilations=None, pads=None, dtype=np.float64):
    weight = rng.standard_normal((c_out, c_in // group, *kernel)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype)
    return K.ConvParams.create(weight, bias, strides, dilations, pads, group)


def out_size(n: int, k: int, s: int, d: int, pb: int, pe: int) -> int | None:
    """Independent ONNX output-size oracle for one axis (None where the conv is invalid)."""
    span = n + pb + pe - d * (k - 1) - 1
    return None if span < 0 else span // s + 1


def axis_chain_size(convs, axis: int, n: int) -> int | None:
    for p in convs:
        n = out_size(n, p.kernel_shape[axis], p.strides[axis], p.dilations[axis], p.pads_begin[axis], p.pads_end[axis])
        if n is None:
            return None
    return n


def smallest_input(convs, axis: int) -> int:
    return next(n for n in range(1, 200) if axis_chain_size(convs, axis, n) is not None)


# ---------------------------------------------------------------- strategies


@st.composite
def channel_plans(draw):
    """(g1, g2, c0, c1, c2) for a chain c0 -g1-> c1 -g2-> c2."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise", "mixed"]))
    if kind == "depthwise":
        c = draw(st.integers(2, 4))
        return c, c, c, c, c
    if kind == "dense":
        return 1, 1, draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    if kind == "grouped":
        return 2, 2, *(2 * draw(st.integers(1, 2)) for _ in range(3))
    g1, g2 = draw(st.sampled_from([(1, 2), (2, 1), (2, 4), (4, 2), (4, 1), (1, 4)]))
    mid = math.lcm(g1, g2)
    return g1, g2, g1 * draw(st.integers(1, 2)), mid * draw(st.integers(1, 2)), g2 * draw(st.integers(1, 2))


@st.composite
def chains(draw, second_padded: bool, first_pointwise: bool = False, extra: int = 3):
    """(first, second, input spatial size): a random valid conv chain."""
    rank = draw(st.sampled_from((1, 2, 2, 3)))
    max_k = 3 if rank == 3 else 5
    g1, g2, c0, c1, c2 = draw(channel_plans())
    pad = st.integers(0, 2)

    def geometry(k_max: int, padded: bool):
        kernel = tuple(draw(st.integers(1, k_max)) for _ in range(rank))
        strides = tuple(draw(st.integers(1, 2)) for _ in range(rank))
        dilations = tuple(draw(st.integers(1, 2)) for _ in range(rank))
        pads = tuple(draw(pad) if padded else 0 for _ in range(2 * rank))
        return kernel, strides, dilations, pads

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    first = make_conv(rng, c0, c1, g1, *geometry(1 if first_pointwise else max_k, draw(st.booleans())))
    second = make_conv(rng, c1, c2, g2, *geometry(max_k, second_padded))
    sizes = tuple(smallest_input((first, second), a) + draw(st.integers(0, extra)) for a in range(rank))
    return first, second, sizes


# ---------------------------------------------------------------- conv_reference


@SETTINGS
@given(data=st.data())
def test_conv_reference_matches_torch(data):
    rank = data.draw(st.sampled_from((1, 2, 3)))
    g = data.draw(st.sampled_from((1, 2, 3)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    kernel = tuple(data.draw(st.integers(1, 3)) for _ in range(rank))
    strides = tuple(data.draw(st.integers(1, 3)) for _ in range(rank))
    dilations = tuple(data.draw(st.integers(1, 2)) for _ in range(rank))
    pads = tuple(data.draw(st.integers(0, 2)) for _ in range(2 * rank))
    p = make_conv(rng, g * data.draw(st.integers(1, 2)), g * data.draw(st.integers(1, 2)), g, kernel, strides, dilations, pads)
    sizes = tuple(smallest_input([p], a) + data.draw(st.integers(0, 4)) for a in range(rank))
    x = rng.standard_normal((2, p.in_channels, *sizes))
    assert_close(K.conv_reference(x, p), torch_conv(x, p))


def test_conv_reference_keeps_float32_and_rejects_small_inputs():
    rng = np.random.default_rng(0)
    p = make_conv(rng, 2, 3, 1, (3, 3), dtype=np.float32)
    y = K.conv_reference(rng.standard_normal((1, 2, 5, 5)).astype(np.float32), p)
    assert y.dtype == np.float32 and y.shape == (1, 3, 3, 3)
    with pytest.raises(ValueError):
        K.conv_reference(np.zeros((1, 2, 2, 5), np.float32), p)


# ---------------------------------------------------------------- compose


@SETTINGS
@given(chain=chains(second_padded=False))
def test_compose_unpadded_second_is_exact_everywhere(chain):
    first, second, sizes = chain
    merged = K.compose(first, second)
    x = np.random.default_rng(1).standard_normal((2, first.in_channels, *sizes))
    assert_close(torch_conv(x, merged), torch_conv(torch_conv(x, first), second))
    if first.group == second.group == first.in_channels == second.out_channels:
        assert merged.group == first.group  # depthwise -> depthwise stays depthwise
    assert not np.any(K.border_correction(first, second, sizes))


@SETTINGS
@given(chain=chains(second_padded=True))
def test_compose_shape_is_compose_without_the_weights(chain):
    # What the conv-chain pass decides on: the same geometry and bias as compose, a weight of the
    # right shape that takes no memory, and a group that divides the one compose finds.
    first, second, _ = chain
    shape, merged = K.compose_shape(first, second), K.compose(first, second)
    assert (shape.strides, shape.dilations, shape.pads) == (merged.strides, merged.dilations, merged.pads)
    assert shape.kernel_shape == merged.kernel_shape and merged.group % shape.group == 0
    assert shape.weight.shape == (merged.out_channels, merged.in_channels // shape.group, *merged.kernel_shape)
    assert shape.weight.strides == (0,) * shape.weight.ndim and not np.any(shape.weight)
    np.testing.assert_array_equal(shape.bias, merged.bias)
    # Chained: the shape of a shape composes like the real thing.
    third = make_conv(np.random.default_rng(5), second.out_channels, 2, 1, (1,) * first.rank)
    assert K.compose_shape(shape, third).kernel_shape == K.compose(merged, third).kernel_shape
    np.testing.assert_array_equal(K.compose_shape(shape, third).bias, K.compose(merged, third).bias)


@settings(SETTINGS, max_examples=25)
@given(chain=chains(second_padded=True, extra=0))
def test_compose_keeps_output_size_for_every_input_size(chain):
    first, second, _ = chain
    merged = K.compose(first, second)
    for axis in range(first.rank):
        for n in range(1, 30):  # odd and even sizes, stride 2 included
            expected = axis_chain_size([first, second], axis, n)
            # Where the chain is invalid (first's input too small), second's padding can still make
            # the merged conv valid: it accepts more sizes, never different ones.
            if expected is not None:
                assert axis_chain_size([merged], axis, n) == expected, n


def test_compose_output_size_matches_torch_for_odd_and_even_inputs():
    rng = np.random.default_rng(2)
    first = make_conv(rng, 2, 3, 1, (3, 3), (2, 2), (1, 1), (1, 0, 0, 1))
    second = make_conv(rng, 3, 2, 1, (3, 2), (2, 1), (1, 2), (1, 1, 0, 1))
    merged = K.compose(first, second)
    for h in range(6, 14):
        x = rng.standard_normal((1, 2, h, h + 1))
        assert torch_conv(x, merged).shape == torch_conv(torch_conv(x, first), second).shape


@SETTINGS
@given(chain=chains(second_padded=True, first_pointwise=True))
def test_compose_pointwise_then_padded_is_exact_with_border_correction(chain):
    first, second, sizes = chain
    merged = K.compose(first, second)
    correction = K.border_correction(first, second, sizes)
    x = np.random.default_rng(3).standard_normal((2, first.in_channels, *sizes))
    assert_close(torch_conv(x, merged) + correction, torch_conv(torch_conv(x, first), second))
    # The definition: the two sides differ by second(first(0)) - merged(0).
    zero = np.zeros((1, first.in_channels, *sizes))
    assert_close(correction, torch_conv(torch_conv(zero, first), second) - torch_conv(zero, merged))


def interior(first: K.ConvParams, second: K.ConvParams, sizes) -> tuple[slice, ...]:
    """Outputs of `second` whose taps all land inside first's output."""
    mid = [axis_chain_size([first], a, n) for a, n in enumerate(sizes)]
    window = []
    for a, n in enumerate(mid):
        s, pb, e = second.strides[a], second.pads_begin[a], second.extent[a]
        lo = -(-pb // s)  # first o with o*s - pb >= 0
        hi = (n - e + pb) // s  # last o with o*s - pb + e - 1 <= n - 1
        window.append(slice(lo, hi + 1))
    return (slice(None), slice(None), *window)


@SETTINGS
@given(chain=chains(second_padded=True, extra=6))
def test_compose_spatial_then_padded_is_exact_in_the_interior(chain):
    first, second, sizes = chain
    merged = K.compose(first, second)
    x = np.random.default_rng(4).standard_normal((2, first.in_channels, *sizes))
    inside = interior(first, second, sizes)
    assert_close(torch_conv(x, merged)[inside], torch_conv(torch_conv(x, first), second)[inside])


def test_compose_spatial_then_padded_differs_on_the_border():
    """The rule has teeth: 3x3 then padded 3x3 is wrong on the border, and no constant fixes it."""
    rng = np.random.default_rng(5)
    first = make_conv(rng, 3, 3, 1, (3, 3), pads=(1, 1, 1, 1))
    second = make_conv(rng, 3, 3, 1, (3, 3), pads=(1, 1, 1, 1))
    merged = K.compose(first, second)
    assert merged.kernel_shape == (5, 5) and merged.pads == (2, 2, 2, 2)
    x = rng.standard_normal((1, 3, 8, 8))
    diff = np.abs(torch_conv(x, merged) - torch_conv(torch_conv(x, first), second))
    assert diff[:, :, 1:-1, 1:-1].max() < 1e-10
    assert diff[:, :, 0].max() > 1e-2 and diff[:, :, :, -1].max() > 1e-2
    with pytest.raises(K.NotMergeable, match="interior only"):
        K.border_correction(first, second, (8, 8))


@pytest.mark.parametrize(
    ("first", "second", "kernel", "stride", "dilation"),
    [
        (((1, 1), (1, 1), (1, 1)), ((3, 3), (1, 1), (2, 2)), (3, 3), (1, 1), (2, 2)),  # 1x1 then 3x3 d2
        (((1, 1), (2, 2), (1, 1)), ((3, 3), (1, 1), (1, 1)), (3, 3), (2, 2), (2, 2)),  # strided 1x1 then 3x3
        (((3, 3), (1, 1), (1, 1)), ((1, 1), (1, 1), (1, 1)), (3, 3), (1, 1), (1, 1)),  # 3x3 then 1x1
        (((3, 3), (1, 1), (2, 2)), ((3, 3), (1, 1), (2, 2)), (5, 5), (1, 1), (2, 2)),  # d2 then d2
        (((3, 3), (1, 1), (2, 2)), ((3, 3), (1, 1), (1, 1)), (7, 7), (1, 1), (1, 1)),  # d2 then d1
        (((3, 3), (2, 2), (1, 1)), ((3, 3), (2, 2), (1, 1)), (7, 7), (4, 4), (1, 1)),
        (((1, 3), (1, 1), (1, 1)), ((3, 1), (1, 1), (1, 1)), (3, 3), (1, 1), (1, 1)),
    ],
)
def test_compose_uses_the_structural_tap_lattice(first, second, kernel, stride, dilation):
    rng = np.random.default_rng(6)
    a = make_conv(rng, 2, 3, 1, first[0], first[1], first[2])
    b = make_conv(rng, 3, 2, 1, second[0], second[1], second[2])
    merged = K.compose(a, b)
    assert (merged.kernel_shape, merged.strides, merged.dilations) == (kernel, stride, dilation)
    x = rng.standard_normal((1, 2, 17, 18))
    assert_close(torch_conv(x, merged), torch_conv(torch_conv(x, a), b))


def test_compose_groups_are_recovered():
    rng = np.random.default_rng(7)
    expand = make_conv(rng, 4, 8, 1, (1, 1))
    depthwise = make_conv(rng, 8, 8, 8, (3, 3))
    dw_multiplier = make_conv(rng, 8, 16, 8, (3, 3))
    assert K.compose(depthwise, depthwise).group == 8
    assert K.compose(depthwise, dw_multiplier).group == 8
    assert K.compose(expand, depthwise).group == 1
    grouped = make_conv(rng, 8, 8, 2, (1, 1))
    assert K.compose(depthwise, grouped).group == 2  # expand -> compose -> detect_groups
    x = rng.standard_normal((1, 8, 9, 9))
    assert_close(torch_conv(x, K.compose(depthwise, grouped)), torch_conv(torch_conv(x, depthwise), grouped))


def test_compose_rejects_channel_mismatch():
    rng = np.random.default_rng(8)
    with pytest.raises(K.NotMergeable, match="channels do not chain"):
        K.compose(make_conv(rng, 2, 3, 1, (3, 3)), make_conv(rng, 4, 2, 1, (3, 3)))


def test_compose_rounds_float32_once():
    rng = np.random.default_rng(9)
    a = make_conv(rng, 3, 4, 1, (3, 3), dtype=np.float32)
    b = make_conv(rng, 4, 2, 1, (3, 3), (2, 2), dtype=np.float32)
    merged = K.compose(a, b)
    as64 = [K.ConvParams.create(p.weight.astype(np.float64), p.bias.astype(np.float64), p.strides) for p in (a, b)]
    exact = K.compose(*as64)
    assert merged.weight.dtype == merged.bias.dtype == np.float32
    np.testing.assert_array_equal(merged.weight, exact.weight.astype(np.float32))
    np.testing.assert_array_equal(merged.bias, exact.bias.astype(np.float32))
    half = K.compose(*[K.ConvParams.create(p.weight.astype(np.float16), p.bias.astype(np.float16)) for p in (a, b)])
    assert half.weight.dtype == np.float16


def test_border_correction_is_zero_without_first_bias():
    rng = np.random.default_rng(10)
    first = make_conv(rng, 2, 3, 1, (1, 1))
    first.bias[:] = 0
    second = make_conv(rng, 3, 2, 1, (3, 3), pads=(1, 1, 1, 1))
    assert not np.any(K.border_correction(first, second, (6, 7)))
    assert K.border_correction(first, second, (6, 7)).shape == (1, 2, 6, 7)


# ---------------------------------------------------------------- merge_parallel


@st.composite
def parallel_branches(draw):
    """Branches that share stride and per-axis output size pb + pe - E (spans in {-1, 0, 1})."""
    rank = draw(st.sampled_from((1, 2, 2, 3)))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    spans = [draw(st.integers(-1, 1)) for _ in range(rank)]
    c_in, c_out = draw(st.sampled_from([(2, 2), (4, 4), (4, 2), (3, 3), (2, 4)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    branches = []
    for _ in range(draw(st.integers(1, 4))):
        kernel, dilations, pads_b, pads_e = [], [], [], []
        for span in spans:
            k, d = draw(st.integers(1, 3 if rank == 3 else 4)), draw(st.integers(1, 2))
            total = span + d * (k - 1) + 1  # pb + pe
            pb = draw(st.integers(0, total))
            kernel.append(k), dilations.append(d), pads_b.append(pb), pads_e.append(total - pb)
        group = draw(st.sampled_from([g for g in (1, 2, 3, 4) if c_in % g == 0 and c_out % g == 0]))
        branches.append(make_conv(rng, c_in, c_out, group, kernel, strides, dilations, pads_b + pads_e))
    if c_in == c_out and set(strides) == {1} and set(spans) == {-1} and draw(st.booleans()):
        branches.append(K.identity_params(c_in, (draw(st.sampled_from((1, 3))),) * rank, np.float64))
    sizes = tuple(smallest_input(branches[:1], a) + draw(st.integers(0, 3)) for a in range(rank))
    return branches, sizes


@SETTINGS
@given(case=parallel_branches())
def test_merge_parallel_equals_sum_of_branches(case):
    branches, sizes = case
    merged = K.merge_parallel(branches)
    x = np.random.default_rng(11).standard_normal((2, branches[0].in_channels, *sizes))
    assert_close(torch_conv(x, merged), sum(torch_conv(x, b) for b in branches))


def branch(rng, c, kernel, pads, group=1, dilations=None, stride=None):
    return make_conv(rng, c, c, group, kernel, stride, dilations, pads)


def check_merge(branches, kernel, pads, dilations=None, group=None):
    merged = K.merge_parallel(branches)
    assert merged.kernel_shape == kernel and merged.pads == pads
    if dilations is not None:
        assert merged.dilations == dilations
    if group is not None:
        assert merged.group == group
    x = np.random.default_rng(12).standard_normal((2, branches[0].in_channels, 9, 10))
    assert_close(torch_conv(x, merged), sum(torch_conv(x, b) for b in branches))
    return merged


def test_merge_parallel_repvgg_with_batchnorm():
    rng = np.random.default_rng(13)
    c = 4

    def with_bn(p):
        gamma, beta, mean = rng.standard_normal((3, c))
        var = rng.uniform(0.5, 2.0, c)
        return K.affine_after_conv(p, *K.bn_scale_shift(gamma, beta, mean, var, 1e-5))

    dense3 = with_bn(branch(rng, c, (3, 3), (1, 1, 1, 1)))
    dense1 = with_bn(branch(rng, c, (1, 1), (0, 0, 0, 0)))
    ident = with_bn(K.identity_params(c, (3, 3), np.float64))
    check_merge([dense3, dense1, ident], (3, 3), (1, 1, 1, 1), group=1)


def test_merge_parallel_acnet():
    rng = np.random.default_rng(14)
    parts = [branch(rng, 3, (3, 3), (1, 1, 1, 1)), branch(rng, 3, (1, 3), (0, 1, 0, 1)), branch(rng, 3, (3, 1), (1, 0, 1, 0))]
    check_merge(parts, (3, 3), (1, 1, 1, 1))


def test_merge_parallel_mixed_groups():
    rng = np.random.default_rng(15)
    depthwise = branch(rng, 4, (3, 3), (1, 1, 1, 1), group=4)
    check_merge([depthwise, K.identity_params(4, (1, 1), np.float64)], (3, 3), (1, 1, 1, 1), group=4)
    check_merge([depthwise, K.identity_params(4, (3, 3), np.float64, group=2)], (3, 3), (1, 1, 1, 1), group=4)
    check_merge([depthwise, branch(rng, 4, (1, 1), (0, 0, 0, 0), group=2)], (3, 3), (1, 1, 1, 1), group=2)
    check_merge([depthwise, branch(rng, 4, (1, 1), (0, 0, 0, 0))], (3, 3), (1, 1, 1, 1), group=1)


def test_merge_parallel_dilated():
    rng = np.random.default_rng(16)
    dilated = branch(rng, 2, (3, 3), (2, 2, 2, 2), dilations=(2, 2))
    check_merge([dilated, branch(rng, 2, (1, 1), (0, 0, 0, 0))], (3, 3), (2, 2, 2, 2), dilations=(2, 2))
    # Taps at -2, 0, 2 and -1, 0, 1 only share the unit lattice: exact, but a 5x5.
    check_merge([dilated, branch(rng, 2, (3, 3), (1, 1, 1, 1))], (5, 5), (2, 2, 2, 2), dilations=(1, 1))


def test_merge_parallel_places_even_kernels_where_their_taps_fall():
    rng = np.random.default_rng(17)
    # A 2x2 with pads (1, 0) reads offsets -1, 0: it fits a 3x3 pad 1 off-centre, exactly.
    check_merge([branch(rng, 2, (3, 3), (1, 1, 1, 1)), branch(rng, 2, (2, 2), (1, 1, 0, 0))], (3, 3), (1, 1, 1, 1))


def test_merge_parallel_union_of_off_centre_taps_can_exceed_every_branch():
    rng = np.random.default_rng(26)
    # Taps 0..2 and -2..0 with equal output sizes: exact, but on a 5-wide kernel.
    check_merge([branch(rng, 2, (3, 3), (0, 0, 2, 2)), branch(rng, 2, (3, 3), (2, 2, 0, 0))], (5, 5), (2, 2, 2, 2))


def test_merge_parallel_strided():
    rng = np.random.default_rng(18)
    check_merge(
        [branch(rng, 2, (3, 3), (1, 1, 1, 1), stride=(2, 2)), branch(rng, 2, (1, 1), (0, 0, 0, 0), stride=(2, 2))],
        (3, 3),
        (1, 1, 1, 1),
    )


@pytest.mark.parametrize(
    ("second", "reason"),
    [
        (dict(kernel=(1, 1), pads=(0, 0, 0, 0), stride=(2, 2)), "strides differ"),
        (dict(kernel=(3, 3), pads=(0, 0, 0, 0)), "padding does not align on spatial axis 0"),
        (dict(kernel=(3, 3), pads=(1, 0, 1, 1)), "padding does not align on spatial axis 1"),
        (dict(kernel=(2, 2), pads=(1, 1, 1, 1)), "odd amount"),
        (dict(kernel=(2, 2), pads=(0, 0, 0, 0)), "odd amount"),
    ],
)
def test_merge_parallel_decline_reasons(second, reason):
    rng = np.random.default_rng(19)
    with pytest.raises(K.NotMergeable, match=reason):
        K.merge_parallel([branch(rng, 2, (3, 3), (1, 1, 1, 1)), branch(rng, 2, **second)])


def test_merge_parallel_rejects_channel_mismatch():
    rng = np.random.default_rng(20)
    with pytest.raises(K.NotMergeable, match="channels differ"):
        K.merge_parallel([make_conv(rng, 2, 2, 1, (1, 1)), make_conv(rng, 2, 3, 1, (1, 1))])


# ---------------------------------------------------------------- groups, padding, identity


@SETTINGS
@given(
    g=st.sampled_from((1, 2, 3, 6)),
    m_per=st.integers(1, 3),
    kernel=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_detect_groups_round_trip(g, m_per, kernel, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((g * m_per, 6 // g, *kernel))  # C = 6, never an exact zero
    dense = K.expand_groups(weight, g)
    assert dense.shape == (g * m_per, 6, *kernel)
    found, found_g = K.detect_groups(dense)
    assert found_g == g
    np.testing.assert_array_equal(found, weight)


def test_detect_groups_recovers_depthwise_and_stops_at_nonzeros():
    rng = np.random.default_rng(21)
    depthwise = rng.standard_normal((5, 1, 3, 3))
    assert K.detect_groups(K.expand_groups(depthwise, 5))[1] == 5
    multiplier = rng.standard_normal((10, 1, 3, 3))  # depthwise with 2 outputs per channel
    assert K.detect_groups(K.expand_groups(multiplier, 5))[1] == 5
    dense = K.expand_groups(rng.standard_normal((4, 2, 1, 1)), 2)
    dense[0, 3, 0, 0] = 1e-30  # tiny is not zero
    assert K.detect_groups(dense)[1] == 1


@SETTINGS
@given(m=st.sampled_from((1, 2, 4, 6, 12)), c=st.sampled_from((1, 2, 3, 6, 12)), density=st.floats(0, 1),
       seed=st.integers(0, 2**32 - 1))
def test_detect_groups_against_brute_force(m, c, density, seed):
    # Sparse weights, zeros anywhere (the corners included): the largest g whose off-diagonal
    # blocks are all zero, found by trying every g.
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((m, c, 2)) * (rng.random((m, c, 1)) < density)
    expected = max(g for g in range(1, math.gcd(m, c) + 1) if math.gcd(m, c) % g == 0 and
                   all(not dense[i, j].any() for i in range(m) for j in range(c) if i * g // m != j * g // c))
    found, g = K.detect_groups(dense)
    assert g == expected
    np.testing.assert_array_equal(K.expand_groups(found, g), dense)


def test_pad_kernel():
    w = np.arange(6.0).reshape(1, 2, 1, 3)
    padded = K.pad_kernel(w, (3, 5))
    assert padded.shape == (1, 2, 3, 5)
    np.testing.assert_array_equal(padded[:, :, 1, 1:4], w[:, :, 0])
    assert padded.sum() == w.sum()
    with pytest.raises(K.NotMergeable, match="odd difference"):
        K.pad_kernel(w, (2, 3))
    with pytest.raises(K.NotMergeable, match="larger"):
        K.pad_kernel(w, (1, 1))


@pytest.mark.parametrize("kernel", [(1,), (3,), (3, 3), (5, 3), (3, 1, 3)])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_identity_params_is_identity(kernel, group):
    p = K.identity_params(4, kernel, np.float32, group)
    assert p.weight.dtype == np.float32 and p.group == group
    x = np.random.default_rng(22).standard_normal((2, 4, *[7] * len(kernel)))
    np.testing.assert_array_equal(torch_conv(x, p), x)


def test_identity_params_rejects_even_kernels():
    with pytest.raises(K.NotMergeable, match="odd"):
        K.identity_params(4, (2, 3), np.float32)


# ---------------------------------------------------------------- affine folds


@SETTINGS
@given(rank=st.sampled_from((1, 2, 3)), g=st.sampled_from((1, 2)), seed=st.integers(0, 2**32 - 1))
def test_affine_after_conv_and_scale_before_conv(rank, g, seed):
    """A padded, strided conv: the scale before it is exact even with padding."""
    rng = np.random.default_rng(seed)
    p = make_conv(rng, 2 * g, 3 * g, g, (3,) * rank, (2,) * rank, None, (1,) * (2 * rank))
    x = rng.standard_normal((2, p.in_channels, *[6] * rank))
    scale, shift = rng.standard_normal((2, p.out_channels))
    view = (1, -1, *[1] * rank)
    after = K.affine_after_conv(p, scale, shift)
    assert_close(torch_conv(x, after), torch_conv(x, p) * scale.reshape(view) + shift.reshape(view))
    in_scale = rng.standard_normal(p.in_channels)
    before = K.affine_before_conv(p, in_scale, 0.0)
    assert_close(torch_conv(x, before), torch_conv(x * in_scale.reshape(view), p))
    scalar = K.affine_after_conv(p, 2.0, 0.5)
    assert_close(torch_conv(x, scalar), 2.0 * torch_conv(x, p) + 0.5)


def test_batchnorm_fold_matches_torch_eval():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False).double()
    bn = torch.nn.BatchNorm2d(6, eps=1e-3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    bn.eval()
    p = K.ConvParams.create(conv.weight.detach().numpy(), None, (2, 2), None, (1, 1, 1, 1), group=2)
    scale, shift = K.bn_scale_shift(*(t.detach().numpy() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)), bn.eps)
    folded = K.affine_after_conv(p, scale, shift)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(conv(x)).numpy()
    assert_close(torch_conv(x.numpy(), folded), expected)


def test_bn_scale_shift_keeps_float32():
    ones = np.ones(3, np.float32)
    scale, shift = K.bn_scale_shift(ones, ones, ones, ones, 1e-5)
    assert scale.dtype == shift.dtype == np.float32


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_affine_after_conv_transpose_matches_torch(group, with_bias):
    rng = np.random.default_rng(23)
    c_in, m = 4, 8
    weight = rng.standard_normal((c_in, m // group, 3, 2))
    bias = rng.standard_normal(m) if with_bias else None
    scale, shift = rng.standard_normal((2, m))
    new_w, new_b = K.affine_after_conv_transpose(weight, bias, scale, shift, group)
    x = torch.from_numpy(rng.standard_normal((2, c_in, 5, 4)))

    def deconv(w, b):
        b = None if b is None else torch.from_numpy(b)
        return F.conv_transpose2d(x, torch.from_numpy(w), b, stride=2, padding=1, groups=group).numpy()

    assert_close(deconv(new_w, new_b), deconv(weight, bias) * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("bias_shape", [None, (5,), (1, 5), ()])
def test_affine_after_gemm(trans_b, bias_shape):
    rng = np.random.default_rng(24)
    b_matrix = rng.standard_normal((5, 3) if trans_b else (3, 5)).astype(np.float32)
    bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(np.float32)
    scale, shift = rng.standard_normal((2, 5))
    new_b, new_bias = K.affine_after_gemm(b_matrix, bias, scale, shift, trans_b)
    assert new_b.dtype == new_bias.dtype == np.float32
    x = rng.standard_normal((4, 3))
    dense = b_matrix.T if trans_b else b_matrix
    expected = (x @ dense + (0 if bias is None else bias)) * scale + shift
    got = x @ (new_b.T if trans_b else new_b) + new_bias
    assert_close(got, expected, rel=1e-6)


@pytest.mark.parametrize("b1", [None, "vector", "scalar"])
@pytest.mark.parametrize("b2", [None, "vector"])
def test_compose_matmul(b1, b2):
    rng = np.random.default_rng(25)
    w1, w2 = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    bias1 = {None: None, "vector": rng.standard_normal(4), "scalar": np.float64(0.7)}[b1]
    bias2 = None if b2 is None else rng.standard_normal(2)
    w, b = K.compose_matmul(w1, bias1, w2, bias2)
    assert (b is None) == (b1 is None and b2 is None)
    x = rng.standard_normal((5, 3))
    expected = (x @ w1 + (0 if bias1 is None else bias1)) @ w2 + (0 if bias2 is None else bias2)
    assert_close(x @ w + (0 if b is None else b), expected)
    with pytest.raises(K.NotMergeable):
        K.compose_matmul(w1, None, w1, None)


# ---------------------------------------------------------------- ConvParams


def test_conv_params_defaults_and_properties():
    p = K.ConvParams.create(np.zeros((6, 2, 3, 1), np.float32), group=3, dilations=(2, 1))
    assert p.bias.dtype == np.float32 and p.bias.shape == (6,)
    assert (p.strides, p.pads, p.rank) == ((1, 1), (0, 0, 0, 0), 2)
    assert (p.out_channels, p.in_channels, p.kernel_shape, p.extent) == (6, 6, (3, 1), (5, 1))
    assert not p.is_pointwise and K.ConvParams.create(np.zeros((1, 1, 1))).is_pointwise


@pytest.mark.parametrize(
    "kwargs",
    [dict(strides=(1,)), dict(pads=(0, 0)), dict(group=4), dict(bias=np.zeros(5)), dict(dilations=(0, 1))],
)
def test_conv_params_validates(kwargs):
    with pytest.raises(ValueError):
        K.ConvParams.create(np.zeros((6, 2, 3, 3)), **kwargs)


@SETTINGS
@given(rank=st.integers(1, 3), groups=st.sampled_from([1, 2, 6]), kernel=st.integers(1, 3),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), pad=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_affine_before_conv_matches_torch(rank, groups, kernel, stride, dilation, pad, seed):
    """conv(s*x + t) == conv'(x): the scale for any padding, the shift on an unpadded conv; a
    grouped or depthwise conv scales input channel c in group c // (C/g)."""
    rng = np.random.default_rng(seed)
    p = make_conv(rng, 6, 6 if groups == 6 else 4, groups, (kernel,) * rank, (stride,) * rank,
                  (dilation,) * rank, (pad,) * (2 * rank))
    x = rng.standard_normal((2, 6, *(7,) * rank))
    scale = rng.uniform(-2, 2, 6)
    shift = rng.standard_normal(6) if pad == 0 else np.zeros(6)
    shaped = (1, 6) + (1,) * rank
    expected = torch_conv(x * scale.reshape(shaped) + shift.reshape(shaped), p)
    assert_close(torch_conv(x, K.affine_before_conv(p, scale, shift)), expected)


def test_affine_before_conv_shift_leaks_into_a_padded_border():
    """Why the pass declines a shift into a padded conv: only the border differs."""
    rng = np.random.default_rng(0)
    p = make_conv(rng, 3, 4, 1, (3, 3), pads=(1, 1, 1, 1))
    x, shift = rng.standard_normal((1, 3, 6, 6)), rng.standard_normal(3)
    diff = torch_conv(x + shift.reshape(1, 3, 1, 1), p) - torch_conv(x, K.affine_before_conv(p, 1.0, shift))
    assert np.abs(diff[..., 1:-1, 1:-1]).max() < 1e-10
    assert np.abs(diff[..., 0, :]).max() > 1e-3


def test_affine_before_conv_declines_float16_overflow():
    p = K.ConvParams.create(np.full((2, 2, 1, 1), 1000.0, np.float16), np.zeros(2, np.float16))
    with pytest.raises(K.NotMergeable, match="overflow float16"):
        K.affine_before_conv(p, np.array([100.0, 1.0]), 0.0)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_affine_before_gemm(trans_b, with_bias):
    rng = np.random.default_rng(3)
    b_matrix = rng.standard_normal((5, 4))  # [K, N]
    bias = rng.standard_normal(4) if with_bias else None
    scale, shift, x = rng.uniform(-2, 2, 5), rng.standard_normal(5), rng.standard_normal((3, 5))
    new_b, new_bias = K.affine_before_gemm(b_matrix.T if trans_b else b_matrix, bias, scale, shift, trans_b)
    matrix = new_b.T if trans_b else new_b
    expected = (x * scale + shift) @ b_matrix + (0 if bias is None else bias)
    assert_close(x @ matrix + new_bias, expected)
    # A scale alone into a bias-free matrix needs no bias.
    assert K.affine_before_gemm(b_matrix, None, scale, 0.0, False)[1] is None
