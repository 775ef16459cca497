"""MiniLM through ONNX, side by side in one process, one thread: the float ONNX model, onnxruntime's
own quantizers applied to it (``quantize_dynamic(per_channel=True)``, and ``quantize_static`` in
QDQ format on the Linear MatMuls with the same calibration text), and qcompile ``w8a8`` lowered to
ONNX (``target="onnxruntime"``), run with the session options qcompile's runner uses
(``DISABLED_OPTIMIZERS``: onnxruntime's SkipLayerNormFusion is slower here). The float and dynamic
rows run twice: with onnxruntime's defaults (what a user of its tool gets) and with those same
options (``*-same-session``: the apples-to-apples comparison); qcompile's file also runs in a plain
default session (``qcompile-w8a8-default-session``: its residual adds are ``Sum`` nodes, so onnxruntime's
slow SkipLayerNormFusion does not apply even there). Rows per batch size (1 and 32,
sequence 128) with, in
``extra_info``: ``speedup_vs_float_onnx``, ``speedup_vs_ort_dynamic`` (> 1: faster than
onnxruntime's tool), embedding quality vs the float model on held-out docstrings (mean cosine,
retrieval recall@1 drop, neighbour agreement) and the file size.

Run::

    python -m pytest benchmarks/test_onnx_vs_onnxruntime.py --benchmark-only \\
        --benchmark-columns=median,min,max --benchmark-group-by=group
"""
import dataclasses
import time

import numpy as np
import pytest
import torch

import qcompile
from qcompile.eval import docstring_pairs, docstring_sentences, embedding_quality
from test_minilm import ROUNDS, SEQUENCE, _calibration_batches, _fixed_inputs, _quiet_w8a8

ort = pytest.importorskip("onnxruntime", reason="needs the 'onnx' extra: pip install 'qcompile[onnx]'")
onnx = pytest.importorskip("onnx")

from qcompile.backends.onnx.runtime import DISABLED_OPTIMIZERS  # noqa: E402

FILES = ["float-onnx", "ort-dynamic", "ort-static", "qcompile-w8a8", "qcompile-w8a8-fold-only"]
# smoothing only where 1/s folds upstream (no Mul left in the graph): the speed end of the trade-off
QCOMPILE = {"qcompile-w8a8": False, "qcompile-w8a8-fold-only": True}
SAME_SESSION = {"float-onnx-same-session": "float-onnx", "ort-dynamic-same-session": "ort-dynamic"}
# qcompile's file in a plain onnxruntime session (no session options: what a user loading the .onnx gets)
DEFAULT_SESSION = {"qcompile-w8a8-default-session": "qcompile-w8a8"}
IMPLS = FILES + list(SAME_SESSION) + list(DEFAULT_SESSION)


def _session(path, disabled_optimizers=()):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


class _Reader:
    """onnxruntime's CalibrationDataReader over the calibration batches qcompile uses."""

    def __init__(self, batches):
        self.items = iter([{"input_ids": i.numpy(), "attention_mask": m.numpy()} for i, m in batches])

    def get_next(self):
        return next(self.items, None)


