"""The readable summary: statistics table that never overflows, file sizes, declines grouped by reason."""
from __future__ import annotations

import os

from graphfold import cli
from graphfold.engine import Decline
from graphfold.report import Report

SAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "models", "resnet_bn.onnx")
COLUMNS = 8 + 14 + 14 + 10


def test_table_columns_hold_huge_changes():
    # Constant-folded weights can grow the parameter count a million times (ConstantOfShape fills).
    report = Report(before={"nodes": 415, "params": 36, "macs": None}, after={"nodes": 123, "params": 6_440_000})
    rows = {line.split()[0]: line for line in report.table().splitlines()[1:]}
    assert rows["params"].split() == ["params", "36", "6.44M", "x178.89k"]
    assert rows["nodes"].split()[-1] == "-70.4%"
    assert rows["MACs"].split()[1:] == ["?", "?"]
    assert all(len(line) <= COLUMNS for line in report.table().splitlines())


def test_table_shows_file_sizes_when_known():
    report = Report(before={"file_bytes": 2_500_000}, after={"file_bytes": 1_200})
    assert report.table().splitlines()[-1].split() == ["file", "2.50", "MB", "1.20", "kB", "-100.0%"]
    assert "file" not in Report(before={}, after={}).table()


def test_declines_grouped_by_reason_with_a_count_and_three_names():
    declines = [Decline("merge-parallel-branches", [f"add{i}", f"conv{i}"], "branches read different tensors")
                for i in range(16)] + [Decline("fold-affine", ["mul"], "scale is not per-channel")]
    report = Report(before={}, after={}, declines=declines)
    lines = report.decline_lines()
    assert lines[0].split()[:2] == ["merge-parallel-branches", "16"]
    assert lines[0].endswith("branches read different tensors: add0, add1, add2, ...")
    assert lines[1].split()[:2] == ["fold-affine", "1"] and lines[1].endswith(": mul")
    summary = report.summary()
    assert summary.count("branches read different tensors") == 1


def test_reasons_differing_only_in_a_quoted_name_group_together():
    declines = [Decline("fold-affine", [f"add{i}"], f"intermediate 'conv{i}' is used by 2 nodes") for i in range(5)]
    report = Report(before={}, after={}, declines=declines + [Decline("fold-affine", ["mul"], "other 'x'")])
    lines = report.decline_lines()
    assert len(lines) == 2
    assert lines[0].split()[:2] == ["fold-affine", "5"]
    assert lines[0].endswith("intermediate '...' is used by 2 nodes: add0, add1, add2, ...")
    assert lines[1].endswith("other 'x': mul")  # a group of one keeps its name


def test_cli_summary_on_the_sample(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert cli.main([SAMPLE, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    [file_row] = [line for line in text.splitlines() if line.startswith("file")]
    assert file_row.split()[1:3] == [f"{os.path.getsize(SAMPLE) / 1e3:.2f}", "kB"]
    assert file_row.split()[3:5] == [f"{os.path.getsize(out) / 1e3:.2f}", "kB"]
    assert "fold-constants" not in text  # the sample has no constant to fold: no row, not "1"
