"""The TIR integer GEMM kernels of the tvm backend, family by family, against an int64 numpy
reference: the integer product bit-exact, the fused epilogue to float rounding. A family whose
instructions this host lacks is skipped with the missing CPU feature named."""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the tvm backend needs the 'tvm' extra: pip install 'qcompile[tvm]'")

from qcompile.backends.tvm import amx, int8_gemm  # noqa: E402
from qcompile.backends.tvm.host import (FAMILIES, FAMILY_FLAGS, choose_family, choose_mattr, choose_mcpu,  # noqa: E402
                                        compile_kernel, detect, request_amx)

HOST = detect()
# (M, K, N): full 5-row tiles, remainder rows, M=1 (the one-row path), N padded to 48, N%96 == 0
SHAPES = [(10, 64, 48), (7, 32, 40), (1, 128, 96), (13, 256, 100), (2, 768, 192)]


def _family(name):
    missing = [f for f in FAMILY_FLAGS[name] if f not in HOST.flags]
    if missing:
        pytest.skip(f"kernel family '{name}' needs the CPU features {', '.join(missing)}, which this host lacks")
    if name == "amx":
        assert request_amx(), "Linux refused the AMX tile state"
    return name


def test_pack_round_trip_and_layout():
    w = np.random.default_rng(0).integers(-128, 128, (40, 12)).astype(np.int8)
    p = int8_gemm.pack_weights(w)
    assert p.shape == (3, 3, 64)                    # N padded to 48 → 3 blocks of 16; K/4 = 3
    assert np.array_equal(int8_gemm.unpack_weights(p)[:40], w) and not int8_gemm.unpack_weights(p)[40:].any()
    # one vpdpbusd operand: 16 columns x 4 consecutive k, column-major inside the group
    assert np.array_equal(p[1, 2].reshape(16, 4), w[16:32, 8:12])
    with pytest.raises(ValueError, match="multiple of 4"):
        int8_gemm.pack_weights(w[:, :10])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_gemm_is_bit_exact(family, m, k, n, per_row):
    _family(family)
    rng = np.random.default_rng(m * 1000 + k + n)
    np_ = int8_gemm.padded_n(n)
    mod = compile_kernel(int8_gemm.gemm_kernel(k, np_, per_row, family))
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
        args = [a, int8_gemm.weights_for_family(int8_gemm.pack_weights(w), family), wfull.sum(1).astype(np.int32), sa, za, sw, bias, np.zeros((m, np_), np.float32)]
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
    assert choose_family(frozenset({"avx2"})) == "avx2"
    assert choose_family(frozenset({"sse4_2"})) == "generic"
    assert choose_family(frozenset({"avx2", "avx512f", "avx512_vnni"})) == "vnni"
    assert choose_family(frozenset({"avx512_vnni", "amx_int8", "amx_tile"})) == "amx"
    assert choose_family(frozenset({"amx_int8", "amx_tile"})) == "generic"   # amx's leftover rows need vnni
    assert choose_mcpu("AuthenticAMD", frozenset({"avx512f", "avx512_vnni"})) == "znver4"
    assert choose_mcpu("GenuineIntel", frozenset({"avx512_vnni", "amx_int8", "amx_tile"})) == "sapphirerapids"
    assert choose_mcpu("GenuineIntel", frozenset({"avx2"})) == "x86-64-v3"
    # an Alder Lake-class host: AVX2 and AVX-VNNI, no AVX-512
    assert choose_family(frozenset({"avx2", "avx_vnni"})) == "avx-vnni"
    assert choose_mattr("x86-64-v3", frozenset({"avx2", "avx_vnni"})) == ("+avxvnni",)
    assert choose_mattr("x86-64-v3", frozenset({"avx2"})) == ()
    assert choose_mattr("sapphirerapids", frozenset({"avx2", "avx_vnni", "avx512_vnni"})) == ()
    assert HOST.family in FAMILIES