def _build(minilm, calibration_batches, workdir):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    paths = {name: workdir / f"{name}.onnx" for name in FILES}
    ids, mask = _fixed_inputs(minilm, 2)
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.onnx.export(minilm.model, (ids, mask), dynamo=True, verbose=False, optimize=True,
                                dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
    program.save(str(paths["float-onnx"]))
    quantize_dynamic(str(paths["float-onnx"]), str(paths["ort-dynamic"]), per_channel=True, weight_type=QuantType.QInt8)
    model = onnx.load(str(paths["float-onnx"]))
    weights = {i.name for i in model.graph.initializer}
    linears = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    quantize_static(str(paths["float-onnx"]), str(paths["ort-static"]), _Reader(calibration_batches),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_quantize=linears, calibrate_method=CalibrationMethod.MinMax)
    info = {}
    for name, fold_only in QCOMPILE.items():
        t0 = time.perf_counter()
        recipe = _quiet_w8a8()
        recipe = dataclasses.replace(recipe, smoothing=dataclasses.replace(recipe.smoothing, fold_only=fold_only))
        qmodel = qcompile.quantize(minilm.model, recipe, calibration_batches[0], calibration=calibration_batches,
                                   backend="onnx")
        art = qcompile.lower(qmodel, backend="onnx", threads=1)
        art.save(paths[name])
        if not fold_only:
            info["qcompile_quantize_and_lower_s"] = round(time.perf_counter() - t0, 1)
            parity = qcompile.verify(art, qmodel, calibration_batches[:4])
            info.update(parity_max_steps=parity.max_steps, parity_output_max_rel=parity.output_max_rel,
                        parity_points=len(parity.points),
                        parity_differing_codes=max(p.mismatched for p in parity.points))
    return paths, info


@pytest.fixture(scope="module")
def onnx_models(minilm, tmp_path_factory):
    """{impl: (onnxruntime session, file MB, quality dict)} built once."""
    paths, info = _build(minilm, _calibration_batches(minilm), tmp_path_factory.mktemp("onnx"))
    sessions = {name: _session(p, DISABLED_OPTIMIZERS if name in QCOMPILE else ()) for name, p in paths.items()}
    sessions.update({name: _session(paths[base], DISABLED_OPTIMIZERS) for name, base in SAME_SESSION.items()})
    sessions.update({name: _session(paths[base]) for name, base in DEFAULT_SESSION.items()})

    def encoder(sess):
        def enc(texts):
            ids, mask = minilm.encode_batch(texts)
            return torch.from_numpy(sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
        return enc

    sentences, pairs = docstring_sentences("evaluation", limit=600), docstring_pairs("evaluation", limit=300)
    out = {}
    for name, sess in sessions.items():
        quality = embedding_quality(encoder(sessions["float-onnx"]), encoder(sess), sentences, pairs)
        base = SAME_SESSION.get(name, DEFAULT_SESSION.get(name, name))
        out[name] = (sess, round(paths[base].stat().st_size / 1e6, 2), quality)
    out["info"] = info
    out["interleaved"] = _interleaved(minilm, sessions)
    return out


def _interleaved(minilm, sessions, rounds={1: 40, 32: 5}):
    """Medians (ms) with the implementations taking turns round by round: on a shared machine a
    load change then hits every row alike (pytest-benchmark times one row after the other)."""
    medians = {}
    for batch, n in rounds.items():
        ids, mask = _fixed_inputs(minilm, batch)
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        times = {name: [] for name in sessions}
        for _ in range(n + 1):  # the first round warms up
            for name, sess in sessions.items():
                t = time.perf_counter()
                sess.run(None, feed)
                times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            medians[(batch, name)] = 1e3 * float(np.median(ts[1:]))
    return medians


CASES = [(b, impl) for b in (1, 32) for impl in IMPLS]


@pytest.mark.parametrize("batch,impl", CASES, ids=[f"b{b}-s{SEQUENCE}-{i}" for b, i in CASES])
def test_onnx_latency(benchmark, minilm, onnx_models, session_cache, batch, impl):
    sess, size_mb, quality = onnx_models[impl]
    ids, mask = _fixed_inputs(minilm, batch)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    benchmark.group = f"minilm-onnx-b{batch}-s{SEQUENCE}"
    rounds, warmup = ROUNDS[batch]
    benchmark.pedantic(lambda: sess.run(None, feed), rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median
    session_cache[("onnx", batch, impl)] = median
    benchmark.extra_info.update({"impl": impl, "batch": batch, "sequence": SEQUENCE, "file_mb": size_mb,
                                 "onnxruntime": ort.__version__,
                                 **{k: round(v, 5) for k, v in quality.items()}, **onnx_models["info"]})
    inter = onnx_models["interleaved"]
    benchmark.extra_info["interleaved_median_ms"] = round(inter[(batch, impl)], 2)
    for base in ("float-onnx", "ort-dynamic", *SAME_SESSION):
        if impl != base:
            benchmark.extra_info[f"interleaved_speedup_vs_{base.replace('-', '_')}"] = \
                round(inter[(batch, base)] / inter[(batch, impl)], 3)
        other = session_cache.get(("onnx", batch, base))
        if other and impl != base:
            benchmark.extra_info[f"speedup_vs_{base.replace('-', '_')}"] = round(other / median, 3)
    out = sess.run(None, feed)[0]
    assert np.isfinite(out).all()
