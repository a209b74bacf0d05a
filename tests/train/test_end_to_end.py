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
    folding_activations,
    load_digits_split,
    relocate_padding,
    slope_regularizer,
)
from graphfold.train.compress import snap_to  # noqa: E402
from models.mobilenetv2 import mobilenetv2_small  # noqa: E402

TINY = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2))


def test_train_snap_relocate_export_fold_validate():
    torch.manual_seed(0)
    data = load_digits_split(size=16)
    x, y = data.x_train[:512], data.y_train[:512]
    model = mobilenetv2_small(activation="folding", setting=TINY, stem_channels=8, head_channels=32)
    fit(model, x, y, epochs=3, lr=0.1, penalty=lambda m: slope_regularizer(m, 1.0),
        after_step=lambda: clip_slopes(model), progress=False)
    # Slopes start at 0 (the paper's init, a plain ReLU); training must have moved them.
    slopes = {name: float(act.slope.detach().max()) for name, act in folding_activations(model)}
    assert max(slopes.values()) > 0.05
    # The most linear half become identities: a count fixed here, not a threshold they all pass.
    ranked = sorted(slopes, key=slopes.__getitem__, reverse=True)
    snap_to(model, ranked[:len(ranked) // 2])
    assert sum(act.is_identity for _, act in folding_activations(model)) == len(ranked) // 2
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
    assert onnx_accuracy > 20.0  # twice chance: it learned something in five epochs on 512 images