def test_avx_vnni_family_is_vex_ymm_code_for_an_avx2_target():
    """The code an AVX2 + AVX-VNNI host without AVX-512 compiles (``x86-64-v3`` + ``avxvnni``):
    the VEX-encoded ``vpdpbusd`` on ymm, no zmm register anywhere; run bit-exact where the host
    has AVX-VNNI (this target's code runs on any such host, AVX-512 or not)."""
    m, k, n = 13, 256, 100
    np_ = int8_gemm.padded_n(n)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "mattr": ["+avxvnni"]})
    mod = compile_kernel(int8_gemm.gemm_kernel(k, np_, False, "avx-vnni"), target)
    asm = mod.mod.inspect_source("asm")
    assert "{vex}\tvpdpbusd" in asm and "%ymm" in asm and "%zmm" not in asm
    _family("avx-vnni")
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    wfull = np.zeros((np_, k), np.int64)
    wfull[:n] = w
    t = [tvm.runtime.tensor(x, tvm.cpu()) for x in (
        a, int8_gemm.pack_weights(w), wfull.sum(1).astype(np.int32), np.ones(1, np.float32), np.zeros(1, np.int32),
        np.ones(np_, np.float32), np.zeros(np_, np.float32), np.zeros((m, np_), np.float32))]
    mod["main"](*t)
    assert np.array_equal(t[-1].numpy(), (a.astype(np.int64) @ wfull.T).astype(np.float32))


def test_avx2_split_weights_recombine_within_the_no_saturation_bound():
    """Every int8 weight is ``16 * hi + lo`` with ``lo`` in -8..7 and ``hi`` in -8..8, laid out as
    the packed group (lo) followed by the same group (hi); with u8 codes, AVX2_STEPS pair sums of
    either part stay inside int16."""
    w = np.arange(-128, 128, dtype=np.int8).reshape(16, 16)
    p = int8_gemm.pack_weights(w)
    s = int8_gemm.split_weights(p).astype(np.int32)
    assert s.shape == (*p.shape[:2], 128)
    lo, hi = s[..., :64], s[..., 64:]
    assert np.array_equal(16 * hi + lo, p) and lo.min() == -8 and lo.max() == 7 and hi.min() == -8 and hi.max() == 8
    assert int8_gemm.AVX2_STEPS * 2 * 255 * max(-lo.min(), -hi.min(), lo.max(), hi.max()) <= 32767
    assert int8_gemm.weights_for_family(p, "vnni") is p


def _worst_case_exact(family, target, m, k, avx2_steps=int8_gemm.AVX2_STEPS):
    """Activations all 255 against weight columns at every extreme of the split (-128, 127, and
    -8 and 120, whose lo or hi part is -8 or 8 on every k), plus random columns: the float output
    of the identity epilogue equals the int64 product exactly."""
    np_ = 48
    w = np.random.default_rng(k).integers(-128, 128, (np_, k)).astype(np.int8)
    w[:8] = np.array([-128, 127, -8, 120, 7, -9, 119, -121], np.int8).reshape(-1, 1)
    a = np.full((m, k), 255, np.uint8)
    a[1::2, 1::3] = 0
    mod = compile_kernel(int8_gemm.gemm_kernel(k, np_, False, family, avx2_steps=avx2_steps), target)
    t = [tvm.runtime.tensor(x, tvm.cpu()) for x in (
        a, int8_gemm.weights_for_family(int8_gemm.pack_weights(w), family), np.zeros(np_, np.int32),
        np.ones(1, np.float32), np.zeros(1, np.int32), np.ones(np_, np.float32), np.zeros(np_, np.float32),
        np.full((m, np_), np.nan, np.float32))]
    mod["main"](*t)
    return mod, np.array_equal(t[-1].numpy(), (a.astype(np.int64) @ w.astype(np.int64).T).astype(np.float32))


AVX2_TARGET = {"kind": "llvm", "mcpu": "x86-64-v3"}


@pytest.mark.parametrize("m,k", [(5, 768), (1, 36)])
def test_avx2_family_is_exact_vpmaddubsw_code_on_worst_case_values(m, k):
    """The code an AVX2 host without AVX-512 compiles: ``vpmaddubsw`` on ymm, no zmm register,
    exact where a saturating kernel is not (K = 36: a last chunk of 1 step of 4 k; M = 1: the
    one-row path)."""
    mod, exact = _worst_case_exact("avx2", tvm.target.Target(AVX2_TARGET), m, k)
    asm = mod.mod.inspect_source("asm")
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm and "%ymm" in asm and "%zmm" not in asm
    assert exact


