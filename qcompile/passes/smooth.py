"""SmoothQuant-style outlier migration (Xiao et al., 2023) for layers with quantized activations.

Per input channel j of the Linears that read one tensor ``x``:
``s_j = max|x_j|^alpha / max_i|W_ij|^(1-alpha)``; the Linears get ``W * s`` and the tensor ``x / s``.
With ``alpha`` unset, the strength is measured per tensor (see :meth:`ApplySmoothingPass._search`).
``1/s`` is folded, with no extra op, into a LayerNorm that feeds only these Linears, or into the
output channels of an upstream Linear whose output reaches ``x`` only through shape operations and
attention's value path (the attention output projection reads ``softmax(QK^T) V``: scaling V's
channels scales its channels); otherwise a ``mul`` by ``1/s`` is inserted before them (BERT's
LayerNorms also feed residual adds, so they cannot take it). Two passes: :class:`InsertChannelStatsPass` (then calibrate), :class:`ApplySmoothingPass`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from typing import Optional

from ..observers import ChannelAbsMaxObserver, make_observer, weight_qparams
from ..ops import DEQUANTIZE, QUANTIZE
from ..recipe import SmoothingConfig
from ..spec import ANNOTATION, LAYER, ROLE
from .annotate import annotated_nodes
from .infra import Pass, PassResult, add_tensor, get_attr_tensor
from .observe import insert_on_edge, quantized_output_source

aten = torch.ops.aten
STATS = "qstats"


@dataclass
class SmoothingResult(PassResult):
    """``records``: one entry per tensor considered for smoothing (its layers, ``how``: folded
    where, a multiply, or why not; ``alpha``), in graph order: the report's ``smoothing``."""

    records: list = field(default_factory=list)


class InsertChannelStatsPass(Pass):
    """Channel statistics on the inputs of activation-quantized Linears (what smoothing needs).
    ``quantized_outputs``: op kinds whose outputs the backend quantizes; a Linear reading such an
    output through max-pool/flatten/reshape only is not smoothed, so it reuses that output's codes
    (a smoothing multiply in between would force a second quantization)."""

    name = "insert_channel_stats"

    def __init__(self, config: SmoothingConfig = SmoothingConfig(), quantized_outputs: frozenset = frozenset()):
        self.config = config
        self.quantized_outputs = frozenset(quantized_outputs)

    def call(self, gm):
        shared: dict = {}
        records: list[dict] = []
        for node, ann in annotated_nodes(gm):
            if ann.op == "linear" and ann.activation is not None:
                src = node.args[ann.input_arg]
                producer = quantized_output_source(src, self.quantized_outputs)
                if producer is not None:
                    records.append({"layers": [ann.layer], "alpha": None, "how": "not smoothed (reads the "
                                         f"quantized output of '{producer.meta[ANNOTATION].layer}' as is)"})
                    continue
                insert_on_edge(gm, node, ann.input_arg, ChannelAbsMaxObserver([ann.layer]), STATS, shared, src)
        return SmoothingResult(gm, bool(shared), records=records)


