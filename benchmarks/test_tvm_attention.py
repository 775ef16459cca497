"""One MiniLM attention (12 heads of 32, 128 tokens) side by side, one thread, one process: the
importer's attention as the tvm pipeline built it before ``rewrite_attention`` (four transposes,
``fbmm_f32`` Q·Kᵀ and P·V, scale + mask + softmax kernel) vs the fused kernel
(``attention.attention_kernel``), both from the same Relax module, timed in alternating rounds.

``extra_info``: ``unfused_ms`` / ``fused_ms`` (medians of the alternating rounds) and
``ratio_vs_unfused`` (> 1: the fused kernel is faster). Run::

    TVM_NUM_THREADS=1 python -m pytest benchmarks/test_tvm_attention.py --benchmark-only
"""
import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx

from qcompile.backends.tvm import attention, pipeline
from qcompile.backends.tvm.host import detect

HEADS, HEAD_DIM, SEQ = 12, 32, 128
ROUNDS = {1: 200, 32: 12}


def _importer_attention():
    """The Relax the torch importer emits for BERT's eager attention (see attention.py's docstring),
    from the three Linear outputs ``[b·s, 384]`` and the additive mask ``[b, 1, s, s]``."""
    b, s = tirx.Var("b", "int64"), tirx.Var("s", "int64")
    hd = HEADS * HEAD_DIM
    op = relax.op
    bb = relax.BlockBuilder()
    q, k, v = (relax.Var(n, relax.TensorType([b * s, hd], "float32")) for n in "qkv")
    mask = relax.Var("mask", relax.TensorType([b, 1, s, s], "float32"))
    with bb.function("main", [q, k, v, mask]):
        with bb.dataflow():
            def heads(x):
                x = bb.emit(op.reshape(bb.emit(op.reshape(x, [b, s, hd])), [b, s, HEADS, HEAD_DIM]))
                return bb.emit(op.permute_dims(x, [0, 2, 1, 3]))

            def batched(x, shape):
                return bb.emit(op.reshape(bb.emit(op.broadcast_to(x, shape)), [b * HEADS, shape[2], shape[3]]))

            qh, kh, vh = heads(q), heads(k), heads(v)
            kt = bb.emit(op.permute_dims(kh, [0, 1, 3, 2]))
            sc = bb.emit(op.matmul(batched(qh, [b, HEADS, s, HEAD_DIM]), batched(kt, [b, HEADS, HEAD_DIM, s])))
            sc = bb.emit(op.reshape(sc, [b, HEADS, s, s]))
            sc = bb.emit(op.add(bb.emit(op.multiply(sc, relax.const(HEAD_DIM ** -0.5, "float32"))), mask))
            p = bb.emit(op.nn.softmax(sc, axis=-1))
            ctx = bb.emit(op.matmul(batched(p, [b, HEADS, s, s]), batched(vh, [b, HEADS, s, HEAD_DIM])))
            ctx = bb.emit(op.permute_dims(bb.emit(op.reshape(ctx, [b, HEADS, s, HEAD_DIM])), [0, 2, 1, 3]))
            out = bb.emit_output(op.reshape(ctx, [b, s, hd]))
        bb.emit_func_output(out)
    return bb.get()


def _build(fused: bool):
    target = detect().target()
    real = attention.rewrite_attention
    if not fused:   # the pipeline as it was before the rewrite existed
        attention.rewrite_attention = lambda: tvm.transform.module_pass(lambda m, _c: m, opt_level=0, name="Keep")
    try:
        ex = tvm.compile(_importer_attention(), target=target, relax_pipeline=pipeline.get_pipeline(target))
    finally:
        attention.rewrite_attention = real
    return relax.VirtualMachine(ex, tvm.cpu())


@pytest.mark.parametrize("batch", [1, 32])
def test_attention_fused_vs_unfused(benchmark, batch):
    torch.set_num_threads(1)
    rng = np.random.default_rng(batch)
    hd = HEADS * HEAD_DIM
    q, k, v = (rng.standard_normal((batch * SEQ, hd)).astype(np.float32) for _ in range(3))
    mask = np.zeros((batch, 1, SEQ, SEQ), np.float32)
    mask[0, ..., SEQ - 16:] = np.finfo(np.float32).min
    feed = [tvm.runtime.tensor(x) for x in (q, k, v, mask)]
    vms = {"unfused": _build(False)["main"], "fused": _build(True)["main"]}
    outs = {name: f(*feed).numpy() for name, f in vms.items()}
    np.testing.assert_allclose(outs["fused"], outs["unfused"], rtol=1e-4, atol=1e-5)
    times = {name: [] for name in vms}
    for r in range(ROUNDS[batch]):
        for name in (("unfused", "fused") if r % 2 == 0 else ("fused", "unfused")):
            t0 = time.perf_counter()
            vms[name](*feed)
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(t)) for name, t in times.items()}
    benchmark.group = f"attention-b{batch}x{SEQ}-h{HEADS}x{HEAD_DIM}"
    benchmark.pedantic(lambda: vms["fused"](*feed), rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update({"unfused_ms": round(med["unfused"] * 1e3, 3), "fused_ms": round(med["fused"] * 1e3, 3),
                                 "ratio_vs_unfused": round(med["unfused"] / med["fused"], 3), "threads": 1,
                                 "load_average": os.getloadavg()[0]})