def test_avx2_weights_must_be_a_graph_constant():
    """The converters split the packed weights from the tensor behind their placeholder; without
    one the error says what the family needs (the other families take the expression as it is)."""
    from tvm import relax

    from qcompile.errors import BackendError

    packed = relax.Var("w_packed", relax.TensorType((3, 16, 64), "int8"))
    assert int8_gemm.family_weights(packed, None, "vnni") is packed
    with pytest.raises(BackendError, match="'avx2' splits the packed weights at lowering"):
        int8_gemm.family_weights(packed, None, "avx2")
    split = int8_gemm.family_weights(packed, np.ones((3, 16, 64), np.int8), "avx2")
    assert [int(d) for d in split.ty.shape.values] == [3, 16, 128] and split.ty.dtype == "int8"


def test_avx2_worst_case_test_fails_when_16_bit_sums_can_overflow():
    """The worst-case values reach the bound: one more step of 16-bit sums (9 x 4,080 > 32,767)
    wraps, and the same check fails."""
    assert not _worst_case_exact("avx2", tvm.target.Target(AVX2_TARGET), 5, 768, avx2_steps=9)[1]


def test_pmaddubsw_peak_loop_is_register_only_vpmaddubsw():
    """The AVX2 peak loop (benchmarks/tvm_avx2_ab.py): ``vpmaddubsw`` chains on ymm, fed back, so
    the loop is not hoisted; u8 (1, 1) . s8 (1, 1) = 2, then u8 (2, 0) . s8 (1, 1) = 2 in every lane."""
    from qcompile.backends.tvm.peak import pmaddubsw_peak_kernel

    mod = compile_kernel(pmaddubsw_peak_kernel(5, 4), tvm.target.Target(AVX2_TARGET))
    asm = mod.mod.inspect_source("asm")
    assert asm.count("vpmaddubsw") >= 4 and "%zmm" not in asm
    t = [tvm.runtime.tensor(x) for x in (np.ones(32, np.int8), np.ones(32, np.int8), np.zeros(64, np.int16))]
    mod["main"](*t)
    assert (t[-1].numpy() == 2).all()


def test_unknown_family_and_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="unknown kernel family 'sme'"):
        int8_gemm.gemm_kernel(64, 48, False, "sme")
    with pytest.raises(ValueError, match="multiple of 4"):
        int8_gemm.gemm_kernel(30, 48, False, "generic")


# (M, K, N, check the requantizing epilogue too): two 32-row blocks, a pair of column blocks and an
# odd one (N=48 → 3 blocks of 16), 13 leftover rows; M=300 → 9 blocks, so two chunks of AMX_CHUNK;
# K=96 is not a multiple of 64 (the vnni/generic kernel throughout)
# K = 768 and up: the epilogue of each block runs interleaved with the next block's tiles
# (amx.AMX_INTERLEAVE_MIN_STEPS); below, after its own block
AMX_SHAPES = [(77, 768, 112, True), (300, 768, 48, False), (77, 192, 48, True), (40, 96, 48, False)]


def _gemm_inputs(m, k, n, per_row, seed):
    rng = np.random.default_rng(seed)
    np_ = int8_gemm.padded_n(n)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    a[0, :] = 255
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    w[0, :] = -128
    wfull = np.zeros((np_, k), np.int64)
    wfull[:n] = w
    rows = m if per_row else 1
    return a, w, wfull, [rng.random(rows).astype(np.float32), rng.integers(0, 256, rows).astype(np.int32),
                         rng.random(np_).astype(np.float32), rng.standard_normal(np_).astype(np.float32)]


