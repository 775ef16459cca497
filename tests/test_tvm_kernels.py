"""The TIR integer GEMM kernels of the tvm backend, family by family, against an int64 numpy
reference: the integer product bit-exact, the fused epilogue to float rounding. A family whose
instructions this host lacks is skipped with the missing CPU feature named."""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the tvm backend needs the 'tvm' extra: pip install 'qcompile[tvm]'")

from qcompile.backends.tvm import kernels  # noqa: E402
from qcompile.backends.tvm.host import choose_family, choose_mcpu, detect  # noqa: E402

HOST = detect()
NEEDS = {"vnni": "avx512_vnni", "generic": None}
# (M, K, N): full 5-row tiles, remainder rows, M=1 (the one-row path), N padded to 48, N%96 == 0
SHAPES = [(10, 64, 48), (7, 32, 40), (1, 128, 96), (13, 256, 100), (2, 768, 192)]


def _family(name):
    flag = NEEDS[name]
    if flag and flag not in HOST.flags:
        pytest.skip(f"kernel family '{name}' needs the CPU feature {flag}, which this host lacks")
    return name


def test_pack_round_trip_and_layout():
    w = np.random.default_rng(0).integers(-128, 128, (40, 12)).astype(np.int8)
    p = kernels.pack_weights(w)
    assert p.shape == (3, 3, 64)                    # N padded to 48 → 3 blocks of 16; K/4 = 3
    assert np.array_equal(kernels.unpack_weights(p)[:40], w) and not kernels.unpack_weights(p)[40:].any()
    # one vpdpbusd operand: 16 columns x 4 consecutive k, column-major inside the group
    assert np.array_equal(p[1, 2].reshape(16, 4), w[16:32, 8:12])
    with pytest.raises(ValueError, match="multiple of 4"):
        kernels.pack_weights(w[:, :10])


@pytest.mark.parametrize("family", kernels.FAMILIES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_gemm_is_bit_exact(family, m, k, n, per_row):
    _family(family)
    rng = np.random.default_rng(m * 1000 + k + n)
    np_ = kernels.padded_n(n)
    mod = kernels.compile_kernel(kernels.gemm_kernel(k, np_, per_row, family))
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    a[0, :] = 255                                   # the full u8 range (a saturating kernel fails here)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    w[0, :] = -128
    wfull = np.zeros((np_, k), np.int64)
    wfull[:n] = w
    acc = a.astype(np.int64) @ wfull.T
    rows = m if per_row else 1
    dev = tvm.cpu()

    def run(sa, za, sw, bias):
        args = [a, kernels.pack_weights(w), wfull.sum(1).astype(np.int32), sa, za, sw, bias, np.zeros((m, np_), np.float32)]
        t = [tvm.runtime.tensor(x, dev) for x in args]
        mod["main"](*t)
        return t[-1].numpy()

    # identity epilogue: the output is float32(acc), so the integer product must be exact
    one = run(np.ones(rows, np.float32), np.zeros(rows, np.int32), np.ones(np_, np.float32), np.zeros(np_, np.float32))
    assert np.array_equal(one, acc.astype(np.float32))
    # epilogue: zero point through the column sums, scales, bias
    sa, za = rng.random(rows).astype(np.float32), rng.integers(0, 256, rows).astype(np.int32)
    sw, bias = rng.random(np_).astype(np.float32), rng.standard_normal(np_).astype(np.float32)
    out = run(sa, za, sw, bias)
    ref = (acc - za.reshape(-1, 1) * wfull.sum(1)).astype(np.float64) * (sa.reshape(-1, 1) * sw.astype(np.float64)) + bias
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_kernel_family_and_target_follow_cpu_flags():
    assert choose_family(frozenset({"avx2"})) == "generic"
    assert choose_family(frozenset({"avx2", "avx512f", "avx512_vnni"})) == "vnni"
    assert choose_mcpu("AuthenticAMD", frozenset({"avx512f", "avx512_vnni"})) == "znver4"
    assert choose_mcpu("GenuineIntel", frozenset({"avx512_vnni", "amx_int8", "amx_tile"})) == "sapphirerapids"
    assert choose_mcpu("GenuineIntel", frozenset({"avx2"})) == "x86-64-v3"
    assert HOST.family in kernels.FAMILIES


def test_unknown_family_and_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="unknown kernel family 'amx'"):
        kernels.gemm_kernel(64, 48, False, "amx")
    with pytest.raises(ValueError, match="multiple of 4"):
        kernels.gemm_kernel(30, 48, False, "generic")


@pytest.mark.parametrize("b,m,k,n", [(2, 8, 32, 64), (3, 13, 32, 37), (2, 9, 7, 32), (1, 1, 5, 3)])
def test_float_batch_matmul_matches_numpy(b, m, k, n):
    """Full 4-row x 32-column tiles, remainder rows (13 = 3 tiles + 1), remainder columns (37 =
    one tile + 5 scalars; 3 = scalars only), K not a multiple of anything."""
    rng = np.random.default_rng(b * 100 + m + k + n)
    mod = kernels.compile_kernel(kernels.batch_matmul_kernel())
    x, y = rng.standard_normal((b, m, k)).astype(np.float32), rng.standard_normal((b, k, n)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((b, m, n), np.nan, np.float32))
    mod["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), out)
    np.testing.assert_allclose(out.numpy(), x.astype(np.float64) @ y.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_float_batch_matmul_rejects_mismatched_shapes():
    mod = kernels.compile_kernel(kernels.batch_matmul_kernel())
    x, y = np.zeros((2, 4, 8), np.float32), np.zeros((2, 7, 32), np.float32)
    with pytest.raises(Exception, match="(?i)shape|mismatch|match"):
        mod["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), tvm.runtime.tensor(np.zeros((2, 4, 32), np.float32)))
