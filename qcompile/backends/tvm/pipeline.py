"""The Relax pipeline the tvm backend builds with: TVM's CPU phases (dispatch, legalize + fuse,
lower, finalize) with four phases of ours, after :func:`~.attention.rewrite_attention` (the
importer's attention as one fused kernel).

TVM's default CPU pipeline leaves every legalized loop nest unscheduled: a fused kernel runs one
full-size loop nest per elementwise step (each writing a temporary as large as the tensor), ``erf``
and ``exp`` are scalar libm calls that stop LLVM's vectorizer, reductions run in source order, and
a float matmul reads ``B`` with a stride in its innermost loop. Ours:

- :func:`rewrite_float_ops` (before legalization): GELU, softmax, ``erf`` and ``exp`` through
  TVM's polynomial ``fast_erf`` / ``fast_exp`` (topi), which are plain arithmetic that vectorizes.
  Measured against float64: ``fast_erf`` within 3.7e-7 absolute, ``fast_exp`` within 2.5e-7
  relative (torch's float32 ``erf``: 3.2e-8) — far below the int8 step of any activation. Float
  batch matmuls of rank 3 (attention's Q·Kᵀ and P·V after the importer's reshapes) become calls of
  the register-tiled :func:`batch_matmul_kernel` (FMA on zmm, 8 accumulators).
- :func:`fuse_producers_into_norms` (before fusion): the attention scale and mask fuse into the
  softmax kernel, the residual add into the LayerNorm kernel.
- :func:`schedule_primfunc` (after fusion), for every PrimFunc but the hand-written kernels:
  elementwise steps are inlined into one loop nest (a producer read by two consumers of a
  reduction kernel, softmax's ``exp``, is kept so it is computed once); in a kernel with
  reductions (softmax, LayerNorm) every step is computed per row under the output's leading
  spatial loops, so a row stays in L1 between its passes; float ``matmul`` blocks get their
  reduction loop outside the last spatial loop (vectorized explicitly when its extent is static);
  these are the matmuls the tiled kernel does not take (other ranks, a broadcast batch). Other
  innermost loops are left to LLVM's loop vectorizer: it handles symbolic extents (batch,
  sequence) with a remainder loop, and an explicit ``vectorize`` of a rounding cast to uint8 came
  out slower (scalarized ``vcvttps2dq``).
- :data:`~.host.FAST_MATH_FLAGS` on the target: LLVM may reassociate float adds (so it vectorizes
  reductions: a LayerNorm row sum in 16 lanes) and contract ``a * b + c`` into FMA. No ``nnan`` /
  ``ninf``: an attention mask may hold large negative values and the results must keep NaN/inf.

The hand-written kernels (``qgemm_*``, :data:`FLOAT_BMM`, :data:`~.attention.ATTENTION`) are left alone.
"""
from __future__ import annotations

import functools

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx, topi
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.script import tirx as T

from .attention import ATTENTION, rewrite_attention

VECTOR_LANES = 16   # float32 lanes of a zmm register
FLOAT_BMM = "fbmm_f32"   # the name of the float batch-matmul kernel in the module


def _blocks(sch):
    root = sch.get_sblock("root")
    out = []
    stack = list(sch.get_child_blocks(root))
    while stack:
        b = stack.pop()
        out.append(b)
        stack.extend(sch.get_child_blocks(b))
    return out


def _schedule_matmul(sch, blk) -> bool:
    """Reduction loop outside the last spatial loop; a static last extent (P·V's head size) is
    split into :data:`VECTOR_LANES` and vectorized explicitly: with float reassociation allowed,
    LLVM would otherwise vectorize the reduction with gathers (13x slower, measured)."""
    loops = sch.get_loops(blk)
    if len(loops) < 2:
        return False
    ext = sch.get(loops[-2]).extent
    if isinstance(ext, tirx.IntImm) and int(ext) % VECTOR_LANES == 0:
        outer, lanes = sch.split(loops[-2], factors=[None, VECTOR_LANES])
        sch.reorder(loops[-1], outer, lanes)
        sch.vectorize(lanes)   # before decompose_reduction: vectorize needs the block's init
    else:
        sch.reorder(loops[-1], loops[-2])
    sch.decompose_reduction(blk, loops[-1])
    return True


