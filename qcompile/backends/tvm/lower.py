"""Lower a converted qcompile model to a TVM Relax module and build it for the host CPU.

Steps: copy the Q/DQ graph → :class:`~.int4_a8.FuseInt4A8LinearPass` (int4 weights on int8
activations quantized per token and group) → :class:`~.int4.FuseInt4LinearPass` (int4 weight-only Linears) →
:class:`~.fuse.FuseInt8LinearPass` (integer GEMMs with packed weights) → :class:`~.conv.FuseInt8ConvPass`
(conv2d as im2col + the same GEMM) → :mod:`.epilogue`'s passes
(the static activation quantize after a GEMM or a LayerNorm fused into its kernel) → ``torch.export`` →
core ATen decompositions → a check that every op has a converter (naming the node that has
none) → ``relax.frontend.torch.from_exported_program`` with converters for qcompile's ops
(below) → ``tvm.compile`` for an LLVM target detected from the host.

The converters mirror the reference numerics (:mod:`qcompile.ops`, torchao's affine primitives)
op for op — ``round(x * (1 / scale)) + zero_point``, clamped — so codes match the reference
backend's; ``int8_linear`` becomes a ``call_tir`` of the kernel from :mod:`.int8_gemm` for the
weight's shape, its float epilogue fused inside the kernel.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from ...errors import BackendError, summarize
from ..base import check_kernels_took
from ...formats import get_format
from ...passes.infra import PassManager, prune_unused_tensors
from ...passes.lowering import FuseResult, ViewsAsReshapesPass
from . import int8_gemm
from .conv import FuseInt8ConvPass, Int8Conv2dConverter
from .epilogue import FuseEpiloguePass, FuseNormQuantizePass, LayerNormQuantizeConverter
from .fuse import FuseInt8LinearPass
from .int4 import FuseInt4LinearPass, Int4LinearConverter
from .int4_a8 import FuseInt4A8LinearPass, Int4A8LinearConverter
from .pipeline import get_pipeline


# The Q/DQ converters below see int8/uint8 tensors without groups only: qcompile.lower refuses
# every format and granularity tvm does not declare before backend code runs
# (base.check_capabilities; TvmBackend.lower and import_relax assume it ran, as the Backend
# protocol says), and import_relax refuses the declared kernel-only ones (uint4 per group, int8 per
# token and group) that no int4 kernel took (base.check_kernels_took).


def _f32(v: float):
    return relax.const(v, "float32")


def _quantize(node, imp):
    x, s = imp.env[node.args[0]], imp.env[node.args[1]]
    z = imp.env[node.args[2]] if node.args[2] is not None else None
    fmt = get_format(node.args[3])
    bb, op = imp.block_builder, relax.op
    q = op.round(op.multiply(x, op.divide(_f32(1.0), s)))
    if z is not None:
        q = op.add(q, op.astype(z, "float32"))
    q = op.clip(q, fmt.qmin, fmt.qmax)
    return bb.emit(op.astype(q, str(fmt.storage).replace("torch.", "")))


def _select(node, imp):
    """``x[..., i, ...]``. TVM's own converter takes ``i`` as it is, and a negative index (``h[:, -1]``,
    the last step of a sequence) read out of bounds: NaN or garbage on a dynamic sequence. ``wrap``
    counts it from the end, as torch does."""
    x, dim, index = imp.env[node.args[0]], node.args[1], node.args[2]
    return imp.block_builder.emit(relax.op.take(x, relax.const(index, "int64"), dim,
                                                mode="wrap" if index < 0 else "fast"))


def _dequantize(node, imp):
    q, s = imp.env[node.args[0]], imp.env[node.args[1]]
    z = imp.env[node.args[2]] if node.args[2] is not None else None
    op = relax.op
    if z is not None:
        x = op.astype(op.subtract(op.astype(q, "int32"), op.astype(z, "int32")), "float32")
    else:
        x = op.astype(q, "float32")
    return imp.block_builder.emit(op.multiply(x, s))


def _choose_qparams(node, imp):
    x = imp.env[node.args[0]]
    fmt_name, symmetric, per_token = node.args[1], node.args[2], node.args[3]
    fmt = get_format(fmt_name)
    op, bb = relax.op, imp.block_builder
    axis = [-1] if per_token else None
    lo = op.minimum(op.min(x, axis=axis, keepdims=per_token), _f32(0.0))
    hi = op.maximum(op.max(x, axis=axis, keepdims=per_token), _f32(0.0))
    eps = _f32(float(torch.finfo(torch.float32).eps))
    storage = str(fmt.storage).replace("torch.", "")
    if symmetric:
        amax = op.maximum(op.negative(lo), hi)
        if not fmt.signed:
            scale = op.maximum(op.divide(amax, _f32((fmt.qmax - fmt.qmin) / 2)), eps)
            zp = op.astype(op.add(op.multiply(scale, _f32(0.0)), _f32((fmt.qmin + fmt.qmax + 1) // 2)), storage)
        else:
            scale = op.maximum(op.divide(amax, _f32(fmt.qmax)), eps)
            zp = op.astype(op.multiply(scale, _f32(0.0)), storage)
    else:
        scale = op.maximum(op.divide(op.subtract(hi, lo), _f32(fmt.qmax - fmt.qmin)), eps)
        zp = op.clip(op.subtract(_f32(fmt.qmin), op.round(op.divide(lo, bb.emit(scale)))),
                     fmt.qmin, fmt.qmax)
        zp = op.astype(zp, storage)
    return bb.emit(relax.Tuple([bb.emit(scale), bb.emit(zp)]))


class _Int8Linear:
    """Converter for ``qcompile_tvm::int8_linear``: one kernel ``PrimFunc`` per (K, Np, per-row)."""

    def __init__(self, family: str, parallel: bool = False):
        self.family, self.parallel = family, parallel
        self.kernels: dict[tuple, object] = {}

    def __call__(self, node, imp):
        return self._emit(node, imp, None, [])

    def requantized(self, node, imp):
        """``qcompile_tvm::int8_linear_q`` (:mod:`.epilogue`): the same kernel with its epilogue
        extended by an activation and a static quantize; it returns codes."""
        activation, out_format = node.args[9], node.args[13]
        extra = [imp.env[x] for x in node.args[10:13]]   # per-column factor, 1 / scale, zero point
        return self._emit(node, imp, (activation, out_format), extra)

    def _emit(self, node, imp, epilogue, extra):
        op, bb = relax.op, imp.block_builder
        a, sa = imp.env[node.args[0]], imp.env[node.args[1]]
        za = imp.env[node.args[2]] if node.args[2] is not None else None
        packed, colsum, sw, bias = (imp.env[x] for x in node.args[3:7])
        n, a_format = node.args[7], node.args[8]
        k = int(packed.ty.shape[1]) * 4
        np_ = int(packed.ty.shape[0]) * 16
        packed = int8_gemm.family_weights(packed, imp.lifted_value(node.args[3]), self.family)
        if a.ty.shape is None:  # the importer lost the shape (e.g. after flatten): name its dims
            dims = [tirx.Var(f"{node.name}_d{i}", "int64") for i in range(a.ty.ndim - 1)]
            a = bb.match_cast(a, relax.TensorType([*dims, k], a.ty.dtype))
        lead = list(a.ty.shape.values[:-1])
        a2 = bb.emit(op.reshape(a, (-1, k)))
        if a_format == "int8":  # vpdpbusd is u8 x s8: shift codes and zero point by 128
            a2 = bb.emit(op.astype(op.add(op.astype(a2, "int16"), relax.const(128, "int16")), "uint8"))
        za = relax.const(0, "int32") if za is None else bb.emit(op.astype(za, "int32"))
        if a_format == "int8":
            za = bb.emit(op.add(za, relax.const(128, "int32")))
        sa_shape = [int(d) if isinstance(d, int) or hasattr(d, "value") else None for d in sa.ty.shape.values]
        per_row = not (all(d is not None for d in sa_shape) and int(torch.tensor(sa_shape).prod()) == 1)
        sa1 = bb.emit(op.reshape(sa, (-1,)))
        za1 = bb.emit(op.reshape(bb.emit(op.broadcast_to(za, sa.ty.shape)), (-1,)))
        key = (k, np_, per_row, epilogue)
        if key not in self.kernels:
            tail = "" if epilogue is None else f"_{epilogue[0]}_{epilogue[1]}"
            name = f"qgemm_{self.family.replace('-', '_')}_k{k}_n{np_}{'_row' if per_row else ''}{tail}"
            func = int8_gemm.gemm_kernel(k, np_, per_row, self.family, epilogue, self.parallel).with_attr("global_symbol", name)
            self.kernels[key] = bb.add_func(func, name)
        m = a2.ty.shape[0]
        out_dtype = "float32" if epilogue is None else epilogue[1]
        out = bb.emit(relax.call_tir(self.kernels[key], [a2, packed, colsum, sa1, za1, sw, bias, *extra],
                                     out_ty=relax.TensorType((m, np_), out_dtype)))
        if np_ != n:
            out = bb.emit(op.strided_slice(out, axes=[1], begin=[0], end=[n]))
        return bb.emit(op.reshape(out, (*lead, n)))


_BROADCASTING = {"add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "maximum.default", "minimum.default",
                 "where.self", "pow.Tensor_Tensor"}


def _pick(dim, chosen):
    """The dim an operand is cast to before a broadcasting op: ``chosen`` unless the operand's dim
    is a broadcast 1, already the same, or nothing was chosen."""
    if chosen is None or (isinstance(dim, tirx.IntImm) and int(dim) == 1):
        return dim
    if isinstance(chosen, int):
        return dim if isinstance(dim, tirx.IntImm) else chosen
    return dim if tvm_ffi.structural_equal(dim, chosen) else chosen


class _Importer(ExportedProgramImporter):
    """TVM's ExportedProgram importer, made to keep shapes it would lose: when a converted op's
    result has no shape (a broadcast against a reshaped symbolic dim), it is cast to the shape
    torch.export recorded for the node, so every later op can still be legalized."""

    symbols: dict = {}

    def create_input_vars(self, exported_program):
        params, inputs, ranges = super().create_input_vars(exported_program)
        # a dim torch.export specialized can still arrive as a SymInt whose expression is a
        # number; TVM then names a *symbol* "64", and ops that check a static dim against it
        # (layer_norm against its weight) lose their output shape and cannot be legalized
        for name, v in list(inputs.items()):
            dims = list(v.ty.shape.values) if v.ty.shape is not None else []
            fixed = [int(d.name) if isinstance(d, tirx.Var) and d.name.isdigit() else d for d in dims]
            if any(a is not b for a, b in zip(fixed, dims)):
                inputs[name] = relax.Var(name, relax.TensorType(fixed, v.ty.dtype))
        self.symbols = {d.name: d for v in inputs.values() for d in (v.ty.shape.values if v.ty.shape is not None else ())
                        if isinstance(d, tirx.Var)}
        # the values behind the parameter, buffer and constant placeholders (bound only after the
        # import), for converters that derive a kernel's constant from one (int8_gemm.family_weights)
        tensors = {**dict(exported_program.named_parameters()), **dict(exported_program.named_buffers()),
                   **exported_program.constants}
        self.lifted = {s.arg.name: tensors[s.target] for s in exported_program.graph_signature.input_specs
                       if s.target in tensors}
        return params, inputs, ranges

    def lifted_value(self, node):
        """The tensor behind ``node`` (an FX placeholder of a parameter, buffer or constant) as
        numpy, or None."""
        t = getattr(self, "lifted", {}).get(getattr(node, "name", None))
        return None if t is None else t.detach().numpy()

    def _slice(self, node):
        # x[:, :s] of a constant buffer (BERT's position ids): TVM infers min(s, 512) for the
        # length, a shape later passes cannot handle; torch.export checked the bound already
        x = self.env[node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else 0
        if dim < 0:   # strided_slice wants the axis non-negative (a decoder's mask is sliced on dim -1)
            node.args = (node.args[0], dim + x.ty.ndim, *node.args[2:])
        start = (node.args[2] if len(node.args) > 2 else None) or 0   # x[:, :s] passes None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        if isinstance(end, torch.fx.Node) and isinstance(start, int) and step == 1 and start == 0:
            return self.block_builder.emit(relax.op.strided_slice(
                x, [node.args[1]], [start], [self.env[end]], [1], assume_inbound=True))
        # x[:, 0:1] or x[:, 1:] of a symbolic dim (a decoder's mask and positions): TVM clamps the
        # bounds with min(1, s), whose shape function does not build (prim.if_then_else). When the
        # size torch.export recorded is the unclamped one, the slice is in bounds: say so
        axis, val, src = node.args[1], node.meta.get("val"), node.args[0].meta.get("val")
        if isinstance(start, int) and start >= 0 and step == 1 and isinstance(val, torch.Tensor) \
                and isinstance(src, torch.Tensor) and x.ty.shape is not None:
            if isinstance(end, torch.fx.Node):
                stop, stop_tvm = end.meta.get("val"), self.env[end]
            else:
                to_end = end >= src.shape[axis] if isinstance(src.shape[axis], int) else end >= 2 ** 62
                stop = src.shape[axis] if to_end else end
                stop_tvm = x.ty.shape.values[axis] if to_end else end
            if stop is not None and statically_known_true(val.shape[axis] == stop - start):
                return self.block_builder.emit(relax.op.strided_slice(
                    x, [axis], [start], [stop_tvm], [1], assume_inbound=True))
        return super()._slice(node)

    def _cumsum(self, node):
        # torch sums booleans as int64 (a decoder's packed-sequence check); TVM would keep bool and
        # LLVM cannot add it
        x, val = self.env[node.args[0]], node.meta.get("val")
        if x.ty.dtype == "bool" and isinstance(val, torch.Tensor) and "dtype" not in node.kwargs:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            out = str(val.dtype).removeprefix("torch.")
            return self.block_builder.emit(relax.op.cumsum(self.block_builder.emit(relax.op.astype(x, out)), dim))
        return super()._cumsum(node)

    def create_convert_map(self):
        return {name: self._keep_shape(f) for name, f in super().create_convert_map().items()}

    def _keep_shape(self, convert):
        def run(node):
            dims = self._broadcast_dims(node)
            if dims:  # cast operands to the static dims first, so the op itself legalizes
                for a in node.args:
                    v = self.env.get(a) if isinstance(a, torch.fx.Node) else None
                    if v is None or not isinstance(getattr(v, "ty", None), relax.TensorType):
                        continue
                    old = list(v.ty.shape.values)
                    new = [_pick(d, dims[len(dims) - len(old) + i]) for i, d in enumerate(old)]
                    if any(x is not y for x, y in zip(new, old)):
                        self.env[a] = self.block_builder.match_cast(v, relax.TensorType(new, v.ty.dtype))
            out = convert(node)
            ty = getattr(out, "ty", None)
            if not isinstance(ty, relax.TensorType):
                return out
            if ty.shape is not None and all(isinstance(d, (tirx.IntImm, tirx.Var)) for d in ty.shape.values):
                return out
            # no shape, or one like min(s53, 512): use the plain symbols torch.export recorded
            dims = self._recorded_dims(node)
            return self.block_builder.match_cast(out, relax.TensorType(dims, ty.dtype)) if dims else out
        return run

    def _broadcast_dims(self, node):
        # an elementwise op: torch checks at run time that the dims agree, so a static dim
        # other than 1 on either side is the result's (match_cast checks it again at run time)
        if node.op != "call_function" or node.target.__name__ not in _BROADCASTING:
            return None
        shapes = []
        for a in node.args:
            v = self.env.get(a) if isinstance(a, torch.fx.Node) else None
            if v is None:
                continue
            if not isinstance(getattr(v, "ty", None), relax.TensorType) or v.ty.shape is None:
                return None
            shapes.append(list(v.ty.shape.values))
        if len(shapes) < 2:
            return None
        rank = max(len(s) for s in shapes)
        dims = []
        for i in range(rank):
            cands = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
            static = [int(d) for d in cands if isinstance(d, tirx.IntImm) and int(d) != 1]
            named = [d for d in cands if isinstance(d, tirx.Var)]
            # a static dim, else a plain symbol (s53 rather than min(s53, 512))
            dims.append(static[0] if static else named[0] if named else None)
        return dims

    def _recorded_dims(self, node):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        dims = []
        for d in val.shape:
            if isinstance(d, int):
                dims.append(d)
            elif str(d) in self.symbols:
                dims.append(self.symbols[str(d)])
            else:
                return None
        return dims


def _unsupported(ep, convert_map) -> None:
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target.__name__ not in convert_map:
            stack = node.meta.get("nn_module_stack") or {}
            where = f" in module '{list(stack.values())[-1][0]}'" if stack else ""
            raise BackendError(f"node '{node.name}'{where}: TVM's PyTorch importer has no converter for "
                               f"'{node.target.__name__}'")


@dataclass(frozen=True)
class Fusions:
    """What :func:`import_relax`'s fusion passes did, as the artifact records it."""

    fused: list[str]           # Linear / conv nodes that run as qcompile kernels
    skipped: dict[str, str]    # the others the passes looked at -> why
    epilogues: list[str]       # int8_linear / layer_norm nodes whose kernel also quantizes


