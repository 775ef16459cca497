"""The TIR int4 weight-only kernel of the tvm backend (qcompile/backends/tvm/int4.py) against a
float64 torch reference of ``x @ ((q - z) * s)^T + b``, for the GEMV (M=1) and M>1 cases, every
built group size, and N/K that are not multiples of the tile; plus the packing and its refusals."""
import functools

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm", reason="the tvm backend needs the 'tvm' extra: pip install 'qcompile[tvm]'")

from qcompile.backends.tvm import int4  # noqa: E402
from qcompile.backends.tvm.host import compile_kernel  # noqa: E402


def _case(m, k, n, g, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    s = (rng.random((n, k // g)) * 0.1 + 1e-3).astype(np.float32)
    z = rng.integers(0, 16, (n, k // g)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return q, s, z, b, x


def _reference(q, s, z, b, x, g):
    t = lambda a: torch.from_numpy(np.asarray(a)).to(torch.float64)  # noqa: E731
    w = (t(q) - t(z).repeat_interleave(g, 1)) * t(s).repeat_interleave(g, 1)
    return (t(x) @ w.T + t(b)).numpy()


@functools.lru_cache(maxsize=None)
def _kernel(k, np_, g, mmin=int4.MMIN):
    return compile_kernel(int4.int4_kernel(k, np_, g, mmin))


def _run(q, s, z, b, x, g, mmin=int4.MMIN):
    n, k = q.shape
    packed, sp, zp = int4.pack_int4(q, s, z, g)
    np_ = int4.padded_n(n)
    bias = np.zeros(np_, np.float32)
    bias[:n] = b
    f = _kernel(k, np_, g, mmin)
    out = tvm.runtime.tensor(np.zeros((x.shape[0], np_), np.float32))
    f["main"](*(tvm.runtime.tensor(a) for a in (x, packed, sp, zp, bias)), out)
    return out.numpy()


def test_pack_round_trip_and_layout():
    q, s, z, _, _ = _case(1, 64, 20, 32)
    packed, sp, zp = int4.pack_int4(q, s, z, 32)
    assert packed.shape == (2, 8, 64) and sp.shape == zp.shape == (2, 2, 16)   # N 20 -> 32
    assert np.array_equal(int4.unpack_int4(packed)[:20], q) and not int4.unpack_int4(packed)[20:].any()
    # byte [block, i, 4 * column + j] holds k = 8i + 2j in the low nibble and k = 8i + 2j + 1 in the high one
    assert packed[1, 3, 4 * 2 + 1] == q[18, 26] | (q[18, 27] << 4)
    # as little-endian uint32 lanes: lane c holds the 8 codes k = 8i .. 8i+7 of column c, k = 8i at bits 0..3
    lane = packed.view("<u4")[1, 3, 2]
    assert [(lane >> (4 * h)) & 15 for h in range(8)] == list(q[18, 24:32])
    assert sp[1, 1, 3] == s[19, 1] and not sp[1, :, 4:].any()     # padding columns: zero scale


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 17, 128])
def test_kernel_matches_float64(m, g):
    # m < MMIN: the GEMV path (quads of rows, a pair, the odd one: 7 = 4 + 2 + 1, 17 = 4 x 4 + 1);
    # 128: the GEMM path, 21 tiles of 6 rows + 1 pair
    k, n = 384, 40        # N not a multiple of the 16-column block (an odd last panel); K = 3 groups of 128
    q, s, z, b, x = _case(m, k, n, g, seed=m * g)
    ref = _reference(q, s, z, b, x, g)
    out = _run(q, s, z, b, x, g)
    assert out.shape == (m, 48)
    np.testing.assert_allclose(out[:, :n], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert not out[:, n:].any()       # padding columns: zero scale, zero bias


@pytest.mark.parametrize("mmin, m", [(1, 1), (1, 3), (1, 9), (1, 17), (1000, 43)])
def test_each_path_at_any_row_count(mmin, m):
    """The dequantize-once GEMM path at 1..17 rows (17 = 2 tiles of 6 rows + 2 pairs + 1 row) and the
    GEMV path at 43 (``mmin`` moves the switch)."""
    k, n, g = 256, 72, 64
    q, s, z, b, x = _case(m, k, n, g, seed=m)
    ref = _reference(q, s, z, b, x, g)
    np.testing.assert_allclose(_run(q, s, z, b, x, g, mmin)[:, :n], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("g", [32, 64, 128])
def test_accumulators_stay_in_registers(g):
    """The compiled kernel asks TVM's workspace for the one ``[K, 32]`` panel buffer only, and no
    float buffer is left on the stack: every accumulator lives in registers. (TVM's StorageRewrite
    once merged the GEMM tile's accumulators into the GEMV path's heap buffers at g=128, and the
    tile stored all 12 of them after every FMA: 2.4x slower.)"""
    import re

    k = 768
    ll = compile_kernel(int4.int4_kernel(k, 48, g)).mod.inspect_source("ll")
    sizes = re.findall(r"call ptr %\d+\(i32 1, i32 %dev_id, i64 (\d+), i32 2, i32 32\)", ll)
    assert sizes == [str(k * 32 * 4)]
    assert not re.search(r"alloca \[\d+ x (float|<16 x float>)\]", ll)


def test_k_not_a_multiple_of_128():
    q, s, z, b, x = _case(2, 96, 33, 32, seed=5)      # K = 3 groups of 32
    np.testing.assert_allclose(_run(q, s, z, b, x, 32)[:, :33], _reference(q, s, z, b, x, 32), rtol=1e-4, atol=1e-4)


def test_refusals():
    q, s, z, _, _ = _case(1, 96, 16, 32)
    with pytest.raises(ValueError, match="does not divide K=96"):
        int4.pack_int4(q, s[:, :1], z[:, :1], 64)
    with pytest.raises(ValueError, match="no int4 kernel"):
        int4.pack_int4(q, s, z, 48)
    with pytest.raises(ValueError, match="0..15"):
        int4.pack_int4(q.astype(np.int16) + 1, s, z, 32)
    with pytest.raises(ValueError, match="multiple of the group"):
        int4.int4_kernel(96, 16, 64)


# ---- the fuse pass and the lowering ----------------------------------------------------------

import copy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import qcompile  # noqa: E402
from qcompile.ops import DEQUANTIZE  # noqa: E402
from qcompile.verify import verify  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_backend_tvm import _block  # noqa: E402


def _mlp(k=128, recipe="w4-g64"):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(k, 64), torch.nn.ReLU(), torch.nn.Linear(64, 40)).eval()
    x = torch.randn(3, k)
    return qcompile.quantize(m, recipe, example_inputs=(x,), calibration=[(x,)]), x


def test_pass_fuses_int4_linears_and_keeps_numerics():
    q, x = _mlp()
    gm = copy.deepcopy(q.graph_module)
    result = int4.FuseInt4LinearPass()(gm)
    assert result.modified and not result.skipped
    assert result.fused == dict.fromkeys(["linear", "linear_1"], "qcompile_tvm::int4_linear")
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(int4.INT4_LINEAR) == 2 and torch.ops.aten.linear.default not in targets
    gm.graph.eliminate_dead_code()
    assert DEQUANTIZE not in [n.target for n in gm.graph.nodes]   # the float weight is gone
    gm.recompile()
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0] if isinstance(gm(x), (tuple, list)) else gm(x), q(x), rtol=1e-5, atol=1e-5)
    assert q.graph_module.graph.find_nodes(op="call_function", target=DEQUANTIZE)   # the user's model untouched


def test_group_not_dividing_k_stays_float_and_is_named():
    q, _ = _mlp()
    gm = copy.deepcopy(q.graph_module)
    dq = next(n for n in gm.graph.nodes if n.target == DEQUANTIZE)
    dq.args = (*dq.args[:4], 48, *dq.args[5:])      # a group size that does not divide K=128
    result = int4.FuseInt4LinearPass()(gm)
    assert list(result.fused) == ["linear_1"] and "group size 48" in result.skipped["linear"]
    assert [n.target for n in gm.graph.nodes].count(torch.ops.aten.linear.default) == 1


@pytest.mark.parametrize("recipe", ["w4-g64", "w4-g128"])
def test_int4_model_lowered_matches_reference(recipe):
    q, x = _mlp(k=256, recipe=recipe)
    art = qcompile.lower(q, backend="tvm")
    assert art.meta["fused"] == ["linear", "linear_1"]
    # 3 and 1 rows: the GEMV path; 40 rows: the dequantize-once GEMM path
    assert verify(art, q, [(x,), (torch.randn(1, 256),), (torch.randn(40, 256),)]).passed


def test_int4_tiny_block_lowered_matches_reference():
    q, batches = _block("w4-g64")
    art = qcompile.lower(q, backend="tvm")
    assert len(art.meta["fused"]) == 6 and not art.meta["skipped"]
    assert verify(art, q, batches).passed