def _inline_elementwise(sch, has_reduction: bool) -> None:
    """Inline every spatial block into its consumer (or its producer), as far as it goes. In a
    kernel with reductions, a block read by more than one consumer is kept (inlining would
    compute it once per consumer)."""
    while True:
        infos = normalize_prim_func(sch)
        if not infos:
            return
        done = False
        for info in infos:
            if not info.is_injective():
                continue
            if has_reduction and len(sch.get_consumers(info.block_rv)) > 1:
                continue
            try:
                sch.compute_inline(info.block_rv)
                done = True
                break
            except Exception:  # noqa: BLE001, S112 - not inlinable (an output block, a non-trivial read)
                continue
        if not done:
            for info in reversed(infos):
                if not info.is_injective():
                    continue
                try:
                    sch.reverse_compute_inline(info.block_rv)
                    done = True
                    break
                except Exception:  # noqa: BLE001, S112 - not inlinable into its producer
                    continue
        if not done:
            return


def _schedule_fused(sch) -> bool:
    """Inline, then compute every block per row under the last block's leading spatial loops."""
    infos = normalize_prim_func(sch)
    if not infos:
        return False
    has_reduction = any(not i.is_injective() for i in infos)
    _inline_elementwise(sch, has_reduction)
    infos = normalize_prim_func(sch)
    if not infos:
        return True
    if has_reduction and len(infos) > 1 and infos[-1].is_injective():
        kinds = [i.dom_kind() for i in infos]
        lead = min(len(k) - len(k.lstrip("S")) for k in kinds)
        if lead >= 1:
            loops = sch.get_loops(infos[-1].block_rv)
            for info in reversed(infos[:-1]):
                sch.compute_at(info.block_rv, loops[lead - 1], preserve_unit_loops=True)
    return True


def schedule_primfunc(func):
    """``func`` scheduled as the module docstring says; ``func`` itself when nothing applies or
    a schedule step fails (the function then keeps TVM's default loop nest)."""
    sch = s_tir.Schedule(func)
    try:
        matmuls = [b for b in _blocks(sch) if sch.get(b).name_hint.startswith("matmul")]
        if matmuls:
            changed = False
            for blk in matmuls:
                changed |= _schedule_matmul(sch, blk)
        else:
            changed = _schedule_fused(sch)
    except Exception:  # noqa: BLE001 - a shape these rewrites do not fit keeps TVM's loop nest
        return func
    return sch.mod["main"] if changed else func


def schedule_float_kernels():
    """A module pass applying :func:`schedule_primfunc` to every PrimFunc but ours."""
    @tvm.transform.module_pass(opt_level=0, name="QcompileScheduleFloatKernels")
    def run(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc) and not gv.name_hint.startswith(("qgemm", FLOAT_BMM, ATTENTION)):
                new = schedule_primfunc(func)
                if new is not func:
                    mod[gv] = new
        return mod

    return run


def _gelu_te(x):
    half = tirx.const(0.5, x.dtype)
    erf = topi.fast_erf(topi.multiply(x, tirx.const(0.5 ** 0.5, x.dtype)))
    return topi.multiply(x, topi.add(half, topi.multiply(erf, half)))


# Float batch matmul (attention's Q·Kᵀ and P·V, which stay float in w8a8): register tiles of
# FMR rows x 2 vectors of 16 columns (8 zmm accumulators), the k loop inside the tile, B read
# along its rows (contiguous 16-float vectors), A broadcast one element at a time.
FMR, FNV = 4, 2