def import_relax(qmodel, family: str, parallel: bool = False) -> tuple:
    """(Relax IRModule, :class:`Fusions`): the converted graph of ``qmodel`` in Relax.
    ``parallel``: the integer GEMM kernels run their column panels as thread-pool tasks."""
    args, kwargs, dynamic_shapes = qmodel.export_example("the tvm backend")  # before the work: a clear error
    gm = copy.deepcopy(qmodel.graph_module)
    # int4 Linears first (on int8 activations, then weight-only): check_kernels_took names what is left
    pm = PassManager([FuseInt4A8LinearPass(), FuseInt4LinearPass()])
    pm(gm)
    a8, w4 = pm.results(FuseResult)
    check_kernels_took(gm, "tvm", {**w4.skipped, **a8.skipped})
    pm = PassManager([FuseInt8LinearPass(), FuseInt8ConvPass(), FuseEpiloguePass(), FuseNormQuantizePass()])
    pm(gm)
    gemm, conv, epilogue, norm = pm.results(FuseResult)
    fusions = Fusions(fused=[*a8.fused, *w4.fused, *gemm.fused, *conv.fused],
                      skipped={**w4.skipped, **a8.skipped, **gemm.skipped, **conv.skipped},  # an a8 Linear: the a8 pass's reason
                      epilogues=[*epilogue.fused, *norm.fused])
    prune_unused_tensors(gm)
    ViewsAsReshapesPass()(gm)   # the re-export may see other strides than the capture did
    with torch.no_grad():
        ep = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes).run_decompositions()
    drop_constant_inputs(ep)
    int8 = _Int8Linear(family, parallel)
    custom = {"quantize.default": _quantize, "dequantize.default": _dequantize, "select.int": _select,
              "choose_qparams.default": _choose_qparams, "int8_linear.default": int8,
              "int8_linear_q.default": int8.requantized, "layer_norm_q.default": LayerNormQuantizeConverter(),
              "int4_linear.default": Int4LinearConverter(), "int4_a8_linear.default": Int4A8LinearConverter(family),
              "int8_conv2d.default": Int8Conv2dConverter(family, parallel)}
    importer = _Importer()
    _unsupported(ep, set(importer.convert_map) | set(custom))
    try:
        mod = importer.from_exported_program(ep, False, False, False, custom)
    except BackendError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised as a qcompile error
        raise BackendError(f"TVM could not import the graph: {type(e).__name__}: {str(e).splitlines()[0][:400]}") from e
    return mod, fusions


