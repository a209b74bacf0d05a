"""A few training steps with Layer Folding, then export, graphfold, and onnxruntime on the test set."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
graphfold = pytest.importorskip("graphfold")

from graphfold.train import (  # noqa: E402
    clip_slopes,
    evaluate,
    export_onnx,
    fit,
    load_digits_split,
    relocate_padding,
    slope_regularizer,
    snap_slopes,
)
from models.mobilenetv2 import mobilenetv2_small  # noqa: E402

TINY = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2))


def test_train_snap_relocate_export_fold_validate():
    torch.manual_seed(0)
    data = load_digits_split(size=16)
    x, y = data.x_train[:512], data.y_train[:512]
    model = mobilenetv2_small(activation="folding", setting=TINY, stem_channels=8, head_channels=32)
    for act in (m for m in model.modules() if hasattr(m, "slope")):
        act.slope.data.fill_(0.5)
    fit(model, x, y, epochs=3, lr=0.1, penalty=lambda m: slope_regularizer(m, 1.0),
        after_step=lambda: clip_slopes(model), progress=False)
    modes = snap_slopes(model, threshold=0.5)
    assert "identity" in modes.values()
    relocate_padding(model, x[:1])
    fit(model, x, y, epochs=2, lr=0.05, progress=False)

    exported = export_onnx(model, None, data.input_shape, keep_batchnorm=True)
    folded, report = graphfold.fold(exported)
    assert report.validation is not None and report.validation.passed
    assert report.after["convs"] < report.before["convs"]
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data.x_test.numpy()})[0]
    model.eval()
    expected = model(data.x_test).detach().numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-4)
    onnx_accuracy = 100.0 * float((logits.argmax(1) == data.y_test.numpy()).mean())
    assert onnx_accuracy == pytest.approx(evaluate(model, data.x_test, data.y_test), abs=0.5)
    assert onnx_accuracy > 50.0  # it learned something in five epochs on 512 images