@functools.lru_cache(maxsize=None)   # parsing TVMScript takes seconds; a PrimFunc is immutable
def batch_matmul_kernel():
    """The TIR ``PrimFunc`` ``C[b, i, j] = sum_k A[b, i, k] * B[b, k, j]`` in float32, for
    ``A [batch, m, K]``, ``B [batch, K, N]``, ``C [batch, m, N]``, every dim symbolic (one kernel
    serves Q·Kᵀ and P·V at any batch and sequence). Rows outside the ``FMR``-row tiles run one at
    a time; columns outside the 32-column tiles run as scalars."""
    tile_n = FNV * VECTOR_LANES

    @T.macro
    def tile(A, B, C, bi, row0, mr, col0, kk_n, m, nd):
        acc = T.decl_buffer((mr * FNV * VECTOR_LANES,), "float32", scope="global")
        bv = T.decl_buffer((FNV * VECTOR_LANES,), "float32", scope="global")
        for t in T.unroll(mr * FNV):
            acc[T.ramp(t * VECTOR_LANES, 1, VECTOR_LANES)] = T.broadcast(T.float32(0), VECTOR_LANES)
        for kk in range(kk_n):
            for v in T.unroll(FNV):
                bv[T.ramp(v * VECTOR_LANES, 1, VECTOR_LANES)] = B.vload([bi, kk, col0 + v * VECTOR_LANES], "float32x16")
            for ii in T.unroll(mr):
                for v in T.unroll(FNV):
                    acc[T.ramp((ii * FNV + v) * VECTOR_LANES, 1, VECTOR_LANES)] = (
                        acc.vload([(ii * FNV + v) * VECTOR_LANES], "float32x16")
                        + T.broadcast(A[bi, row0 + ii, kk], VECTOR_LANES) * bv.vload([v * VECTOR_LANES], "float32x16"))
        for ii in T.unroll(mr):
            for v in T.unroll(FNV):
                C[T.ramp((bi * m + row0 + ii) * nd + col0 + v * VECTOR_LANES, 1, VECTOR_LANES)] = acc.vload(
                    [(ii * FNV + v) * VECTOR_LANES], "float32x16")

    @T.prim_func
    def bmm(a: T.handle, b: T.handle, c: T.handle):
        T.func_attr({"tir.noalias": True})
        nb = T.int64()
        m = T.int64()
        kd = T.int64()
        nd = T.int64()
        A = T.match_buffer(a, (nb, m, kd), "float32")
        B = T.match_buffer(b, (nb, kd, nd), "float32")
        C = T.match_buffer(c, (nb, m, nd), "float32")
        C1 = T.decl_buffer((nb * m * nd,), "float32", data=C.data)
        for bi in range(nb):
            for jo in range(nd // tile_n):
                for io in range(m // FMR):
                    tile(A, B, C1, bi, io * FMR, FMR, jo * tile_n, kd, m, nd)
                for r in range(m % FMR):
                    tile(A, B, C1, bi, m // FMR * FMR + r, 1, jo * tile_n, kd, m, nd)
            for i in range(m):
                for j in range(nd % tile_n):
                    C[bi, i, nd // tile_n * tile_n + j] = T.float32(0)
                    for kk in range(kd):
                        C[bi, i, nd // tile_n * tile_n + j] = (C[bi, i, nd // tile_n * tile_n + j]
                                                               + A[bi, i, kk] * B[bi, kk, nd // tile_n * tile_n + j])

    return bmm


def _batch_matmul(bb, call, kernels_added: dict):
    """``matmul(a, b)`` of two float32 rank-3 tensors with the same batch: a ``call_tir`` of the
    register-tiled kernel (:func:`batch_matmul_kernel`); None for any other matmul."""
    a, b = call.args
    ta, tb = a.ty, b.ty
    if not all(isinstance(t, relax.TensorType) and t.dtype == "float32" and t.ndim == 3 and t.shape is not None
               for t in (ta, tb)):
        return None
    (ba, m, ka), (bb_, kb, n) = ta.shape.values, tb.shape.values
    if not (tvm_ffi.structural_equal(ba, bb_) and tvm_ffi.structural_equal(ka, kb)):
        return None
    if "gv" not in kernels_added:
        kernels_added["gv"] = bb.add_func(batch_matmul_kernel().with_attr("global_symbol", FLOAT_BMM), FLOAT_BMM)
    return relax.call_tir(kernels_added["gv"], [a, b], out_ty=relax.TensorType([ba, m, n], "float32"))


# float32 ops rewritten through TVM's polynomial approximations: op name -> (block builder, call) -> new call
_FLOAT_REWRITES = {"relax.nn.gelu": lambda bb, c: bb.call_te(_gelu_te, c.args[0], primfunc_name_hint="gelu"),
                   "relax.nn.softmax": lambda bb, c: bb.call_te(topi.nn.fast_softmax, c.args[0], c.attrs.axis,
                                                                primfunc_name_hint="softmax"),
                   "relax.erf": lambda bb, c: bb.call_te(topi.fast_erf, c.args[0], primfunc_name_hint="erf"),
                   "relax.exp": lambda bb, c: bb.call_te(topi.fast_exp, c.args[0], primfunc_name_hint="exp")}


@mutator
class _RewriteFloatOps(PyExprMutator):
    """The mutator of :func:`rewrite_float_ops`."""

    added: dict  # the kernel GlobalVar once added, set per module by run()

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        if call.op.name == "relax.matmul":
            new = _batch_matmul(self.builder_, call, self.added)
            return call if new is None else new
        if call.op.name in _FLOAT_REWRITES:
            ty = call.args[0].ty
            # call_te needs a known shape expression (an eager-attention score whose shape the importer
            # left unknown has none): such a call keeps the default legalization
            if isinstance(ty, relax.TensorType) and ty.dtype == "float32" and isinstance(ty.shape, relax.ShapeExpr):
                return _FLOAT_REWRITES[call.op.name](self.builder_, call)
        return call


def rewrite_float_ops():
    """A Relax pass, before legalization: ``nn.gelu`` (the erf form), ``nn.softmax``, ``erf`` and
    ``exp`` on float32 through TVM's ``fast_erf`` / ``fast_exp`` / ``fast_softmax``, and float32
    batch matmuls through :func:`batch_matmul_kernel` (see the module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="QcompileRewriteFloatOps")
    def run(mod, _ctx):
        rw = _RewriteFloatOps(mod)
        rw.added = {}
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        return rw.builder_.get()

    return run


# FuseOps fuses elementwise producers into a reduction kernel (kCommReduce = 3), not into one
# TVM annotates "output-elementwise fusable" (4), as it does softmax and LayerNorm.
_REDUCTION_PATTERN = 3
_FUSE_PRODUCERS_INTO = ("softmax", "layer_norm")


def fuse_producers_into_norms():
    """A module pass between ``AnnotateTIROpPattern`` and ``FuseOps``: softmax and LayerNorm
    kernels marked as reductions, so the attention scale and mask (``x * c + mask``) fuse into
    the softmax and the residual ``add`` into the LayerNorm, one pass over the rows instead of two."""
    @tvm.transform.module_pass(opt_level=0, name="QcompileFuseProducersIntoNorms")
    def run(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith(_FUSE_PRODUCERS_INTO):
                mod[gv] = func.with_attr("op_pattern", _REDUCTION_PATTERN)
        return mod

    return run


def get_pipeline(target, parallel: bool = False):
    """TVM's CPU phases with :func:`rewrite_float_ops` before legalization,
    :func:`fuse_producers_into_norms` before fusion and :func:`schedule_float_kernels` after it;
    ``parallel``: the fused attention kernels run their heads as thread-pool tasks."""
    @tvm.transform.module_pass(opt_level=0, name="QcompileCPUPipeline")
    def run(mod, _ctx):
        with target:
            # TVM's legalize phase (cpu.legalize_passes) with our pattern change before FuseOps
            legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                        fuse_producers_into_norms(), relax.transform.FoldConstant(), relax.transform.FuseOps(),
                        relax.transform.FuseTIR()]
            # the importer's reshape chains (reshape of a reshape, to the same shape) cost a VM
            # make_shape + reshape call each per pass: collapse them, after the attention rewrite
            # (it matches the importer's own chains) and before anything is lowered
            tidy = [relax.transform.CanonicalizeBindings(), relax.transform.RemoveRedundantReshape(),
                    relax.transform.DeadCodeElimination()]
            seq = tvm.transform.Sequential([rewrite_attention(parallel)] + tidy + cpu.library_dispatch_passes(target)
                                           + [rewrite_float_ops()] + legalize
                                           + [schedule_float_kernels()] + cpu.dataflow_lower_passes(target)
                                           + cpu.finalize_passes(target))
            return seq(mod)

    return run