class ApplySmoothingPass(Pass):
    name = "apply_smoothing"

    def __init__(self, config: SmoothingConfig = SmoothingConfig()):
        self.config = config
        # what the per-tensor search tries: no smoothing, outlier-only migration, each alpha
        self.candidates = (None,) + tuple(f"outliers@{q:g}" for q in config.outlier_quantiles) + tuple(config.alphas)

    def call(self, gm):
        modified = False
        records: list[dict] = []
        for obs_node in [n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get(ROLE) == STATS]:
            obs = gm.get_submodule(obs_node.target)
            x = obs_node.args[0]
            consumers = [u for u in obs_node.users if ANNOTATION in u.meta]
            folded = self._smooth(gm, obs, x, obs_node, consumers, records) if obs.absmax is not None else None
            if folded is None:
                obs_node.replace_all_uses_with(x)
            gm.graph.erase_node(obs_node)
            gm.delete_submodule(obs_node.target)
            modified = True
        return SmoothingResult(gm, modified, records=records)

    def _smooth(self, gm, obs, x, obs_node, consumers, records):
        weights = [get_attr_tensor(gm, c.args[c.meta[ANNOTATION].weight_arg]) for c in consumers]
        if not consumers or len(consumers) != len(obs_node.users):
            return None
        w_absmax = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0).float()
        anns = [c.meta[ANNOTATION] for c in consumers]
        if self.config.alpha is not None:
            alpha = self.config.alpha
        else:
            alpha, errors = self._search(obs, w_absmax, weights, anns)
        if alpha is None:
            records.append({"layers": [a.layer for a in anns], "how": "not smoothed (measured worse)",
                            "alpha": None})
            return None
        s = candidate_scale(alpha, obs.absmax, w_absmax)
        fold = self._layer_norm(gm, x)
        upstream = None if fold is not None else channel_source(gm, x)
        if fold is None and upstream is None and self.config.fold_only:
            return None
        for c, w in zip(consumers, weights):
            ann = c.meta[ANNOTATION]
            w_node = add_tensor(gm, f"{c.args[ann.weight_arg].target}_smooth", (w * s.to(w.dtype)[None, :]), c)
            w_node.meta[LAYER] = ann.layer
            args = list(c.args)
            args[ann.weight_arg] = w_node
            c.args = tuple(args)
        if fold is not None:
            ln, gamma, beta = fold
            args = list(ln.args)
            new_gamma = add_tensor(gm, f"{ln.args[2].target}_smooth", gamma / s.to(gamma.dtype), ln)
            args[2] = new_gamma
            if beta is not None:
                args[3] = add_tensor(gm, f"{ln.args[3].target}_smooth", beta / s.to(beta.dtype), ln)
            ln.args = tuple(args)
            obs_node.replace_all_uses_with(x)
            how = "folded into " + ln.meta.get(LAYER, ln.name)
        elif upstream is not None:
            scale_output_channels(gm, upstream, 1.0 / s)
            obs_node.replace_all_uses_with(x)
            how = "folded into the output channels of " + _layer_name(upstream)
        else:
            inv = add_tensor(gm, f"{consumers[0].meta[ANNOTATION].layer}.smooth_inv", (1.0 / s), obs_node)
            with gm.graph.inserting_after(obs_node):
                mul = gm.graph.call_function(aten.mul.Tensor, (x, inv))
            mul.meta[ROLE] = "smoothing"
            mul.meta[LAYER] = consumers[0].meta.get(LAYER)
            obs_node.replace_all_uses_with(mul)
            how = "mul inserted"
        record = {"layers": [c.meta[ANNOTATION].layer for c in consumers], "how": how, "alpha": alpha,
                  "max_scale": float(s.max()), "min_scale": float(s.min())}
        if obs.redrawn_batches:   # data-parallel: the search's row sample is not one process's (observers.py)
            record["redrawn_sample_batches"] = obs.redrawn_batches
        records.append(record)
        return True

    def _search(self, obs, w_absmax, weights, anns):
        """The candidate (see :func:`candidate_scale`) whose quantized output error on the sampled
        rows is smallest, using the consumers' own weight and activation specs."""
        x = obs.sample()
        if x.numel() == 0:
            return 0.5, {}
        refs = [x @ w.detach().float().t() for w in weights]
        errors = {}
        for label in self.candidates:
            s = candidate_scale(label, obs.absmax, w_absmax)
            xq = _fake_quant_activation(x / s, anns[0].activation)
            err = 0.0
            for ref, w, ann in zip(refs, weights, anns):
                wq = _fake_quant_weight(w.detach().float() * s[None, :], ann)
                err += float((xq @ wq.t() - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))
            errors[label] = err
        return min(errors, key=errors.get), errors

    @staticmethod
    def _layer_norm(gm, x):
        """(layer_norm node, gamma, beta) when 1/s can be folded into it: ``x`` is a LayerNorm
        with constant affine parameters whose only user is the statistics observer."""
        if x.op != "call_function" or x.target != aten.layer_norm.default or len(x.users) != 1:
            return None
        if len(x.args) < 3 or get_attr_tensor(gm, x.args[2]) is None:
            return None
        beta = get_attr_tensor(gm, x.args[3]) if len(x.args) > 3 and x.args[3] is not None else None
        if len(x.args) > 3 and x.args[3] is not None and beta is None:
            return None
        return x, get_attr_tensor(gm, x.args[2]), beta

    def ensures(self, gm):
        if any(n.meta.get(ROLE) == STATS for n in gm.graph.nodes):
            raise AssertionError("channel statistics observers left in the graph")