@pytest.mark.parametrize("family", [amx.AMX_EMULATED, "amx"])
@pytest.mark.parametrize("m,k,n,requantize", AMX_SHAPES)
def test_amx_family_is_bit_exact(family, m, k, n, requantize):
    """The AMX family's loop nest (blocks of 32 rows, tile loads at the right offsets and strides,
    the scratch the epilogue reads, the epilogue run after its block or spread over the next one,
    chunks, odd column blocks, leftover rows): on AMX hosts
    with the tile instructions, on every host with scalar stand-ins for them. The integer product
    is exact and the requantizing epilogue gives the codes the generic kernel gives."""
    _family(family)
    per_row = m % 2 == 1
    a, w, wfull, (sa, za, sw, bias) = _gemm_inputs(m, k, n, per_row, m + k + n)
    np_ = wfull.shape[0]
    dev = tvm.cpu()
    one = [np.ones_like(sa), np.zeros_like(za), np.ones_like(sw), np.zeros_like(bias)]
    mod = compile_kernel(int8_gemm.gemm_kernel(k, np_, per_row, family))
    t = [tvm.runtime.tensor(x, dev) for x in (a, int8_gemm.pack_weights(w), wfull.sum(1).astype(np.int32), *one,
                                               np.full((m, np_), np.nan, np.float32))]
    mod["main"](*t)
    assert np.array_equal(t[-1].numpy(), (a.astype(np.int64) @ wfull.T).astype(np.float32))
    if not requantize:
        return
    codes = {}
    for fam in (family, "generic"):
        mod = compile_kernel(int8_gemm.gemm_kernel(k, np_, per_row, fam, ("gelu", "uint8")))
        t = [tvm.runtime.tensor(x, dev) for x in (
            a, int8_gemm.pack_weights(w), wfull.sum(1).astype(np.int32), sa, za, sw, bias, np.ones(np_, np.float32),
            np.array([4.0], np.float32), np.array([7], np.int32), np.zeros((m, np_), np.uint8))]
        mod["main"](*t)
        codes[fam] = t[-1].numpy()
    assert codes["generic"].std() > 10    # the codes spread over the range: the comparison can fail
    assert np.array_equal(codes[family], codes["generic"])


@pytest.mark.parametrize("m,k,n", [(77, 768, 112), (300, 192, 48), (13, 256, 100)])
def test_parallel_build_gives_the_serial_build_s_outputs(m, k, n):
    """The column panels (AMX: groups of column pairs, each task with its own tile configuration,
    scratch and epilogue pipeline) as thread-pool tasks: the host family's outputs, bit for bit,
    for AMX blocks with an odd column block and leftover rows, two chunks, vector tiles only."""
    family = _family(HOST.family)
    per_row = m % 2 == 1
    a, w, wfull, (sa, za, sw, bias) = _gemm_inputs(m, k, n, per_row, 7 * m + k)
    np_ = wfull.shape[0]
    outs = []
    for parallel in (False, True):
        mod = compile_kernel(int8_gemm.gemm_kernel(k, np_, per_row, family, ("gelu", "uint8"), parallel))
        t = [tvm.runtime.tensor(x, tvm.cpu()) for x in (
            a, int8_gemm.weights_for_family(int8_gemm.pack_weights(w), family), wfull.sum(1).astype(np.int32), sa, za, sw, bias, np.ones(np_, np.float32),
            np.array([4.0], np.float32), np.array([7], np.int32), np.zeros((m, np_), np.uint8))]
        mod["main"](*t)
        outs.append(t[-1].numpy())
    assert outs[0].std() > 10 and np.array_equal(outs[0], outs[1])


def test_amx_kernel_is_tile_code():
    """The real AMX kernel, compiled for a Sapphire Rapids target on any host (and never run
    here): tile loads, ``tdpbusd`` and tile stores in the code, the tile configuration loaded once
    per call (outside every loop), the tiles released; a K that is not a multiple of 64 has none."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
    asm = compile_kernel(int8_gemm.gemm_kernel(768, 3072, False, "amx"), target).mod.inspect_source("asm")
    for insn in ("tdpbusd", "tileloadd", "tilestored", "tilezero", "tilerelease", "vpdpbusd"):
        assert insn in asm, insn
    assert asm.count("ldtilecfg") == 1
    asm = compile_kernel(int8_gemm.gemm_kernel(96, 48, False, "amx"), target).mod.inspect_source("asm")
    assert "tdpbusd" not in asm and "vpdpbusd" in asm
