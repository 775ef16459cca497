"""One fused float attention kernel, and the Relax rewrite that puts it in place of the
importer's attention.

What the importer emits for a BERT layer (``torch.export`` of ``scaled_dot_product_attention`` or
of the explicit ``softmax(Q·Kᵀ * c + mask)·V``): Q, K and V each ``[B·S, H·D] → reshape
[B, S, H·D] → reshape [B, S, H, D] → permute_dims [0, 2, 1, 3]``, Kᵀ one more ``permute_dims
[0, 1, 3, 2]``, each product operand a same-shape ``broadcast_to → reshape [B·H, ·, ·] →
matmul``, the scores ``reshape [B, H, S, S] → * c → + mask [B, 1, S, S] → softmax``, the
context ``reshape [B, H, S, D] → permute_dims [0, 2, 1, 3] → reshape [B, S, H·D]``. Four
transposes, two batch matmuls and a softmax kernel, with the ``[B, H, S, S]`` scores and
probabilities going through memory between them (25 MB each at batch 32 × 128 tokens).

:func:`attention_kernel` does it all in one loop nest, per (batch, head, tile of ``AMR`` query
rows), reading Q, K and V where the Linears wrote them (``[B·S, H·D]``: one head is ``D``
contiguous floats of a row) and writing the context where the output projection reads it:

1. once per (batch, head), one head of K transposed into a ``[D, S]`` buffer, so the Q·Kᵀ inner
   loop reads 16 consecutive keys at a time, and one head of V copied to a contiguous ``[S, D]``
   buffer (read in place, rows ``H·D`` floats apart, P·V ran 3x slower per sequence once the
   batch no longer fit in L2: measured at batch 2 against batch 1);
2. scores of the row tile, ``AMR`` rows × 32 keys in 8 zmm accumulators, ``* scale + mask`` fused
   into their store into a ``[AMR, S]`` row buffer (stays in L1: 2 KiB at S = 128);
3. softmax over each row as :func:`tvm.topi.nn.fast_softmax` computes it: max, then TVM's
   polynomial ``fast_exp`` of the max-subtracted score (same constants, same clamps), the sum;
4. P·V: ``AMR`` rows × ``D`` columns of accumulators, one row of the V copy loaded per key and
   broadcast-multiplied by each row's probability, the result scaled by ``1 / sum`` once per
   output element (``fast_softmax`` divides each probability: the two agree
   to float rounding).

The three buffers whose size depends on the symbolic sequence length are allocated per (sequence,
head), so each thread-pool task has its own (TVM puts a non-constant allocation on its workspace); the accumulators are ``global``-scope
stack buffers under 1 KiB, promoted to registers by LLVM (see :mod:`.int8_gemm`).

:func:`rewrite_attention` is a Relax pass (before legalization, before
:func:`~.pipeline.rewrite_float_ops`): it matches the pattern above exactly — float32, one mask
of shape ``[B, 1, S, S]`` or ``[B, 1, 1, S]`` added after the scale, ``D`` a multiple of 16, a
self-attention (Q, K and V from ``[B·S, H·D]`` or ``[B, S, H·D]`` tensors) — and leaves
everything else alone (another layout, no mask, a mask of another shape, a scale applied after
the mask, other dtypes).
"""
from __future__ import annotations

import functools

import numpy as np
import tvm
import tvm_ffi
from tvm import ir, relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import tirx as T
from tvm.sym.analyzer import Analyzer

AMR = 4          # query rows per tile
ANV = 2          # 16-float vectors of keys per Q·Kᵀ register tile (AMR x ANV accumulators)
ALANES = 16
ATTENTION = "attention_f32"   # name prefix of the kernel in the module

# topi.fast_exp's constants (float32): clamp, log2(e), ln(2), the degree-6 polynomial
_EXP_HI, _EXP_LO = 88.376266479492188, -88.376258850097656
_LOG2E, _LN2 = 1.4426950216293335, 0.69314718246459961
_EXP_P = (0.00019875691214110702, 0.0013981999363750219, 0.008333452045917511,
          0.041665796190500259, 0.1666666567325592, 0.5)