_LAYOUT_OPS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
                         aten.permute.default, aten.contiguous.default, aten.clone.default})


def scale_output_channels(gm, linear, factor: torch.Tensor, suffix: str = "smooth_out") -> torch.fx.Node:
    """Scale the output channels of ``linear`` (rows of its constant weight, its bias) by
    ``factor``: new constants named ``<old>_<suffix>``. Returns the new weight node."""
    w = get_attr_tensor(gm, linear.args[1])
    args = list(linear.args)
    args[1] = add_tensor(gm, f"{linear.args[1].target}_{suffix}", w.detach() * factor.to(w.dtype)[:, None], linear)
    if len(args) > 2 and args[2] is not None:
        b = get_attr_tensor(gm, args[2])
        args[2] = add_tensor(gm, f"{linear.args[2].target}_{suffix}", b.detach() * factor.to(b.dtype), linear)
    linear.args = tuple(args)
    return args[1]


def _layer_name(node) -> str:
    ann = node.meta.get(ANNOTATION)
    return ann.layer if ann is not None else node.meta.get(LAYER, node.name)


def channel_source(gm, x) -> Optional[torch.fx.Node]:
    """The ``aten.linear`` node whose output channels are exactly the last-dimension channels of
    ``x`` (same order), when ``x`` is reached from it only through shape operations (view, reshape,
    transpose, permute, contiguous), the value operand of attention (``matmul(P, V)``,
    ``scaled_dot_product_attention``'s value) and elementwise products (a gated MLP's
    ``act(gate) * up``), every tensor on the way read only once and the Linear's weight and bias
    constants; else None. Scaling that Linear's output channels then scales ``x``'s channels and
    nothing else.

    Each dimension is tracked as ``(stride, size)`` in the Linear's channel index (``None`` for
    a dimension that is not a channel): splits and merges must keep the channels row-major, and
    attention must not mix over a channel dimension."""
    found = _walk_to_linear(x, [])
    if found is None:
        return None
    linear, chain = found
    if get_attr_tensor(gm, linear.args[1]) is None or \
            (len(linear.args) > 2 and linear.args[2] is not None and get_attr_tensor(gm, linear.args[2]) is None):
        return None
    n = get_attr_tensor(gm, linear.args[1]).shape[0]
    shape = _static_shape(linear)
    if shape is None:
        return None
    dims = [None] * (len(shape) - 1) + [(1, n)]
    for op in reversed(chain):
        out = _static_shape(op)
        if out is None:
            return None
        dims = _propagate(op, dims, out)
        if dims is None:
            return None
    return linear if dims[-1] == (1, n) and all(d is None for d in dims[:-1]) else None


