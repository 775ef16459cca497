"""Lower a converted qcompile model to an ONNX file with standard QuantizeLinear/DequantizeLinear.

Steps: copy the Q/DQ graph → :class:`TransposeLinearWeightsPass` (so a weight's DequantizeLinear
feeds MatMul directly, the pattern onnxruntime's QDQ fusion looks for, instead of DQ → Transpose
→ MatMul) → ``torch.export`` → ``torch.onnx.export(dynamo=True)`` with :mod:`.translate` for the
qcompile ops → ``onnx.checker``."""
from __future__ import annotations

import copy
import io
import linecache
import operator
import re
from typing import Optional

import torch

from ...budget import BudgetExceeded, time_budget
from ...capture import batch_only, describe_dynamic
from ...errors import BackendError, summarize
from ..base import node_module
from ...ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE
from ...passes.infra import Pass, PassManager, PassResult, add_tensor, constant_value, get_attr_tensor, prune_unused_tensors
from ...passes.lowering import FuseResult, GatherBeforeDequantizePass, quantized_linears
from ...cpu import cpu_info
from . import contrib, translate
from .cache_update import cache_blends_as_scatter
from .rewrites import residual_adds_as_sum, rsqrt_scale_as_div
from .contrib import MATMUL_INTEGER_TO_FLOAT, MATMUL_NBITS
from .weights import Int8WeightsAsUint8Pass, resolve_int8_weights

aten = torch.ops.aten
OPSET = 21  # blocked Q/DQ and 4-bit types need 21; plain int8 Q/DQ runs on every opset >= 13


class TransposeLinearWeightsPass(Pass):
    """``linear(x, dequantize(Wq[N,K], s[N,1]), b)`` ⇒ ``matmul(x, dequantize(Wq^T[K,N], s^T[1,N])) + b``."""

    name = "transpose_linear_weights"

    def call(self, gm):
        modified = False
        for node in list(gm.graph.nodes):
            if node.target != aten.linear.default:
                continue
            dq = node.args[1]
            if getattr(dq, "target", None) != DEQUANTIZE or dq.args[4] != 0 or len(dq.users) != 1:
                continue
            q, s, z = (get_attr_tensor(gm, a) for a in dq.args[:3])
            if q is None or s is None or q.dim() != 2:
                continue
            args = [add_tensor(gm, f"{dq.args[0].target}_t", q.t().contiguous(), dq)]
            args.append(add_tensor(gm, f"{dq.args[1].target}_t", s.t().contiguous() if s.dim() == 2 else s, dq))
            args.append(None if z is None else add_tensor(gm, f"{dq.args[2].target}_t",
                                                          z.t().contiguous() if z.dim() == 2 else z, dq))
            with gm.graph.inserting_before(node):
                new_dq = gm.graph.call_function(DEQUANTIZE, (*args, *dq.args[3:]))
                out = gm.graph.call_function(aten.matmul.default, (node.args[0], new_dq))
                if len(node.args) > 2 and node.args[2] is not None:
                    out = gm.graph.call_function(aten.add.Tensor, (out, node.args[2]))
            new_dq.meta, out.meta = dict(dq.meta), dict(node.meta)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            modified = True
        return PassResult(gm, modified)