def drop_constant_inputs(ep: torch.export.ExportedProgram) -> None:
    """Remove, in place, the user inputs torch.export specialised to a constant (a non-tensor keyword
    such as ``use_cache=False`` or a causal LM's ``kv_cache`` layout): their placeholders have no
    users, and Relax's importer reads a shape from every user input (``'str' object has no
    attribute 'shape'``). The artifact passes tensors only, so the compiled ``main`` never sees them."""
    from torch.export.graph_signature import ConstantArgument, InputKind

    specs = ep.graph_signature.input_specs
    constant = {s.arg.name for s in specs if s.kind is InputKind.USER_INPUT and isinstance(s.arg, ConstantArgument)}
    if not constant:
        return
    for node in list(ep.graph.nodes):
        if node.op == "placeholder" and node.name in constant and not node.users:
            ep.graph.erase_node(node)
    specs[:] = [s for s in specs if s.arg.name not in constant]
    ep.graph_module.recompile()


def input_bounds(mod) -> list:
    """The upper bounds the compiled ``main`` assumes for its inputs' symbolic dims, as
    ``[{"input": i, "name": param, "dim": d, "max": n}]``. They come from the ranges torch.export
    recorded (``tir_var_upper_bound``; BERT's sequence is at most its 512 position ids), and TVM
    plans memory to them: a larger input would overrun that memory, so the artifact checks these
    before every call."""
    func = mod["main"]
    attrs = func.attrs if func.attrs is not None else {}
    upper = {str(k): int(v) for k, v in dict(attrs.get("tir_var_upper_bound", {}) or {}).items()}
    bounds = []
    for i, param in enumerate(func.params):
        shape = getattr(param.ty, "shape", None)
        for d, dim in enumerate(shape.values if shape is not None else ()):
            if isinstance(dim, tirx.Var) and dim.name in upper:
                bounds.append({"input": i, "name": param.name, "dim": d, "max": upper[dim.name]})
    return bounds


def build(mod, target, parallel: bool = False):
    """Compile a Relax module: (executable, seconds); ``parallel`` as for :func:`import_relax`."""
    t0 = time.perf_counter()
    try:
        ex = tvm.compile(mod, target=target, relax_pipeline=get_pipeline(target, parallel))
    except BackendError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised as a qcompile error naming the Relax op
        raise BackendError(f"TVM could not build the graph: {_relax_op_at_fault(e)}{type(e).__name__}: "
                           f"{summarize(str(e), max_lines=2)}") from e
    return ex, time.perf_counter() - t0


def _relax_op_at_fault(error: Exception) -> str:
    """``legalizing relax op 'expand_dims': `` when the failure happened in one of TVM's legalization
    functions (``legalize_ops/<file>.py``, function ``_<op>``), else ``''``."""
    import traceback

    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if "legalize_ops" in frame.filename:
            return f"legalizing relax op '{frame.name.lstrip('_')}': "
    return ""