def _walk_to_linear(node, chain):
    """(linear, the ops from ``node`` back to it) along a path :func:`channel_source` can follow."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or len(node.users) != 1:
        return None
    if node.target == aten.linear.default:
        return node, chain
    if node.target in _LAYOUT_OPS:
        operands = [node.args[0]]
    elif node.target == aten.matmul.default:
        operands = [node.args[1]]
    elif node.target == aten.scaled_dot_product_attention.default:
        operands = [node.args[2]]
    elif node.target == aten.mul.Tensor:  # either factor, if it has the product's full shape
        out = node.meta.get("val")
        operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node) and isinstance(out, torch.Tensor)
                    and isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].shape == out.shape]
    else:
        return None
    for operand in operands:
        found = _walk_to_linear(operand, chain + [node])
        if found is not None:
            return found
    return None


def _static_shape(node):
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return [d if isinstance(d, int) else None for d in val.shape]


def _propagate(op, dims, out):
    """Channel ``(stride, size)`` per dimension of ``op``'s output, or None when it cannot be followed."""
    t = op.target
    if t in (aten.contiguous.default, aten.clone.default, aten.mul.Tensor):
        return dims
    if t == aten.transpose.int:
        a, b = (d % len(dims) for d in op.args[1:3])
        dims = list(dims)
        dims[a], dims[b] = dims[b], dims[a]
        return dims
    if t == aten.permute.default:
        return [dims[p % len(dims)] for p in op.args[1]]
    if t in (aten.matmul.default, aten.scaled_dot_product_attention.default):
        # the value's last dimension passes through; its second-to-last is mixed over by attention
        if len(out) != len(dims) or dims[-2] is not None:
            return None
        return dims
    # view / reshape: the channel dimensions must be trailing and row-major, and become the
    # shortest trailing run of static output dimensions with the same number of elements
    first = next((i for i, d in enumerate(dims) if d is not None), None)
    if first is None or any(d is None for d in dims[first:]):
        return None
    total = 1
    for i in range(len(dims) - 1, first - 1, -1):
        stride, size = dims[i]
        if stride != total:
            return None
        total *= size
    new, acc = [None] * len(out), 1
    for i in range(len(out) - 1, -1, -1):
        if out[i] is None:
            return None
        new[i] = (acc, out[i])
        acc *= out[i]
        if acc == total:
            return new
        if acc > total:
            return None
    return None


def smoothing_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel ``s = max|x|^alpha / max|w|^(1-alpha)`` (1 where either is 0)."""
    s = x_absmax.pow(alpha) / w_absmax.pow(1 - alpha).clamp(min=1e-5)
    return torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s)).clamp(min=1e-5)


def candidate_scale(label, x_absmax: torch.Tensor, w_absmax: torch.Tensor) -> torch.Tensor:
    """Per-channel divisor for a search candidate: None → 1 (no smoothing); ``"outliers@q"`` →
    channels whose range exceeds the ``q``-quantile of the channel ranges are brought down to it
    (their excess moves into the weights, the other channels are untouched); a number →
    SmoothQuant with that alpha."""
    if label is None:
        return torch.ones_like(x_absmax)
    if isinstance(label, str) and label.startswith("outliers@"):
        threshold = x_absmax.quantile(float(label.split("@")[1])).clamp(min=1e-8)
        return (x_absmax / threshold).clamp(min=1.0)
    return smoothing_scale(x_absmax, w_absmax, float(label))


def _fake_quant_activation(x, spec):
    if spec.dynamic:
        s, z = torch.ops.qcompile.choose_qparams(x, spec.format, spec.symmetric, spec.per_token, spec.group)
    else:
        obs = make_observer(spec)
        obs(x)
        s, z = obs.qparams()
    return DEQUANTIZE(QUANTIZE(x, s, z, spec.format, spec.group), s, z, spec.format, spec.group, x.dtype)


def _fake_quant_weight(w, ann):
    if ann.weight is None:
        return w
    g = ann.weight.group_size if ann.weight.granularity == "per_group" else 0
    s, z = weight_qparams(w, ann.weight, ann.channel_axis)
    return DEQUANTIZE(QUANTIZE(w, s, z, ann.weight.format, g), s, z, ann.weight.format, g, w.dtype)