class FuseOnnxruntimeKernelsPass(Pass):
    """Rewrite quantized Linears into onnxruntime's fused contrib kernels (see :mod:`.contrib`):

    * ``linear(dequantize(quantize(x, s_a)), dequantize(W_q int8, s_w), b)`` with a static
      per-tensor activation scale ⇒ ``MatMulIntegerToFloat(quantize(x), W_q^T, s_a, s_w, z_a, z_w, b)``
      (the int8 GEMM with dequantization and bias in its epilogue);
    * ``linear(x, dequantize(W_q 4-bit, s_w, z_w), b)`` ⇒ ``MatMulNBits`` (per group of a power of two
      >= 16, or per channel as one zero-padded block per row); ``x`` may itself be a Q/DQ pair (w4a8).

    Anything else keeps the standard Q/DQ form. Returns a :class:`FuseResult`: ``fused`` maps each
    rewritten Linear to its contrib op, ``skipped`` each other Linear to why it did not fire (the
    negative cases tests pin)."""

    name = "fuse_onnxruntime_kernels"

    def __init__(self, nbits_accuracy_level: int = 0, concatenate_shared: bool = False):
        self.nbits_accuracy_level = nbits_accuracy_level
        self.concatenate_shared = concatenate_shared

    def call(self, gm):
        fused: dict[str, str] = {}    # linear node -> contrib op
        skipped: dict[str, str] = {}  # linear node -> reason
        shared: dict = {}  # quantize node -> int8 Linears reading its codes (Q/K/V share one)
        for node, x, w_dq, bias in quantized_linears(gm, skipped):
            w_fmt = w_dq.args[3]
            if w_fmt in ("int8", "uint8"):
                reason = self._integer_matmul_operands(gm, node, x, w_dq, bias)
                if not isinstance(reason, str):
                    shared.setdefault(x.args[0], []).append(reason)
                    reason = None
                elif self._int8_nbits_applies(x):
                    reason = self._nbits(gm, node, x, w_dq, bias, bits=8)
                    if reason is None:
                        fused[node.name] = "MatMulNBits (8 bits)"
            elif w_fmt in ("int4", "uint4"):
                reason = self._nbits(gm, node, x, w_dq, bias)
                if reason is None:
                    fused[node.name] = "MatMulNBits"
            else:
                reason = f"weight format '{w_fmt}' has no onnxruntime kernel"
            if reason:
                skipped[node.name] = reason
        for q, linears in shared.items():
            fused.update(self._integer_matmul(gm, q, linears))
        return FuseResult.of(gm, fused, skipped)

    def _integer_matmul_operands(self, gm, node, x, w_dq, bias):
        """(node, activation dq, W_q, s_w, z_w, bias tensor) or the reason it cannot fuse."""
        if getattr(x, "target", None) != DEQUANTIZE or getattr(x.args[0], "target", None) != QUANTIZE:
            return "activation not quantized (weight-only int8 stays DequantizeLinear -> MatMul)"
        s_a = get_attr_tensor(gm, x.args[1])
        if s_a is None or s_a.numel() != 1:
            return "activation scale is not a static per-tensor constant (MatMulIntegerToFloat needs one)"
        if w_dq.args[4] != 0:
            return "int8 weights per group"
        wq, sw, zw = get_attr_tensor(gm, w_dq.args[0]), *(constant_value(gm, a) for a in w_dq.args[1:3])
        if wq is None or wq.dim() != 2:
            return "weight is not a 2-D constant"
        if sw is None or (w_dq.args[2] is not None and zw is None):
            return "scales depend on the model's inputs"
        b = get_attr_tensor(gm, bias) if bias is not None else None
        if bias is not None and b is None:
            return "bias is not a constant"
        n = wq.shape[0]
        return (node, x, wq, sw.reshape(-1).expand(n).float(), None if zw is None else zw.reshape(-1).expand(n), b)

    def _integer_matmul(self, gm, q, linears) -> dict[str, str]:
        """One MatMulIntegerToFloat per Linear, all reading the same quantized codes; with
        ``concatenate_shared``, one for all of them (Q/K/V: one GEMM with N = 3 x hidden; the
        integer math per output column is unchanged) followed by a Split. Off by default: on
        MiniLM the Split's strided copy cost more than the two GEMM calls it saves (see
        docs/onnx.md). Weights with and without zero points do not mix. Returns linear node -> op."""
        fused = {}
        same_kind = len({z is None for *_, z, _ in linears}) == 1
        groups = [linears] if self.concatenate_shared and same_kind else [[lin] for lin in linears]
        for group in groups:
            first, x = group[0][0], group[0][1]
            name = "_".join(n.name for n, *_ in group)
            w = add_tensor(gm, f"{name}_w_t", torch.cat([g[2] for g in group]).t().contiguous(), first)
            s = add_tensor(gm, f"{name}_w_scale", torch.cat([g[3] for g in group]).contiguous(), first)
            z = None if group[0][4] is None else \
                add_tensor(gm, f"{name}_w_zero_point", torch.cat([g[4] for g in group]).contiguous(), first)
            if any(g[5] is not None for g in group):
                biases = [g[5] if g[5] is not None else torch.zeros(g[2].shape[0]) for g in group]
                b = add_tensor(gm, f"{name}_bias", torch.cat(biases).float(), first)
            else:
                b = None
            with gm.graph.inserting_before(first):
                out = gm.graph.call_function(MATMUL_INTEGER_TO_FLOAT, (q, w, x.args[1], s, x.args[2], z, b))
                out.meta = dict(first.meta)
                if len(group) > 1:
                    sizes = [g[2].shape[0] for g in group]
                    parts = gm.graph.call_function(aten.split_with_sizes.default, (out, sizes, -1))
                    outs = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(group))]
                else:
                    outs = [out]
            for (node, *_), o in zip(group, outs):
                node.replace_all_uses_with(o)
                gm.graph.erase_node(node)
                fused[node.name] = "MatMulIntegerToFloat" + (f" (x{len(group)} concatenated)" if len(group) > 1 else "")
        return fused

    def _int8_nbits_applies(self, x) -> bool:
        """An int8 weight on float activations runs as 8-bit MatMulNBits when its kernel's int8
        activations are the model's (``-a8`` blocks) or were asked for (accuracy level 4): MLAS
        has a fast 8-bit kernel only at level 4 (at levels 0/1 it dequantizes the whole weight on
        every call: ~70x slower than level 4 on SmolLM2's 49152 x 576 head, docs/generate.md)."""
        return _per_token_group_int8(x) is not None or (self.nbits_accuracy_level == 4 and
                                                        getattr(x, "target", None) != DEQUANTIZE)

    def _nbits(self, gm, node, x, w_dq, bias, bits: int = 4):
        wq, sw, zw = get_attr_tensor(gm, w_dq.args[0]), *(constant_value(gm, a) for a in w_dq.args[1:3])
        if wq is None or wq.dim() != 2:
            return "weight is not a 2-D constant"
        if sw is None or (w_dq.args[2] is not None and zw is None):
            return "scales depend on the model's inputs"
        n, k = wq.shape
        group = w_dq.args[4]
        blocked = _per_token_group_int8(x)
        if group == 0 and bits == 8:  # per channel: blocks along K that divide it, each with the row's scale
            group = blocked[1] if blocked is not None else next((g for g in (128, 64, 32, 16) if k % g == 0),
                                                                max(16, 1 << (k - 1).bit_length()))
            blocks = -(-k // group)
            sw = sw.reshape(-1).expand(n).reshape(n, 1).expand(n, blocks)
            zw = None if zw is None else zw.reshape(-1).expand(n).reshape(n, 1).expand(n, blocks)
        elif group == 0:  # per channel (or tensor): one block per row, the next power of two >= K, zero-padded
            group = max(16, 1 << (k - 1).bit_length())
            sw = sw.reshape(-1).expand(n)
            zw = None if zw is None else zw.reshape(-1).expand(n).reshape(n, 1)
        elif group < 16 or group & (group - 1):
            return f"group size {group} (MatMulNBits needs a power of two >= 16)"
        level = self.nbits_accuracy_level
        if blocked is not None:  # w4-g*-a8: the kernel's own int8 activation blocks (accuracy level 4)
            src, act_group = blocked
            if act_group != group:
                return (f"activation blocks of {act_group} along K differ from the weight's {group} "
                        "(MatMulNBits quantizes activations per weight block)")
            x, level = src, 4
        elif _is_dynamic_grouped(x):
            return ("dynamic per-token-group activations that are not symmetric int8 "
                    "(MatMulNBits' accuracy level 4 quantizes them so)")
        codes, zp = wq.to(torch.int16), zw
        if w_dq.args[3] in ("int4", "int8"):   # signed codes: shift around onnxruntime's default zero point
            middle = 1 << (bits - 1)            # 8 (4 bits), 128 (8 bits)
            codes = codes + middle
            zp = None if zw is None else zw.to(torch.int16) + middle
        elif w_dq.args[3] == "uint8" and zp is None:   # the default zero point would be 128, not 0
            zp = torch.zeros(sw.shape, dtype=torch.int16)
        b = add_tensor(gm, f"{w_dq.args[0].target}_nbits", contrib.pack_nbits(codes, group, bits), node)
        s = add_tensor(gm, f"{w_dq.args[1].target}_nbits", sw.float().reshape(-1).contiguous(), node)
        zp_packed = None if zp is None else (zp.to(torch.uint8).contiguous() if bits == 8 else contrib.pack_zero_points(zp))
        zp_name = f"{w_dq.args[2].target}_nbits" if w_dq.args[2] is not None else f"{w_dq.args[0].target}_nbits_zp"
        z = None if zp is None else add_tensor(gm, zp_name, zp_packed, node)
        with gm.graph.inserting_before(node):
            out = gm.graph.call_function(MATMUL_NBITS, (x, b, s, z, k, n, bits, group, level))
            if bias is not None:
                out = gm.graph.call_function(aten.add.Tensor, (out, bias))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        return None


_NODE_IN_MESSAGE = re.compile(r"(?:node|translating node) %?'?([A-Za-z_][\w]*)")


def export_failure(e: Exception, gm, dynamic_shapes) -> BackendError:
    """A failed ``torch.onnx.export`` as a :class:`BackendError` a user can act on: the exporter's
    summary (its ``## Exception summary`` when it has one, else its first meaningful lines; no
    terminal colour codes, no generic advice), the node and module it names when the graph has
    that node, and the next step."""
    text = str(e)
    marker = "## Exception summary"
    body = text.split(marker, 1)[1] if marker in text else text
    body = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", body)
    summary = summarize(body)
    nodes = {n.name: n for n in gm.graph.nodes}
    where = ""
    for name in _NODE_IN_MESSAGE.findall(summarize(text, max_lines=100, max_chars=100_000)):
        if name in nodes:
            where = f" at node '{name}' of {node_module(nodes[name])}"
            break
    if re.search(r"no onnx function|no decompositions|not supported|unsupported", text, re.IGNORECASE):
        hint = ("that op has no ONNX translation: lower with another backend (reference, tvm), or register "
                "an ONNX function for it with torch.onnx's custom_translation_table")
    elif re.search(r"guard|symbolic|sympy|decompose|constraint", text, re.IGNORECASE) and \
            describe_dynamic(dynamic_shapes) != "none (static shapes)":
        hint = (f"dynamic dims ({describe_dynamic(dynamic_shapes)}) the exporter cannot handle: quantize with "
                f"static dims there, e.g. dynamic_shapes={batch_only(dynamic_shapes)}")
    else:
        hint = "lower with target='qdq' or another backend, or keep that module float with an override"
    return BackendError(f"onnx: torch.onnx.export failed{where}: {summary}\nhint: {hint}")


_ASSIGNED = re.compile(r"^\s*(\w+) = ")


def _stopped_at(stop: BudgetExceeded, gm) -> str:
    """`` (stopped at node 'n' of module 'm' (Type))`` for the innermost frame of ``stop``'s frames
    that was working on a node of ``gm``: a line of the graph's generated ``forward`` (torch.export
    runs it; the line assigns the node's name) or an interpreter's ``n`` / ``node`` local (the
    exporter's passes). ``''`` when the budget ran out before any node."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for frame in stop.frames():
        name = None
        if "eval_with_key" in frame.f_code.co_filename:
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
            m = _ASSIGNED.match(line)
            name = m.group(1) if m else None
        else:
            local = frame.f_locals.get("n", frame.f_locals.get("node"))
            name = local.name if isinstance(local, torch.fx.Node) else None
        if name in nodes:
            return f" (stopped at node '{name}' of {node_module(nodes[name])})"
    return ""


def _check_no_grouped_dynamic(gm, target: str, skipped: dict) -> None:
    """Per-token-group activations (``w4-g*-a8``) exist in ONNX only inside MatMulNBits: name the
    first one left over and why its Linear did not fuse."""
    for node in gm.graph.nodes:
        if node.target == CHOOSE_QPARAMS and len(node.args) > 4 and node.args[4]:
            users = [u for u in node.users for u in u.users for u in u.users if u.target == aten.linear.default]
            why = "; ".join(f"{u.name}: {skipped[u.name]}" for u in users if u.name in skipped)
            raise NotImplementedError(
                f"onnx (target '{target}'): node '{node.name}' of {node_module(node)} quantizes activations per token "
                f"and per group of {node.args[4]} at run time; ONNX has that only inside "
                "com.microsoft::MatMulNBits (accuracy level 4, target 'onnxruntime', 4-bit weights in groups of the "
                "same size)" + (f" and this Linear did not fuse ({why})" if why else "")
                + "; a standalone per-token-group QuantizeLinear is not built")


def _is_dynamic_grouped(x) -> bool:
    """``x`` is ``dequantize(quantize(...))`` with a group size and a scale computed at run time."""
    return getattr(x, "target", None) == DEQUANTIZE and x.args[4] > 0 and _choose_qparams_of(x.args[1]) is not None


def _choose_qparams_of(scale):
    if getattr(scale, "target", None) is operator.getitem and getattr(scale.args[0], "target", None) == CHOOSE_QPARAMS:
        return scale.args[0]
    return None


def _per_token_group_int8(x):
    """``(source, group)`` when ``x = dequantize(quantize(src, s, z, int8, g), s, z, int8, g)`` with
    ``s, z = choose_qparams(src, int8, symmetric, per_token, g)``: the activation quantization
    onnxruntime's MatMulNBits does itself at accuracy level 4 (MLAS ``QuantizeARow_CompInt8``: per
    block of K, scale = amax / 127, round to nearest even); else None."""
    if getattr(x, "target", None) != DEQUANTIZE or getattr(x.args[0], "target", None) != QUANTIZE:
        return None
    q = x.args[0]
    qp = _choose_qparams_of(q.args[1])
    if qp is None or len(qp.args) < 5:
        return None
    src, fmt, symmetric, per_token, group = qp.args[:5]
    if not (fmt == "int8" and symmetric and per_token and group > 0 and q.args[0] is src
            and q.args[3] == x.args[3] == "int8" and q.args[4] == x.args[4] == group
            and x.args[1] is q.args[1] and _choose_qparams_of(q.args[2]) is qp):
        return None
    return src, group


TARGETS = ("onnxruntime", "qdq")
EXPORT_BUDGET_S = 600.0   # seconds torch.export + torch.onnx.export may take before a BackendError (None: no limit)
# metadata_props of the written file: the int8 weight type chosen for this host, and why
INT8_WEIGHTS_KEY, INT8_WEIGHTS_REASON_KEY = "qcompile.int8_weights", "qcompile.int8_weights_reason"


def export_onnx(qmodel, opset: int = OPSET, target: str = "onnxruntime",
                nbits_accuracy_level: int = 0, keep_metadata: bool = False,
                concatenate_shared: bool = False, int8_weights: str = "auto",
                budget_s: Optional[float] = None) -> tuple[bytes, list[str]]:
    """(ONNX model bytes, input names) for a :class:`~qcompile.model.QuantizedModel`.

    ``target="onnxruntime"`` (default) emits onnxruntime's fused contrib kernels where they are
    faster (:class:`FuseOnnxruntimeKernelsPass`); ``target="qdq"`` emits only standard ONNX
    QuantizeLinear/DequantizeLinear, for other runtimes. ``nbits_accuracy_level``: MatMulNBits'
    ``accuracy_level``: 0 computes with float activations, as the weight-only recipe says (the
    reference's numerics); 4 lets onnxruntime quantize activations to int8 inside the kernel
    (faster, a different model: opt in). ``keep_metadata``: keep the exporter's per-node source
    metadata (stack traces, module scopes). ``concatenate_shared``: Linears reading the same
    quantized codes (Q/K/V) run as one concatenated GEMM + Split instead of one GEMM each.
    ``int8_weights``: the type int8 weights of Linears/convs on uint8 activations take in the file:
    ``"auto"`` (default) picks ``"uint8"`` (zero point + 128, the same values) on x86 hosts without
    VNNI, where onnxruntime's u8 x s8 kernels saturate, else ``"int8"`` (see :mod:`.weights`); the
    choice and its reason are in the file's ``metadata_props`` (``qcompile.int8_weights``,
    ``qcompile.int8_weights_reason``), for both targets: the ``qdq`` file runs in onnxruntime too.
    ``budget_s`` (default :data:`EXPORT_BUDGET_S`): an export still running after it stops with a
    :class:`BackendError` naming the dynamic inputs and dims (see ``budget.time_budget``)."""
    if target not in TARGETS:
        raise BackendError(f"unknown onnx target '{target}'; choose one of {', '.join(TARGETS)}")
    args, kwargs, dynamic_shapes = qmodel.export_example(f"the onnx backend (target '{target}')")
    weight_type, why = resolve_int8_weights(int8_weights, cpu_info())
    gm = copy.deepcopy(qmodel.graph_module)
    passes = [GatherBeforeDequantizePass()] + ([Int8WeightsAsUint8Pass()] if weight_type == "uint8" else []) + \
        ([FuseOnnxruntimeKernelsPass(nbits_accuracy_level, concatenate_shared)] if target == "onnxruntime" else [])
    pm = PassManager([*passes, TransposeLinearWeightsPass()])
    pm(gm)
    prune_unused_tensors(gm)
    fuse = pm.result(FuseOnnxruntimeKernelsPass.name)
    _check_no_grouped_dynamic(gm, target, fuse.skipped if fuse is not None else {})
    table = {QUANTIZE: translate.quantize, DEQUANTIZE: translate.dequantize, CHOOSE_QPARAMS: translate.choose_qparams,
             MATMUL_INTEGER_TO_FLOAT: translate.matmul_integer_to_float, MATMUL_NBITS: translate.matmul_nbits}
    budget = EXPORT_BUDGET_S if budget_s is None else budget_s
    try:
        with time_budget(budget):
            ep = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes)
            program = torch.onnx.export(ep, dynamo=True, custom_translation_table=table, opset_version=opset,
                                        verbose=False, optimize=True)
    except BudgetExceeded as stop:
        raise BackendError(
            f"onnx: the export did not finish within its budget of {budget:g} s{_stopped_at(stop, gm)}; dynamic: "
            f"{describe_dynamic(dynamic_shapes)}\nhint: symbolic shapes on these dims (window or patch padding "
            f"arithmetic) can take the exporter minutes to bound: quantize with static dims there, e.g. "
            f"qcompile.quantize(..., dynamic_shapes={batch_only(dynamic_shapes)}), or raise "
            f"qcompile.backends.onnx.lower.EXPORT_BUDGET_S") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the node that failed when torch names it
        root = e
        while root.__cause__ is not None and not isinstance(root, BackendError):
            root = root.__cause__
        if isinstance(root, BackendError):
            raise root from e
        raise export_failure(e, gm, dynamic_shapes) from e
    buf = io.BytesIO()
    program.save(buf)
    import onnx

    model = onnx.load_from_string(buf.getvalue())
    if not keep_metadata:
        # the exporter records each node's Python stack and module scopes: ~0.4 MB on MiniLM,
        # useful when debugging an export, dead weight in a deployed file
        for node in model.graph.node:
            del node.metadata_props[:]
    pack_low_bit_initializers(model)
    residual_adds_as_sum(model)
    cache_blends_as_scatter(model)
    if target == "onnxruntime":   # the form its SimplifiedLayerNormFusion matches
        rsqrt_scale_as_div(model)
    model.metadata_props.add(key=INT8_WEIGHTS_KEY, value=weight_type)
    if weight_type == "uint8":
        why = f"{why} ({len(pm.result(Int8WeightsAsUint8Pass.name).changed)} weights converted)"
    model.metadata_props.add(key=INT8_WEIGHTS_REASON_KEY, value=why)
    onnx.checker.check_model(model)
    return model.SerializeToString(), [i.name for i in model.graph.input]


def pack_low_bit_initializers(model) -> int:
    """Fold each ``Cast(int8/uint8 initializer, to=INT4/UINT4)`` (what :func:`.translate.dequantize`
    emits for 4-/2-bit codes) into one packed INT4/UINT4 initializer, two codes a byte, so the file
    holds the weight at its real size. The exporter's optimizer folds the small ones itself but
    leaves large constants (a 256x256x3x3 conv) as int8 + Cast. Returns the number folded."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper

    to_np = {onnx.TensorProto.INT4: ml_dtypes.int4, onnx.TensorProto.UINT4: ml_dtypes.uint4}
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    folded = []
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type != "Cast" or to not in to_np or node.input[0] not in inits:
            continue
        src = inits[node.input[0]]
        if src.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        codes = numpy_helper.to_array(src)
        lo, hi = (-8, 7) if to == onnx.TensorProto.INT4 else (0, 15)
        if codes.size and (codes.min() < lo or codes.max() > hi):  # a Cast would wrap them silently
            raise BackendError(f"onnx: initializer '{src.name}' holds codes outside the 4-bit range [{lo}, {hi}]")
        graph.initializer.append(numpy_helper.from_array(codes.astype(to_np[to]), node.output[0]))
        folded.append(node)
        uses[src.name] -= 1
        if uses[src.name] == 0:
            graph.initializer.remove(src)
            del inits[src.name]
    for node in folded:
        graph.node.remove(node)
    return len(folded)
