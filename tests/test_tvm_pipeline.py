"""The tvm backend's Relax pipeline (qcompile/backends/tvm/pipeline.py): the fast-math rewrite
(GELU, softmax, erf, exp) and the float-kernel schedules (inlined elementwise chains, per-row
reductions, matmul loop order), each checked for structure and against torch, on symbolic shapes
that are not multiples of the 16-lane vectors, plus the cases they must leave alone."""
import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm", reason="the tvm backend needs the 'tvm' extra: pip install 'qcompile[tvm]'")

from tvm import relax, s_tir, tirx  # noqa: E402

from qcompile.backends.tvm import int8_gemm, pipeline  # noqa: E402
from qcompile.backends.tvm.host import compile_kernel, detect  # noqa: E402

TARGET = detect().target()


def _module(build, shapes, dtype="float32"):
    """A Relax module ``main(*inputs)`` whose body ``build(bb, *vars)`` emits; dims named by a
    string are symbolic."""
    bb = relax.BlockBuilder()
    syms = {}
    params = [relax.Var(f"x{i}", relax.TensorType([syms.setdefault(d, tirx.Var(d, "int64")) if isinstance(d, str) else d
                                                   for d in shape], dtype)) for i, shape in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, *arrays):
    ex = tvm.compile(mod, target=TARGET, relax_pipeline=pipeline.get_pipeline(TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def _ops(mod):
    names = set()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: names.add(e.op.name) if isinstance(e, relax.Call)
                                            and isinstance(e.op, tvm.ir.Op) else None)
    return names


def test_fast_math_rewrites_gelu_softmax_and_matches_torch():
    def body(bb, x):
        g = bb.emit(relax.op.nn.gelu(x))
        return relax.op.nn.softmax(bb.emit(relax.op.add(g, relax.op.exp(x))), axis=-1)

    mod = _module(body, [("b", "s", 37)])
    rewritten = pipeline.rewrite_float_ops()(mod)
    assert {"relax.nn.gelu", "relax.nn.softmax", "relax.exp"} & _ops(rewritten) == set()
    assert "relax.call_tir" in _ops(rewritten)
    x = np.random.default_rng(0).standard_normal((3, 5, 37)).astype(np.float32) * 4
    t = torch.from_numpy(x)
    ref = torch.softmax(torch.nn.functional.gelu(t) + torch.exp(t), dim=-1).numpy()
    np.testing.assert_allclose(_run(mod, x), ref, rtol=2e-6, atol=1e-7)


def test_fast_math_leaves_other_dtypes_alone():
    mod = _module(lambda bb, x: relax.op.nn.gelu(x), [(4, 8)], dtype="float64")
    assert "relax.nn.gelu" in _ops(pipeline.rewrite_float_ops()(mod))


def test_layer_norm_and_quantize_chain_match_torch():
    """LayerNorm → scale → round → clip → u8, the shape of an activation quantize after a norm:
    the schedule computes each row under one loop and inlines the elementwise tail."""
    def body(bb, x, w, b):
        y = bb.emit(relax.op.nn.layer_norm(x, w, b, axes=[-1], epsilon=1e-12))
        q = relax.op.clip(relax.op.add(relax.op.round(relax.op.multiply(y, relax.const(1 / 0.05, "float32"))),
                                       relax.const(128.0, "float32")), 0, 255)
        return relax.op.astype(q, "uint8")

    mod = _module(body, [("b", "s", 40), (40,), (40,)])
    rng = np.random.default_rng(1)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in [(2, 7, 40), (40,), (40,)])
    y = torch.nn.functional.layer_norm(torch.from_numpy(x), (40,), torch.from_numpy(w), torch.from_numpy(b), eps=1e-12)
    ref = torch.clamp(torch.round(y * (1 / 0.05)) + 128, 0, 255).to(torch.uint8).numpy()
    got = _run(mod, x, w, b)
    assert got.dtype == np.uint8 and np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert (got != ref).mean() < 0.01   # only codes at a rounding boundary may differ


