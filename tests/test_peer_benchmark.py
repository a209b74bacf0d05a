"""tools/peer_benchmark.py's handling of a user's folder of models and of a page section
(the measuring itself is the benchmark's job, not a test's)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import onnx

from tests.util import Net

TOOL = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "peer_benchmark.py")
_spec = importlib.util.spec_from_file_location("peer_benchmark", TOOL)
peer = sys.modules.setdefault("peer_benchmark", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(peer)


def test_folder_models_take_shapes_json_over_the_command_line(tmp_path):
    net = Net(["N", 3, "H", "W"])
    model = net.model(net.conv(net.x, "y", 3, 4))
    for name in ("a.onnx", "b.onnx"):
        onnx.save(model, str(tmp_path / name))
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "shapes.json").write_text(json.dumps({"b.onnx": {"x": [2, 3, 16, 8]}}))
    found = peer.model_folders([str(tmp_path)], {"x": [1, 3, 32, 32]})
    assert [(os.path.basename(path), shapes) for path, shapes in found] == [
        ("a.onnx", {"x": [1, 3, 32, 32]}), ("b.onnx", {"x": [2, 3, 16, 8]})]
    assert peer.bench_shapes(model, found[1][1]) == {"x": [2, 3, 16, 8]}
    assert peer.bench_shapes(model) == {"x": [1, 3, 224, 224]}  # the default for symbolic dims


def test_section_is_replaced_and_the_kept_part_survives_a_full_page(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(f"# page\n\n{peer.KEPT[0]}\n## Third-party models\n\nhand-written\n\n{peer.KEPT[1]}\n")
    monkeypatch.setattr(peer, "result_lines", lambda *args, **kw: ["TABLE 1"])
    peer.write_section(str(page), "real", [], [], "cmd 1", [])
    monkeypatch.setattr(peer, "result_lines", lambda *args, **kw: ["TABLE 2"])
    peer.write_section(str(page), "real", [], [], "cmd 2", [])
    text = page.read_text()
    assert text.count("<!-- peer_benchmark:real -->") == 1 and "TABLE 2" in text and "TABLE 1" not in text
    # The section sits outside the kept part here, so a regenerated page drops it but keeps the text.
    peer.write_markdown(str(page), None, [], [], "cmd 3", [], [])
    regenerated = page.read_text()
    assert regenerated.startswith("# Benchmarks") and "hand-written" in regenerated
    assert regenerated.count(peer.KEPT[0]) == 1
