"""Why the onnx runner turns off onnxruntime's ``SkipLayerNormFusion``: one residual ``Add`` +
``LayerNormalization`` (BERT's post-norm, hidden 384) run by onnxruntime as it fuses it
(``com.microsoft::SkipLayerNormalization``) and with the fusion off (the two ops), side by side in
one process, one thread. ``extra_info``: ``unfused_speedup_vs_fused`` (> 1: the unfused pair is faster) and
each one's max error against float64.

Run::

    python -m pytest benchmarks/test_onnx_skip_layernorm.py --benchmark-only --benchmark-group-by=group
"""
import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="needs the 'onnx' extra: pip install 'qcompile[onnx]'")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qcompile.backends.onnx.runtime import DISABLED_OPTIMIZERS  # noqa: E402

HIDDEN = 384
SHAPES = [(1, 128), (32, 128)]


def _add_layer_norm(rng):
    gamma = rng.random(HIDDEN, dtype=np.float32) + 0.5
    beta = rng.random(HIDDEN, dtype=np.float32)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "sequence", HIDDEN]) for n in "xy"]
    nodes = [helper.make_node("Add", ["x", "y"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["z"], axis=-1, epsilon=1e-12)]
    graph = helper.make_graph(nodes, "add_layer_norm", inputs, [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(beta, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), gamma, beta


def _session(model, disabled):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))


@pytest.fixture(scope="module")
def medians():
    return {}


@pytest.mark.parametrize("shape", SHAPES, ids=[f"b{b}-s{s}" for b, s in SHAPES])
@pytest.mark.parametrize("variant", ["fused", "unfused"])
def test_add_layer_norm(benchmark, medians, shape, variant):
    rng = np.random.default_rng(0)
    model, gamma, beta = _add_layer_norm(rng)
    feed = {n: rng.standard_normal((*shape, HIDDEN), dtype=np.float32) for n in "xy"}
    sess = _session(model, DISABLED_OPTIMIZERS if variant == "unfused" else ())
    s = feed["x"].astype(np.float64) + feed["y"]
    ref = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-12) * gamma + beta
    err = float(np.abs(sess.run(None, feed)[0] - ref).max())
    benchmark.group = f"add-layernorm-b{shape[0]}-s{shape[1]}"
    benchmark.pedantic(lambda: sess.run(None, feed), rounds=50, warmup_rounds=5, iterations=1)
    medians[(shape, variant)] = benchmark.stats.stats.median
    benchmark.extra_info.update({"variant": variant, "max_error_vs_float64": err, "onnxruntime": ort.__version__})
    if (shape, "fused") in medians and (shape, "unfused") in medians:  # on whichever ran second
        benchmark.extra_info["unfused_speedup_vs_fused"] = round(medians[(shape, "fused")] / medians[(shape, "unfused")], 2)
    assert err < 1e-4
