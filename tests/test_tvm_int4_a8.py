"""int4 weights on int8 activations on the tvm backend (qcompile/backends/tvm/int4_a8.py): the
activation quantize kernel against the reference ops (codes bit-identical), the integer kernel
against float64 torch for M = 1, 3, 17 x g = 32, 64, 128 on every instruction set this host runs,
the ``vnni`` kernel's code where the host cannot run it, the fusion pass, and whole models lowered
against the reference backend (``qcompile.verify``)."""
import copy
import functools
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm", reason="the tvm backend needs the 'tvm' extra: pip install 'qcompile[tvm]'")

import qcompile  # noqa: E402
from qcompile.backends.tvm import NotBuiltError, int4, int4_a8  # noqa: E402
from qcompile.backends.tvm.host import compile_kernel, detect  # noqa: E402
from qcompile.ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE  # noqa: E402
from qcompile.verify import verify  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_backend_tvm import _block  # noqa: E402
from test_tvm_int4 import _mlp as _int4_mlp  # noqa: E402

FLAGS = detect().flags
RUNNABLE = [isa for isa, flag in (("vnni", "avx512_vnni"), ("avx2", "avx2")) if flag in FLAGS]


def _isa(isa):
    flag = {"vnni": "avx512_vnni", "avx2": "avx2"}[isa]
    return pytest.param(isa, marks=pytest.mark.skipif(flag not in FLAGS, reason=f"this host lacks {flag}"))


