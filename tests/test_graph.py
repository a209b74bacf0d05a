"""graph.broadcast_keeps_shape: the one answer to "does this constant leave the tensor's shape alone"."""
from __future__ import annotations

import pytest

from graphfold.graph import broadcast_keeps_shape


@pytest.mark.parametrize("shape, value, kept", [
    ((2, 4, 8, 8), (), True),               # a scalar never changes a shape
    (None, (), True),                       # ... even an unknown one
    (None, (1,), False),                    # a [1] grows a rank-0 tensor, and the rank is unknown
    ((), (1,), False),
    ((2, 4, 8, 8), (4, 1, 1), True),        # per-channel
    ((2, 4, 8, 8), (1, 4, 1, 1), True),
    ((2, 4, 8, 8), (2, 4, 8, 8), True),     # a batch dim equal to the static batch
    ((1, 4, 8, 8), (2, 4, 8, 8), False),    # ... larger than the batch grows it
    ((None, 4, 8, 8), (2, 4, 1, 1), False),  # ... or than a symbolic batch, which may be 1
    ((None, 4, 8, 8), (1, 4, 8, 8), True),
    ((None, 4, None, None), (1, 4, 1, 1), True),
    ((None, 4, None, None), (1, 4, 1, 8), False),
    ((2, 4, 8, 8), (1, 1, 4, 8, 8), False),  # a higher rank grows the rank
    ((2, 4, 8, 8), (8,), True),             # along the last axis
    ((2, 4, 8, 1), (8,), False),
    ((2, 0, 8), (1, 1, 1), True),           # an empty tensor stays empty
])
def test_broadcast_keeps_shape(shape, value, kept):
    assert broadcast_keeps_shape(shape, value) is kept