def fast_exp(x):
    """TVM's ``topi.fast_exp`` on one scalar float32 TIR expression, the same formula term for
    term: ``x`` clamped, ``n = floor(x log2 e + 1/2)``, ``f = x - n ln 2``, a degree-6 polynomial
    in ``f`` times ``2^n`` built from the exponent bits, and ``max(·, x)``. (Inside a
    ``T.vectorized`` loop it becomes vector code.)"""
    def c(v):
        return tirx.const(v, "float32")

    xc = tirx.max(tirx.min(x, c(_EXP_HI)), c(_EXP_LO))
    n = tirx.floor(xc * c(_LOG2E) + c(0.5))
    f = xc - n * c(_LN2)
    y = c(_EXP_P[0])
    for p in _EXP_P[1:]:
        y = y * f + c(p)
    y = y * f * f + f + c(1.0)
    bits = tirx.Cast("int32", n + c(127.0)) << tirx.const(23, "int32")
    return tirx.max(tirx.reinterpret("float32", bits) * y, x)


@functools.lru_cache(maxsize=None)   # parsing TVMScript takes seconds; a PrimFunc is immutable
def attention_kernel(heads: int, head_dim: int, scale: float, mask_rows: bool, parallel: bool = False):
    """The TIR ``PrimFunc`` of one attention, every tensor float32, batch ``b`` and sequence
    ``s`` symbolic. Arguments: ``mask [b, 1, s, s]`` (``[b, 1, 1, s]`` when not ``mask_rows``),
    ``Q``, ``K``, ``V`` ``[b·s, heads·head_dim]``, output ``[b, s, heads·head_dim]``::

        out[b, i, h·D + d] = sum_j softmax_j(Q[b·s+i, h·D:] · K[b·s+j, h·D:] * scale
                                             + mask[b, 0, i, j]) · V[b·s+j, h·D + d]

    ``head_dim`` must be a multiple of 16. ``parallel``: one task per (sequence, head) on TVM's
    thread pool; without it no tasks are launched (at batch 1, one thread, the launches and the
    per-head buffers cost about 9 %, measured)."""
    if head_dim % ALANES:
        raise ValueError(f"head_dim={head_dim} is not a multiple of {ALANES}")
    hn, dn = heads, head_dim
    hd = hn * dn
    dv = dn // ALANES           # vectors of one head's row
    tile = ANV * ALANES          # keys per Q·Kᵀ register tile
    mr_ = 1 if mask_rows else 0
    scale_c = float(scale)
    neg_inf = float("-inf")

    @T.macro
    def rows(Q, VH, M, O, KT, SC, bi, h, s, i0, mr):
        # 2. scores of rows i0 .. i0+mr, scaled and masked, into SC
        acc = T.decl_buffer((mr * ANV * ALANES,), "float32", scope="global")
        kv = T.decl_buffer((ANV * ALANES,), "float32", scope="global")
        for jo in range(s // tile):
            for t in T.unroll(mr * ANV):
                acc[T.ramp(t * ALANES, 1, ALANES)] = T.broadcast(T.float32(0), ALANES)
            for d in range(dn):
                for v in T.unroll(ANV):
                    kv[T.ramp(v * ALANES, 1, ALANES)] = KT.vload([d * s + jo * tile + v * ALANES], "float32x16")
                for ii in T.unroll(mr):
                    for v in T.unroll(ANV):
                        acc[T.ramp((ii * ANV + v) * ALANES, 1, ALANES)] = (
                            acc.vload([(ii * ANV + v) * ALANES], "float32x16")
                            + T.broadcast(Q[bi * s + i0 + ii, h * dn + d], ALANES) * kv.vload([v * ALANES], "float32x16"))
            for ii in T.unroll(mr):
                for v in T.unroll(ANV):
                    for l in T.vectorized(ALANES):
                        SC[ii * s + jo * tile + v * ALANES + l] = (
                            acc[(ii * ANV + v) * ALANES + l] * T.float32(scale_c)
                            + M[bi, 0, (i0 + ii) * mr_, jo * tile + v * ALANES + l])
        for ii in range(mr):
            for j in range(s % tile):
                SC[ii * s + s // tile * tile + j] = T.float32(0)
                for d in range(dn):
                    SC[ii * s + s // tile * tile + j] = (SC[ii * s + s // tile * tile + j]
                                                         + Q[bi * s + i0 + ii, h * dn + d] * KT[d * s + s // tile * tile + j])
                SC[ii * s + s // tile * tile + j] = (SC[ii * s + s // tile * tile + j] * T.float32(scale_c)
                                                     + M[bi, 0, (i0 + ii) * mr_, s // tile * tile + j])
        # 3. softmax numerator and 1 / sum per row
        red = T.decl_buffer((ALANES,), "float32", scope="global")
        inv = T.decl_buffer((mr,), "float32", scope="global")
        rmax = T.decl_buffer((1,), "float32", scope="global")
        for ii in range(mr):
            for l in T.vectorized(ALANES):
                red[l] = T.float32(neg_inf)
            for jv in range(s // ALANES):
                for l in T.vectorized(ALANES):
                    red[l] = T.max(red[l], SC[ii * s + jv * ALANES + l])
            rmax[0] = red[0]
            for l in range(1, ALANES):
                rmax[0] = T.max(rmax[0], red[l])
            for j in range(s % ALANES):
                rmax[0] = T.max(rmax[0], SC[ii * s + s // ALANES * ALANES + j])
            for l in T.vectorized(ALANES):
                red[l] = T.float32(0)
            for jv in range(s // ALANES):
                for l in T.vectorized(ALANES):
                    SC[ii * s + jv * ALANES + l] = fast_exp(SC[ii * s + jv * ALANES + l] - rmax[0])
                    red[l] = red[l] + SC[ii * s + jv * ALANES + l]
            for j in range(s % ALANES):
                SC[ii * s + s // ALANES * ALANES + j] = fast_exp(SC[ii * s + s // ALANES * ALANES + j] - rmax[0])
                red[0] = red[0] + SC[ii * s + s // ALANES * ALANES + j]
            for l in range(1, ALANES):
                red[0] = red[0] + red[l]
            inv[ii] = T.float32(1) / red[0]
        # 4. P·V: mr rows x D columns of accumulators, one row of V per key
        pacc = T.decl_buffer((mr * dv * ALANES,), "float32", scope="global")
        vv = T.decl_buffer((dv * ALANES,), "float32", scope="global")
        for t in T.unroll(mr * dv):
            pacc[T.ramp(t * ALANES, 1, ALANES)] = T.broadcast(T.float32(0), ALANES)
        for j in range(s):
            for v in T.unroll(dv):
                vv[T.ramp(v * ALANES, 1, ALANES)] = VH.vload([j * dn + v * ALANES], "float32x16")
            for ii in T.unroll(mr):
                for v in T.unroll(dv):
                    pacc[T.ramp((ii * dv + v) * ALANES, 1, ALANES)] = (
                        pacc.vload([(ii * dv + v) * ALANES], "float32x16")
                        + T.broadcast(SC[ii * s + j], ALANES) * vv.vload([v * ALANES], "float32x16"))
        for ii in T.unroll(mr):
            for v in T.unroll(dv):
                for l in T.vectorized(ALANES):
                    O[bi, i0 + ii, h * dn + v * ALANES + l] = pacc[(ii * dv + v) * ALANES + l] * inv[ii]

    heads_loop = T.parallel if parallel else T.serial

    @T.prim_func
    def attention(m: T.handle, q: T.handle, k: T.handle, v: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True})
        b = T.int64()
        s = T.int64()
        M = T.match_buffer(m, (b, 1, s if mask_rows else 1, s), "float32")
        Q = T.match_buffer(q, (b * s, hd), "float32")
        K = T.match_buffer(k, (b * s, hd), "float32")
        V = T.match_buffer(v, (b * s, hd), "float32")
        O = T.match_buffer(o, (b, s, hd), "float32")
        # per (sequence, head), a task on TVM's thread pool when parallel; each with its own
        # buffers sized by the symbolic sequence, on TVM's workspace
        for bh in heads_loop(b * hn):
            bi = bh // hn
            h = bh % hn
            KT = T.decl_buffer((dn * s,), "float32", scope="global")
            SC = T.decl_buffer((AMR * s,), "float32", scope="global")
            VH = T.decl_buffer((s * dn,), "float32", scope="global")
            # 1. one head of K transposed to [D, s]
            for j in range(s):
                for d in range(dn):
                    KT[d * s + j] = K[bi * s + j, h * dn + d]
            for j in range(s):
                for d in T.vectorized(dn):
                    VH[j * dn + d] = V[bi * s + j, h * dn + d]
            for io in range(s // AMR):
                rows(Q, VH, M, O, KT, SC, bi, h, s, io * AMR, AMR)
            for r in range(s % AMR):
                rows(Q, VH, M, O, KT, SC, bi, h, s, s // AMR * AMR + r, 1)

    return attention


def _call(expr, lookup, op: str):
    """The call of ``op`` bound to ``expr`` (a Var resolved through its binding), else None."""
    if isinstance(expr, relax.Var):
        expr = lookup(expr)
    if isinstance(expr, relax.Call) and isinstance(expr.op, ir.Op) and expr.op.name == op:
        return expr
    return None


def _shape(expr):
    """The static-rank shape (a list of PrimExprs) of a float32 tensor, else None."""
    ty = expr.ty
    if not (isinstance(ty, relax.TensorType) and ty.dtype == "float32" and ty.shape is not None):
        return None
    shape = ty.shape
    return list(shape.values) if isinstance(shape, relax.ShapeExpr) else None


def _same(a, b) -> bool:
    """Two shapes are equal, dim by dim (structurally, or provably for symbolic products)."""
    if a is None or b is None or len(a) != len(b):
        return False
    ana = Analyzer()
    return all(tvm_ffi.structural_equal(x, y) or ana.can_prove_equal(x, y) for x, y in zip(a, b))


def _int(x):
    """A static dim as an int, else None."""
    return int(x) if isinstance(x, tirx.IntImm) else None


def _skip_broadcast(expr, lookup):
    """``expr`` with a same-shape ``broadcast_to`` (a no-op the importer emits) looked through."""
    call = _call(expr, lookup, "relax.broadcast_to")
    if call is not None and _shape(call.args[0]) is not None and _same(_shape(call.args[0]), _shape(call)):
        return call.args[0]
    return expr


def _batched_operand(expr, lookup):
    """For a matmul operand ``reshape([B·H, a, b])`` of a (same-shape broadcast of a) ``[B, H, a, b]``
    tensor: that 4-d tensor, else None."""
    call = _call(expr, lookup, "relax.reshape")
    if call is None:
        return None
    inner = _skip_broadcast(call.args[0], lookup)
    s4, s3 = _shape(inner), _shape(call)
    if s4 is None or s3 is None or len(s4) != 4 or not _same(s3, [s4[0] * s4[1], s4[2], s4[3]]):
        return None
    return inner


def _head_source(expr, lookup, perm):
    """For ``permute_dims(reshape([B, S, H, D]) of x, perm)`` (Kᵀ: two permutes composed): ``(x, B,
    S, H, D)`` where ``x`` is the tensor before the reshapes (row-major ``[B·S, H·D]`` data), else
    None."""
    axes = [0, 1, 2, 3]
    cur = expr
    while True:
        call = _call(cur, lookup, "relax.permute_dims")
        if call is None:
            break
        if call.attrs.axes is None:
            return None
        step = [int(a) for a in call.attrs.axes]
        axes = [step[a] for a in axes]   # output axis a reads input axis step[a]
        cur = call.args[0]
    if axes != perm:
        return None
    call = _call(cur, lookup, "relax.reshape")
    if call is None:
        return None
    s4 = _shape(call)
    if s4 is None or len(s4) != 4 or _int(s4[2]) is None or _int(s4[3]) is None:
        return None
    b, s, h, d = s4
    flat = [b * s, h * d]
    x = call.args[0]
    # look through further reshapes towards the producer's own [B·S, H·D] tensor
    while _shape(x) is not None and not _same(_shape(x), flat):
        inner = _call(x, lookup, "relax.reshape")
        if inner is None:
            break
        x = inner.args[0]
    return x, b, s, _int(h), _int(d)


def _scalar_const(expr, lookup):
    """The float value of a scalar (or one-element) float32 constant, else None."""
    if isinstance(expr, relax.Var):
        bound = lookup(expr)
        expr = bound if bound is not None else expr
    if isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.ty, relax.TensorType) and expr.ty.dtype == "float32":
        arr = expr.value.numpy()
        if arr.size == 1:
            return float(arr.reshape(()))
    return None


def _reshaped_matmul(expr, lookup):
    """For ``reshape(matmul(a, b))`` bound to ``expr``: (the reshape, the matmul), else (None, None)."""
    view = _call(expr, lookup, "relax.reshape")
    mm = None if view is None else _call(view.args[0], lookup, "relax.matmul")
    return (view, mm) if mm is not None else (None, None)


def match_attention(root, lookup):
    """Match the importer's attention ending at ``root`` (the context ``reshape [B, S, H·D]``):
    a dict of the kernel's operands and parameters, or None when anything differs from the
    pattern in the module docstring."""
    out_shape = _shape(root)
    call = _call(root, lookup, "relax.reshape")
    if call is None or out_shape is None or len(out_shape) != 3:
        return None
    perm = _call(call.args[0], lookup, "relax.permute_dims")
    if perm is None or perm.attrs.axes is None or [int(a) for a in perm.attrs.axes] != [0, 2, 1, 3]:
        return None
    ctx4, pv = _reshaped_matmul(perm.args[0], lookup)             # [B, H, S, D] of the P·V matmul
    if pv is None:
        return None
    probs, v4 = _batched_operand(pv.args[0], lookup), _batched_operand(pv.args[1], lookup)
    if probs is None or v4 is None:
        return None
    sm = _call(probs, lookup, "relax.nn.softmax")
    if sm is None or int(sm.attrs.axis) not in (-1, 3):
        return None
    add = _call(sm.args[0], lookup, "relax.add")
    if add is None:
        return None
    scale_call, mask = None, None
    for scaled, other in (add.args, reversed(add.args)):
        for op in ("relax.multiply", "relax.divide"):
            if scale_call is None:
                scale_call, mask = _call(scaled, lookup, op), other
    if scale_call is None:
        return None
    c = _scalar_const(scale_call.args[1], lookup)
    if c is None or c == 0 or not np.isfinite(c):
        return None
    scale = c if scale_call.op.name == "relax.multiply" else float(np.float32(1) / np.float32(c))
    sc4, qk = _reshaped_matmul(scale_call.args[0], lookup)       # [B, H, S, S] of the Q·Kᵀ matmul
    if qk is None:
        return None
    q4, kt4 = _batched_operand(qk.args[0], lookup), _batched_operand(qk.args[1], lookup)
    if q4 is None or kt4 is None:
        return None
    srcs = [_head_source(q4, lookup, [0, 2, 1, 3]), _head_source(kt4, lookup, [0, 2, 3, 1]),
            _head_source(v4, lookup, [0, 2, 1, 3])]
    if any(src is None for src in srcs):
        return None
    (q, b, s, h, d), (k, *kdims), (v, *vdims) = srcs
    if h is None or d is None or d % ALANES or not all(_same([b, s], x[:2]) and x[2:] == [h, d] for x in (kdims, vdims)):
        return None
    if not _same(out_shape, [b, s, h * d]):
        return None
    # the 4-d views between the products must be the [B, H, S, ·] the heads were split into
    if not (_same(_shape(sc4), [b, h, s, s]) and _same(_shape(probs), [b, h, s, s])
            and _same(_shape(ctx4), [b, h, s, d])):
        return None
    ms = _shape(mask)
    if ms is None or len(ms) != 4 or not _same([ms[0], ms[1], ms[3]], [b, 1, s]):
        return None
    if _same([ms[2]], [s]):
        mask_rows = True
    elif _same([ms[2]], [1]):
        mask_rows = False
    else:
        return None
    for x in (q, k, v):
        if _shape(x) is None:
            return None
    return {"q": q, "k": k, "v": v, "mask": mask, "batch": b, "seq": s, "heads": h, "head_dim": d,
            "scale": float(np.float32(scale)), "mask_rows": mask_rows}


@mutator
class _RewriteAttention(PyExprMutator):
    """The mutator of :func:`rewrite_attention`."""

    kernels: dict  # (heads, head_dim, scale, mask_rows) -> GlobalVar, set per module by run()
    parallel: bool  # the kernels' heads as thread-pool tasks, set by run()

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.reshape"):
            return call
        m = match_attention(call, self.lookup_binding)
        if m is None:
            return call
        key = (m["heads"], m["head_dim"], m["scale"], m["mask_rows"])
        if key not in self.kernels:
            name = f"{ATTENTION}_h{key[0]}_d{key[1]}_{len(self.kernels)}"
            func = attention_kernel(*key, self.parallel).with_attr("global_symbol", name)
            self.kernels[key] = self.builder_.add_func(func, name)
        bs, hd = m["batch"] * m["seq"], m["heads"] * m["head_dim"]
        ops = []
        for x in (m["q"], m["k"], m["v"]):
            if not _same(_shape(x), [bs, hd]):
                x = self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr([bs, hd])))
            ops.append(x)
        return relax.call_tir(self.kernels[key], [m["mask"], *ops],
                              out_ty=relax.TensorType([m["batch"], m["seq"], hd], "float32"))


def rewrite_attention(parallel: bool = False):
    """A Relax pass, before legalization: every attention that :func:`match_attention` matches
    becomes one ``call_tir`` of :func:`attention_kernel` (one kernel per head count, head size,
    scale and mask shape), and the transposes, matmuls and softmax it replaces are dropped
    (dead-code elimination) unless something else reads them."""

    @tvm.transform.module_pass(opt_level=0, name="QcompileRewriteAttention")
    def run(mod, _ctx):
        rw = _RewriteAttention(mod)
        rw.kernels = {}
        rw.parallel = parallel
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        new = rw.builder_.get()
        return relax.transform.DeadCodeElimination()(new) if rw.kernels else new

    return run