def _case(m, k, n, g, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    s = (rng.random((n, k // g)) * 0.1 + 1e-3).astype(np.float32)
    z = rng.integers(0, 16, (n, k // g)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = (rng.standard_normal((m, k)) * rng.random((m, 1)) * 4).astype(np.float32)
    x[0, :g] = 0       # an all-zero group: the scale floor (eps), codes 0
    return q, s, z, b, x


def _reference_codes(x, g):
    xt = torch.from_numpy(x)
    sa, za = torch.ops.qcompile.choose_qparams(xt, "int8", True, True, g)
    return torch.ops.qcompile.quantize(xt, sa, za, "int8", g).numpy(), sa.numpy()


@functools.lru_cache(maxsize=None)
def _kernels(k, np_, g, isa):
    return (compile_kernel(int4_a8.quantize_rows_kernel(k, g)),
            compile_kernel(int4_a8.int4_a8_kernel(k, np_, g, isa)))


def _run(q, s, z, b, x, g, isa):
    (n, k), m = q.shape, x.shape[0]
    np_ = int4.padded_n(n)
    packed, sp, zp = int4.pack_int4(q, s, z, g)
    bias = np.zeros(np_, np.float32)
    bias[:n] = b
    fq, fk = _kernels(k, np_, g, isa)
    a, sa, asum = (tvm.runtime.tensor(np.zeros(shape, dt)) for shape, dt in
                   (((m, k), np.int8), ((m, k // g), np.float32), ((m, k // g), np.float32)))
    fq["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(int4_a8.CODE_ORDER), a, sa, asum)
    out = tvm.runtime.tensor(np.zeros((m, np_), np.float32))
    fk["main"](a, sa, asum, *(tvm.runtime.tensor(v) for v in (packed, sp, zp, bias)), out)
    return a.numpy(), sa.numpy(), asum.numpy(), out.numpy()


def _tie_group(g):
    """A group whose value v sits on a rounding tie as the reference computes it,
    ``v * (1 / s) = n + 0.5`` in float32, while ``v / s`` is not a tie: a kernel that computed
    ``v / s`` (LLVM's fast-math folds the reciprocal) would round it the other way."""
    rng = np.random.default_rng(g)
    f = np.float32
    while True:
        amax = f(rng.uniform(0.5, 4))
        s = max(f(amax / f(127)), f(np.finfo(np.float32).eps))
        r = f(f(1) / s)
        v = f(f(rng.integers(1, 120) + 0.5) / r)
        if f(v * r) == f(np.floor(v * r)) + f(0.5) and f(v / s) != f(v * r) and abs(v) < amax:
            out = np.zeros(g, np.float32)
            out[:2] = amax, v
            return out


@pytest.mark.skipif(not RUNNABLE, reason="this host has neither avx2 nor avx512_vnni")
@pytest.mark.parametrize("g", [32, 64, 128])
def test_quantize_kernel_codes_are_the_reference_codes(g):
    k = 384
    q, s, z, b, x = _case(5, k, 40, g, seed=g)     # the shape of test_kernel_matches_float64: one build
    x[1, g: 2 * g] = _tie_group(g)
    a, sa, asum, _ = _run(q, s, z, b, x, g, RUNNABLE[0])
    codes, scales = _reference_codes(x, g)
    assert np.array_equal(a, codes[:, int4_a8.permute_codes(k)])   # bit-identical, in the kernel's order
    assert np.array_equal(sa, scales)
    assert np.array_equal(asum, codes.reshape(5, k // g, g).sum(-1).astype(np.float32))


def test_code_order_matches_the_weight_packing():
    """Stored activation word 2i (2i + 1) holds the k of the low (high) nibbles of line i."""
    k = 64
    perm = int4_a8.permute_codes(k)
    q = np.arange(k, dtype=np.uint8)[None].repeat(16, 0) % 16
    packed, _, _ = int4.pack_int4(q, np.ones((16, 2), np.float32), np.zeros((16, 2), np.float32), 32)
    lane = packed.view("<u4")[0, :, 0]           # column 0, lines 0..7
    for i in range(k // 8):
        lo = [(lane[i] >> (8 * j)) & 15 for j in range(4)]
        hi = [(lane[i] >> (8 * j + 4)) & 15 for j in range(4)]
        assert lo == list(q[0, perm[8 * i: 8 * i + 4]]) and hi == list(q[0, perm[8 * i + 4: 8 * i + 8]])


@pytest.mark.parametrize("isa", [_isa("vnni"), _isa("avx2")])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_kernel_matches_float64(m, g, isa):
    # N = 40: an odd last unit and padding; 17 rows = 4 tiles of 4 + 1 row; 3 rows = the one-row path
    k, n = 384, 40
    q, s, z, b, x = _case(m, k, n, g, seed=m * g)
    codes, scales = _reference_codes(x, g)
    t = lambda v: torch.from_numpy(np.asarray(v)).to(torch.float64)  # noqa: E731
    w = (t(q) - t(z).repeat_interleave(g, 1)) * t(s).repeat_interleave(g, 1)
    ref = (t(codes) * t(scales).repeat_interleave(g, 1) @ w.T + t(b)).numpy()
    out = _run(q, s, z, b, x, g, isa)[3]
    assert out.shape == (m, 48) and not out[:, n:].any()      # padding columns: zero scale and bias
    # exact integer sums per group: only the float accumulation over K/g groups rounds
    np.testing.assert_allclose(out[:, :n], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_vnni_kernel_code_where_the_host_cannot_run_it():
    """The vnni kernel compiles for an AVX-512 VNNI CPU (znver4) on any host, and its inner loop is
    vpdpbusd on zmm with no int16 step; the avx2 one is vpmaddubsw + vpmaddwd."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    asm = {isa: compile_kernel(int4_a8.int4_a8_kernel(256, 48, 64, isa), target).mod.inspect_source("asm")
           for isa in int4_a8.ISAS}
    assert re.search(r"vpdpbusd\s+%zmm", asm["vnni"]) and "vpmaddubsw" not in asm["vnni"]
    assert "vpmaddubsw" in asm["avx2"] and "vpmaddwd" in asm["avx2"] and "vpdpbusd" not in asm["avx2"]


def test_refusals():
    with pytest.raises(ValueError, match="multiple of the group"):
        int4_a8.int4_a8_kernel(96, 16, 64)
    with pytest.raises(ValueError, match="instruction set 'amx'"):
        int4_a8.int4_a8_kernel(128, 16, 64, "amx")
    with pytest.raises(ValueError, match="K=100 and the group 32 must be multiples of 8"):
        int4_a8.quantize_rows_kernel(100, 32)
    assert int4_a8.isa_for("vnni", {"avx512_vnni", "avx2"}) == "vnni"
    assert int4_a8.isa_for("generic", {"avx512_vnni", "avx2"}) == "avx2"
    assert int4_a8.isa_for("generic", {"sse4_2"}) is None


# ---- the fuse pass and the lowering ----------------------------------------------------------

def _mlp(k=256, recipe="w4-g64-a8"):
    return _int4_mlp(k, recipe)     # Linear(k, 64), ReLU, Linear(64, 40)


def test_pass_fuses_and_keeps_numerics():
    q, x = _mlp()
    gm = copy.deepcopy(q.graph_module)
    result = int4_a8.FuseInt4A8LinearPass()(gm)
    assert result.modified and not result.skipped
    assert result.fused == dict.fromkeys(["linear", "linear_1"], "qcompile_tvm::int4_a8_linear")
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(int4_a8.INT4_A8_LINEAR) == 2 and torch.ops.aten.linear.default not in targets
    # the activation choose_qparams/quantize/dequantize and the weight dequantize are gone
    assert not {CHOOSE_QPARAMS, QUANTIZE, DEQUANTIZE} & set(targets)
    fused = next(n for n in gm.graph.nodes if n.target == int4_a8.INT4_A8_LINEAR)
    assert fused.args[0].op == "placeholder" and fused.args[-1] == 64     # the float input, the group
    with torch.no_grad():   # the op's PyTorch implementation is the reference's arithmetic
        torch.testing.assert_close(gm(x), q.graph_module(x), rtol=0, atol=0)


def test_asymmetric_or_per_tensor_activations_are_skipped_with_the_reason():
    q, _ = _mlp()
    gm = copy.deepcopy(q.graph_module)
    cq = next(n for n in gm.graph.nodes if n.target == CHOOSE_QPARAMS)
    cq.args = (cq.args[0], "int8", False, *cq.args[3:])       # asymmetric activations
    result = int4_a8.FuseInt4A8LinearPass()(gm)
    assert list(result.fused) == ["linear_1"] and "asymmetric" in result.skipped["linear"]


def test_k_not_a_multiple_of_8_is_skipped_and_lowering_names_the_node():
    # K = 100 with groups of 64: a short last group of 36, which is not whole lines of 8 codes
    q, x = _mlp(k=100)
    result = int4_a8.FuseInt4A8LinearPass()(copy.deepcopy(q.graph_module))
    assert list(result.fused) == ["linear_1"]
    assert result.skipped == {"linear": "int4 group size 64 does not divide K=100 and K is not a multiple of 8"}
    # the contract's kernel-only check (base.check_kernels_took), with the fusion pass's reason
    with pytest.raises(NotBuiltError, match="node 'dequantize_default'.*format 'uint4' as per_group weights only "
                                            "inside a fused kernel.*linear: int4 group size 64 does not divide K=100"):
        qcompile.lower(q, backend="tvm")


@pytest.mark.skipif(not RUNNABLE, reason="this host has neither avx2 nor avx512_vnni")
def test_short_last_group_matches_float64_and_lowers():
    """K = 96 with groups of 64 (SmolLM2's 576 with 128 alike): the reference quantizes the last 32
    values as a group of their own; the kernels pad codes and weights to 128 with zeros."""
    k, kp, n, g, m = 96, 128, 40, 64, 5
    q, s, z, b, x = _case(m, k, n, g, seed=7)
    s, z = s[:, :1].repeat(2, 1), z[:, :1].repeat(2, 1)      # ceil(96 / 64) = 2 groups
    s[:, 1] *= 0.5
    packed, sp, zp = int4.pack_int4(q, s, z, g, pad_k=True)
    assert packed.shape == (3, kp // 8, 64) and not int4.unpack_int4(packed)[:, k:].any()
    fq = compile_kernel(int4_a8.quantize_rows_kernel(k, g))
    fk = compile_kernel(int4_a8.int4_a8_kernel(kp, 48, g, RUNNABLE[0]))
    a, sa, asum = (tvm.runtime.tensor(np.zeros(shape, dt)) for shape, dt in
                   (((m, kp), np.int8), ((m, 2), np.float32), ((m, 2), np.float32)))
    fq["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(int4_a8.CODE_ORDER), a, sa, asum)
    codes, scales = _reference_codes(x, g)
    assert np.array_equal(a.numpy()[:, :k], codes[:, int4_a8.permute_codes(k)]) and not a.numpy()[:, k:].any()
    assert np.array_equal(sa.numpy(), scales)
    bias = np.zeros(48, np.float32)
    bias[:n] = b
    out = tvm.runtime.tensor(np.zeros((m, 48), np.float32))
    fk["main"](a, sa, asum, *(tvm.runtime.tensor(v) for v in (packed, sp, zp, bias)), out)
    t = lambda v: torch.from_numpy(np.asarray(v)).to(torch.float64)  # noqa: E731
    w = (t(q) - t(z).repeat_interleave(g, 1)[:, :k]) * t(s).repeat_interleave(g, 1)[:, :k]
    ref = (t(codes) * t(scales).repeat_interleave(g, 1)[:, :k] @ w.T + t(b)).numpy()
    np.testing.assert_allclose(out.numpy()[:, :n], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    qm, xm = _mlp(k=96)
    art = qcompile.lower(qm, backend="tvm")
    assert art.meta["fused"] == ["linear", "linear_1"] and not art.meta["skipped"]
    assert verify(art, qm, [(xm,), (torch.randn(1, 96),), (torch.randn(9, 96),)]).passed


@pytest.mark.skipif(not RUNNABLE, reason="this host has neither avx2 nor avx512_vnni")
@pytest.mark.parametrize("recipe", ["w4-g32-a8", "w4-g128-a8"])   # g=64: the tiny block below
def test_model_lowered_matches_reference(recipe):
    q, x = _mlp(recipe=recipe)
    art = qcompile.lower(q, backend="tvm")
    assert art.meta["fused"] == ["linear", "linear_1"] and not art.meta["skipped"]
    # 3 and 1 rows: the one-row path; 40 rows: the row tiles (and 40 % 4 = 0, 41: one more row)
    batches = [(x,), (torch.randn(1, 256),), (torch.randn(40, 256),), (torch.randn(41, 256) * 3,)]
    assert verify(art, q, batches).passed
    with torch.no_grad():
        for (b,) in batches:
            ref = q(b)
            torch.testing.assert_close(art(b), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.skipif(not RUNNABLE, reason="this host has neither avx2 nor avx512_vnni")
def test_tiny_block_lowered_matches_reference():
    q, batches = _block("w4-g64-a8")   # K = 32 (one group of 32: the weight group narrowed to K) and 64
    art = qcompile.lower(q, backend="tvm")
    assert len(art.meta["fused"]) == 6 and not art.meta["skipped"]
    assert verify(art, q, batches).passed