def _legalized(mod):
    with TARGET:
        return tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                         relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)


def _primfuncs(mod):
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


def _block_names(func):
    sch = s_tir.Schedule(func)
    return [sch.get(b).name_hint for b in pipeline._blocks(sch)]


def test_elementwise_chain_is_inlined_into_one_loop_nest():
    def body(bb, x):
        return relax.op.multiply(relax.op.add(relax.op.multiply(x, x), relax.const(1.0, "float32")), x)

    funcs = _primfuncs(_legalized(_module(body, [("n", 19)])))
    (func,) = funcs.values()
    assert len(_block_names(func)) == 3
    assert len(_block_names(pipeline.schedule_primfunc(func))) == 1
    x = np.random.default_rng(2).standard_normal((5, 19)).astype(np.float32)
    np.testing.assert_allclose(_run(_module(body, [("n", 19)]), x), (x * x + 1) * x, rtol=1e-6)


@pytest.mark.parametrize("last", [32, 20])
def test_batch_matmul_loop_order_and_numerics(last):
    """P·V with a static head size: a multiple of 16 is vectorized explicitly, 20 is not;
    both keep the reduction outside the last spatial loop and match torch."""
    mod = _module(lambda bb, a, b: relax.op.matmul(a, b), [("h", "s", "s"), ("h", "s", last)])
    (func,) = [f for n, f in _primfuncs(_legalized(mod)).items() if n.startswith("matmul")]
    sched = pipeline.schedule_primfunc(func)
    assert {"matmul_init", "matmul_update"} <= set(_block_names(sched))
    sch = s_tir.Schedule(sched)
    kinds = [sch.get(loop).kind for b in pipeline._blocks(sch) for loop in sch.get_loops(b)]
    assert (tirx.ForKind.VECTORIZED in kinds) == (last % 16 == 0)
    rng = np.random.default_rng(3)
    a, b = rng.random((3, 13, 13), np.float32), rng.random((3, 13, last), np.float32)
    np.testing.assert_allclose(_run(mod, a, b), a @ b, rtol=1e-5)


def _calls_tir(mod, name):
    found = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call) and isinstance(
                e.op, tvm.ir.Op) and e.op.name == "relax.call_tir" and e.args[0].name_hint == name else None)
    return found


def test_rank3_float_matmuls_go_to_the_tiled_kernel_others_do_not():
    """Q·Kᵀ-like (K static, N symbolic) and P·V-like (K symbolic) matmuls call the tiled kernel;
    a rank-4 matmul and a broadcast batch stay ``relax.matmul`` (scheduled by the TIR pass)."""
    rng = np.random.default_rng(4)
    qk = _module(lambda bb, a, b: relax.op.matmul(a, b), [("h", "s", 32), ("h", 32, "s")])
    pv = _module(lambda bb, a, b: relax.op.matmul(a, b), [("h", "s", "s"), ("h", "s", 24)])
    for mod, (a_shape, b_shape) in [(qk, ((5, 37, 32), (5, 32, 37))), (pv, ((5, 37, 37), (5, 37, 24)))]:
        out = pipeline.rewrite_float_ops()(mod)
        assert len(_calls_tir(out, pipeline.FLOAT_BMM)) == 1 and "relax.matmul" not in _ops(out)
        a, b = rng.standard_normal(a_shape, np.float32), rng.standard_normal(b_shape, np.float32)
        np.testing.assert_allclose(_run(mod, a, b), a @ b, rtol=1e-5, atol=1e-5)
    four = _module(lambda bb, a, b: relax.op.matmul(a, b), [(2, 3, 9, 16), (2, 3, 16, 9)])
    bcast = _module(lambda bb, a, b: relax.op.matmul(a, b), [(4, 9, 16), (1, 16, 9)])
    for mod in (four, bcast):
        out = pipeline.rewrite_float_ops()(mod)
        assert not _calls_tir(out, pipeline.FLOAT_BMM) and "relax.matmul" in _ops(out)
    a, b = rng.standard_normal((4, 9, 16), np.float32), rng.standard_normal((1, 16, 9), np.float32)
    np.testing.assert_allclose(_run(bcast, a, b), a @ b, rtol=1e-5, atol=1e-5)


