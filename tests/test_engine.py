"""The pass engine: a failing check is an error when strict, a logged decline otherwise; checks
leave their matches as they found them; a rewrite that changes nothing is a bug."""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from graphfold.engine import Change, Exact, FoldContext, FoldOptions, Match, Pass, PassError, run_pipeline
from graphfold.passes import DEFAULT_PIPELINE
from graphfold.shapes import infer_static
from tests.util import Net


class Failing(Pass):
    name = "failing-check"

    def match(self, ctx):
        yield from (Match((node,)) for node in ctx.graph.nodes)

    def check(self, ctx, match):
        raise ZeroDivisionError("a bug in check")


class Idle(Failing):
    name = "idle-rewrite"

    def check(self, ctx, match):
        return Exact()

    def rewrite(self, ctx, match, decision):
        return Change([], [])


def relu_graph() -> gs.Graph:
    n = Net([1, 2])
    n.op("Relu", ["x"], "y")
    return gs.import_onnx(n.model("y"))


def test_the_test_suite_runs_strict():
    assert FoldOptions().strict


def test_a_failing_check_is_an_error_when_strict():
    with pytest.raises(PassError, match="failing-check.*ZeroDivisionError: a bug in check"):
        run_pipeline(FoldContext(relu_graph(), FoldOptions(strict=True)), [Failing()])


def test_a_failing_check_is_a_logged_decline_otherwise(caplog):
    ctx = FoldContext(relu_graph(), FoldOptions(strict=False))
    with caplog.at_level(logging.WARNING, logger="graphfold.engine"):
        assert run_pipeline(ctx, [Failing()]) == []
    assert [d.reason for d in ctx.declines] == ["could not analyse (ZeroDivisionError: a bug in check)"]
    assert "failing-check: check raised" in caplog.text


def test_a_rewrite_that_changes_nothing_is_an_error():
    with pytest.raises(PassError, match="idle-rewrite.*changed nothing"):
        run_pipeline(FoldContext(relu_graph(), FoldOptions(strict=False)), [Idle()])


def foldable_models():
    """One model with candidates for each pass of the default pipeline."""
    n = Net([1, 4, 8, 8])
    a = n.batchnorm(n.conv("x", "a", 4, 4, 3, pads=[1, 1, 1, 1]), "a.bn", 4)
    s = n.op("Add", [n.op("Add", [a, n.conv("x", "b", 4, 4, 1)], "s0"), "x"], "s")
    r = n.op("Relu", [n.op("Relu", [s], "r0")], "r")
    c = n.conv(n.conv(r, "c1", 4, 8, 1), "c2", 8, 4, 3, pads=[1, 1, 1, 1])
    m = n.op("Mul", [c, n.const("one", np.ones((1, 4, 1, 1), np.float32))], "m")
    k = n.op("Add", [m, n.const("map1", np.full((1, 4, 8, 8), 0.5, np.float32))], "k")
    d = n.conv(k, "d", 4, 4, 3, pads=[1, 1, 1, 1])
    i = n.op("Identity", [n.op("Add", [d, n.const("map2", np.full((1, 4, 8, 8), 0.25, np.float32))], "e")], "i")
    zero = n.conv(i, "zero", 4, 4, 1, bias=False, weight=n.const("zero.w", np.zeros((4, 4, 1, 1), np.float32)))
    y = n.op("Add", [i, zero], "y")
    yield n.model(y)
    dense = Net([3, 4])
    h = dense.op("MatMul", ["x", dense.random("w1", [4, 6])], "h")
    z = dense.op("MatMul", [dense.op("Add", [h, dense.random("b1", [6])], "hb"), dense.random("w2", [6, 2])], "z")
    yield dense.model(z)


@pytest.mark.parametrize("fold_all", [False, True])
def test_checks_leave_matches_as_they_found_them(fold_all):
    checked = set()
    for model in foldable_models():
        ctx = FoldContext(gs.import_onnx(model), FoldOptions(fold_all=fold_all), infer_static(model))
        for fold_pass in (p() for p in DEFAULT_PIPELINE):
            for match in fold_pass.match(ctx):
                before = {k: (v, _snapshot(v)) for k, v in match.data.items()}
                fold_pass.check(ctx, match)
                assert match.data.keys() == before.keys(), fold_pass.name
                for key, (value, snapshot) in before.items():
                    assert match.data[key] is value and _snapshot(value) == snapshot, (fold_pass.name, key)
                checked.add(fold_pass.name)
    assert len(checked) >= 9, checked


def _snapshot(value):
    """What a check could change inside the data a match carries (lists of terms, dataclasses)."""
    if isinstance(value, (list, tuple)):
        return [_snapshot(v) for v in value]
    if hasattr(value, "__dict__"):
        return {k: id(v) for k, v in vars(value).items()}
    return id(value)
