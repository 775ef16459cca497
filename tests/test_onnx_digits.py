"""Issue 4's convolutional acceptance check: a conv-BN-ReLU x2 CNN trained on scikit-learn's digits
(fixed split), quantized w8a8 for the onnx backend, runs in onnxruntime as a fully int8 conv chain
(QLinearConv, no float Conv left in the optimized graph) and keeps test accuracy within 0.5 points
of float; onnxruntime and the reference agree within one quantization step at every quantizer."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import qcompile

pytest.importorskip("sklearn", reason="load_digits needs scikit-learn (the 'dev' extra)")
pytest.importorskip("onnxruntime", reason="the onnx backend needs the 'onnx' extra")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import qat_digits  # noqa: E402
from test_backend_onnx import _optimized_ops  # noqa: E402


def test_digits_cnn_runs_as_an_int8_conv_chain_within_half_a_point():
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = qat_digits.load_data()
    model = qat_digits.train(qat_digits.DigitsCNN(), x_tr, y_tr, epochs=30, lr=3e-3)
    acc_float = qat_digits.accuracy(model, x_te, y_te)
    calib = [(x_tr[i:i + 256],) for i in range(0, len(x_tr), 256)]
    recipe = dataclasses.replace(qcompile.Recipe.preset("w8a8"), calibration=qcompile.CalibrationConfig(progress=False))
    q = qcompile.quantize(model, recipe, (x_tr[:2],), calibration=calib, backend="onnx")
    art = qcompile.lower(q, backend="onnx")
    ops = _optimized_ops(art)
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops and "FusedConv" not in ops, ops
    acc_onnx = qat_digits.accuracy(lambda t: art(t), x_te, y_te)
    print(f"digits: float {acc_float:.2f} %, onnxruntime int8 {acc_onnx:.2f} %")
    assert acc_float >= 98.0
    assert acc_float - acc_onnx <= 0.5
    parity = qcompile.verify(art, q, [(x_te[:128],), (x_te[128:],)])
    assert parity.passed, str(parity)