def test_residual_add_fuses_into_layer_norm():
    """add → LayerNorm is one kernel with the pattern change, two without it (TVM's default)."""
    def body(bb, x, r, w, b):
        return relax.op.nn.layer_norm(bb.emit(relax.op.add(x, r)), w, b, axes=[-1], epsilon=1e-12)

    mod = _module(body, [("b", 24), ("b", 24), (24,), (24,)])

    def fused(passes):
        with TARGET:
            out = tvm.transform.Sequential(passes)(mod)
        return sorted(_primfuncs(out))

    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern()]
    fuse = [relax.transform.FuseOps(), relax.transform.FuseTIR()]
    assert fused(legalize + [pipeline.fuse_producers_into_norms()] + fuse) == ["fused_add_layer_norm"]
    assert fused(legalize + fuse) == ["add", "layer_norm"]
    rng = np.random.default_rng(5)
    x, r, w, b = (rng.standard_normal(s).astype(np.float32) for s in [(6, 24), (6, 24), (24,), (24,)])
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x + r), (24,), torch.from_numpy(w), torch.from_numpy(b),
                                         eps=1e-12).numpy()
    np.testing.assert_allclose(_run(mod, x, r, w, b), ref, rtol=1e-5, atol=1e-5)


def test_integer_gemm_kernels_are_not_rescheduled():
    func = int8_gemm.gemm_kernel(64, 48, False, "generic")
    mod = tvm.IRModule({"qgemm_generic_k64_n48": func.with_attr("global_symbol", "qgemm_generic_k64_n48")})
    out = pipeline.schedule_float_kernels()(mod)
    assert out["qgemm_generic_k64_n48"].same_as(mod["qgemm_generic_k64_n48"])


def test_a_function_the_schedules_do_not_fit_is_returned_unchanged():
    """A matmul block with a single loop cannot be reordered: the function keeps TVM's loop nest."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def one_loop(a: T.Buffer((8,), "float32"), o: T.Buffer((1,), "float32")):
        for k in range(8):
            with T.sblock("matmul"):
                vk = T.axis.reduce(8, k)
                with T.init():
                    o[0] = T.float32(0)
                o[0] = o[0] + a[vk]

    assert pipeline.schedule_primfunc(one_loop) is one_loop


@pytest.mark.parametrize("b,m,k,n", [(2, 8, 32, 64), (3, 13, 32, 37), (2, 9, 7, 32), (1, 1, 5, 3)])
def test_float_batch_matmul_matches_numpy(b, m, k, n):
    """Full 4-row x 32-column tiles, remainder rows (13 = 3 tiles + 1), remainder columns (37 =
    one tile + 5 scalars; 3 = scalars only), K not a multiple of anything."""
    rng = np.random.default_rng(b * 100 + m + k + n)
    mod = compile_kernel(pipeline.batch_matmul_kernel())
    x, y = rng.standard_normal((b, m, k)).astype(np.float32), rng.standard_normal((b, k, n)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((b, m, n), np.nan, np.float32))
    mod["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), out)
    np.testing.assert_allclose(out.numpy(), x.astype(np.float64) @ y.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_float_batch_matmul_rejects_mismatched_shapes():
    mod = compile_kernel(pipeline.batch_matmul_kernel())
    x, y = np.zeros((2, 4, 8), np.float32), np.zeros((2, 7, 32), np.float32)
    with pytest.raises(Exception, match="(?i)shape|mismatch|match"):
        mod["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), tvm.runtime.tensor(np.zeros((2, 4, 32), np.float32)))
