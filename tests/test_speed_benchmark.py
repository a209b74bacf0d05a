"""tools/speed_benchmark.py's whole-program runs: what a fresh process reports, how the table
reads, and that its markdown section leaves the rest of the page alone."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import speed_benchmark as speed  # noqa: E402

SAMPLE = os.path.join(REPO, "models", "repvgg_small.onnx")


def test_fresh_process_reports_its_own_time_and_memory(tmp_path):
    out = tmp_path / "out.onnx"
    run = speed.run_program("graphfold-no-check", SAMPLE, str(out))
    assert run.error is None and out.exists()
    assert run.wall > 0 and run.cpu > 0
    # Its own high-water mark: python with onnx and numpy loaded, not this test process's.
    assert 20 < run.peak_rss_mb < 2000


def test_a_failing_tool_reports_its_last_error_line(tmp_path):
    run = speed.run_program("load+save", str(tmp_path / "missing.onnx"), str(tmp_path / "out.onnx"))
    assert run.error is not None and "missing.onnx" in run.error


def test_rows_give_ratios_to_load_save_and_failures_in_one_cell():
    runs = {"load+save": [speed.ProcessRun(2.0, 1.0, 100.0), speed.ProcessRun(1.0, 0.5, 110.0)],
            "graphfold": [speed.ProcessRun(1.5, 0.8, 200.0), speed.ProcessRun(3.0, 0.9, 220.0)],
            "onnxsim": [speed.ProcessRun(error="ModuleNotFoundError: No module named 'onnxsim'")]}
    rows = speed.program_rows(runs)
    assert rows[0][1:] == ["1.00", "1.50", "1.00", "0.50", "110", "1.00"]
    assert rows[1][1:] == ["1.50", "2.25", "1.50", "0.80", "220", "2.00"]
    assert rows[2] == ["onnxsim", "FAILED: ModuleNotFoundError: No module named 'onnxsim'"]


@pytest.mark.parametrize("existing", ["", "# Page\n\nintro\n", "# Page\n\n{section}\n\n## Later\n"])
def test_markdown_section_replaces_only_itself(tmp_path, existing):
    page = tmp_path / "benchmarks.md"
    old = "\n".join([speed.MARK_BEGIN, "old table", speed.MARK_END])
    page.write_text(existing.format(section=old))
    speed.write_section(str(page), [speed.MARK_BEGIN, "new table", speed.MARK_END])
    text = page.read_text()
    assert "new table" in text and "old table" not in text
    assert text.count(speed.MARK_BEGIN) == 1
    for kept in ("intro", "## Later"):
        assert (kept in text) == (kept in existing)


def test_a_new_section_goes_where_peer_benchmark_keeps_it(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Page\n\n" + speed.KEPT[0] + "\n\nkept text\n\n" + speed.KEPT[1] + "\n\n## Later\n")
    speed.write_section(str(page), [speed.MARK_BEGIN, "new table", speed.MARK_END])
    text = page.read_text()
    assert text.index("kept text") < text.index("new table") < text.index(speed.KEPT[1]) < text.index("## Later")
    page.write_text("# Page\n")
    speed.write_section(str(page), [speed.MARK_BEGIN, "new table", speed.MARK_END])
    text = page.read_text()
    assert text.index(speed.KEPT[0]) < text.index("new table") < text.index(speed.KEPT[1])


def test_graphfold_comes_from_the_repo_asked_for(tmp_path):
    """A baseline checkout must not be shadowed by the one the benchmark is started from."""
    fake = tmp_path / "fake" / "graphfold"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cli.py").write_text("import sys\ndef main(argv=None):\n    sys.exit('fake graphfold ran')\n")
    run = speed.run_program("graphfold-no-check", SAMPLE, str(tmp_path / "out.onnx"), repo=str(tmp_path / "fake"))
    assert run.error == "fake graphfold ran"


def test_a_run_of_one_case_keeps_the_other_cases_tables(tmp_path):
    page = tmp_path / "benchmarks.md"
    first = [speed.MARK_BEGIN, "## Title", "", "intro", "", "### repvgg-40MB: 36 MiB", "", "table 40", "",
             "### repvgg-400MB: 385 MiB", "", "table 400 old", "", speed.MARK_END]
    speed.write_section(str(page), first)
    speed.write_section(str(page), [speed.MARK_BEGIN, "## Title", "", "intro", "", "### repvgg-400MB: 385 MiB", "",
                                    "table 400 new", "", speed.MARK_END])
    text = page.read_text()
    assert "table 40\n" in text and "table 400 new" in text and "table 400 old" not in text
    assert text.index("repvgg-40MB") < text.index("repvgg-400MB")
