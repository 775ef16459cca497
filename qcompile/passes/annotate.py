"""Annotate quantizable op nodes from a recipe: writes a :class:`~qcompile.spec.NodeAnnotation`
into ``node.meta[ANNOTATION]``; changes nothing else. Which ops are quantizable, and where their
activation and weight arguments sit, is the table :data:`QUANTIZABLE_OPS`; which config a layer gets
is :func:`qcompile.scope.resolve_layer_config` (the rule analysis and mixed precision read too).

Only the inputs of weight-carrying ops are ever quantized: the attention-mask add, softmax and
LayerNorm stay float by construction (quantizing them destroys transformers)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import RecipeError
from ..recipe import LayerConfig, Recipe
from ..scope import check_patterns, check_patterns_used, resolve_layer_config
from ..spec import ANNOTATION, LAYER, LAYER_TYPE, NodeAnnotation
from .infra import Pass, PassResult, get_attr_tensor

aten = torch.ops.aten


@dataclass(frozen=True)
class OpInfo:
    kind: str                 # "linear" | "conv" | "embedding"
    input_arg: Optional[int]  # activation argument (None: integer indices, never quantized)
    weight_arg: int
    channel_axis: int         # output channels of the weight


QUANTIZABLE_OPS = {
    aten.linear.default: OpInfo("linear", 0, 1, 0),
    aten.conv1d.default: OpInfo("conv", 0, 1, 0),
    aten.conv2d.default: OpInfo("conv", 0, 1, 0),
    aten.conv3d.default: OpInfo("conv", 0, 1, 0),
    aten.embedding.default: OpInfo("embedding", None, 0, 0),
}


# ops with parameters that stay float by design: quantizing a normalization's input destroys accuracy
NORMALIZATION_OPS = {"layer_norm", "native_layer_norm", "batch_norm", "_native_batch_norm_legit_no_training",
                     "_native_batch_norm_legit", "native_batch_norm", "group_norm", "native_group_norm",
                     "instance_norm", "rms_norm", "_fused_rms_norm"}

RECURRENT_OPS = {"lstm", "gru", "rnn_tanh", "rnn_relu"}


@dataclass
class AnnotateResult(PassResult):
    """``skipped``: layer -> why it stays float (quantizable layers the recipe keeps float, and every
    module whose parameters no quantized op reads: an LSTM, a LayerNorm, a learned position table);
    ``tied``: a layer whose weight is an embedding's -> whether the two share one quantized tensor."""

    tied: dict = field(default_factory=dict)


class AnnotatePass(Pass):
    """Resolve the recipe for every quantizable node. An override or ``keep_float`` pattern that
    matches no quantizable layer is a :class:`RecipeError`."""

    name = "annotate"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def call(self, gm):
        result = AnnotateResult(gm, False)
        check_patterns(self.recipe)
        used: set[str] = set()
        candidates = []
        fused_recurrent = []   # left fused by DecomposeRecurrentPass: addressable by scope, listed float
        for node in gm.graph.nodes:
            info = QUANTIZABLE_OPS.get(node.target) if node.op == "call_function" else None
            if info is None:
                if node.op == "call_function" and _op_name(node) in RECURRENT_OPS:
                    fused_recurrent.append(node)
                continue
            layer = node.meta.get(LAYER, node.name)
            if get_attr_tensor(gm, node.args[info.weight_arg]) is None:
                result.skipped[layer] = "its weight is computed in the graph, not a parameter"
                continue
            candidates.append((node, info, layer))
        layers = [layer for _, _, layer in candidates]
        for node in fused_recurrent:   # a keep_float / override pattern naming an LSTM is used
            layer = node.meta.get(LAYER, node.name)
            resolve_layer_config(self.recipe, layer, node.meta.get(LAYER_TYPE, ""), "linear", used=used)
            layers.append(layer)

        # a Linear reading an embedding's weight is a tied head (lm_head = embed_tokens)
        emb_weight = {node.args[info.weight_arg].target: layer for node, info, layer in candidates
                      if info.kind == "embedding"}
        weighted = [c for c in candidates if c[1].kind != "embedding"]
        first = weighted[0][0] if weighted else None
        last = weighted[-1][0] if weighted else None
        for node, info, layer in candidates:
            ltype = node.meta.get(LAYER_TYPE, "")
            tied_to = emb_weight.get(node.args[info.weight_arg].target) if info.kind != "embedding" else None
            cfg, source = resolve_layer_config(self.recipe, layer, ltype, info.kind, tied_to=tied_to,
                                               first=node is first, last=node is last, used=used)
            if cfg is None or (cfg.weight is None and cfg.activation is None):
                result.skipped[layer] = f"kept float by {source}"
                continue
            act = cfg.activation if info.input_arg is not None else None
            if info.kind == "embedding" and cfg.activation is not None:
                raise RecipeError(f"{source}.activation", f"layer '{layer}' is an embedding: weight-only")
            if cfg.weight is not None and cfg.weight.granularity == "per_group":
                w = get_attr_tensor(gm, node.args[info.weight_arg])
                if w.dim() != 2:
                    raise RecipeError(f"{source}.weight.granularity",
                                      f"layer '{layer}' has a {w.dim()}-D weight; per_group needs a 2-D (Linear) weight")
            node.meta[ANNOTATION] = NodeAnnotation(layer, info.kind, cfg.weight, act, info.input_arg,
                                                   info.weight_arg, info.channel_axis)
            result.modified = True
            result.changed.append(layer)
            if tied_to is not None:
                emb = self.recipe.embedding.weight if self.recipe.embedding is not None else None
                result.tied[layer] = (f"weight tied to {tied_to}: one shared quantized tensor" if emb == cfg.weight
                                    else f"weight tied to {tied_to} but its spec differs ({source}): untied, "
                                         f"each quantized separately")
        check_patterns_used(self.recipe, used, layers)
        result.skipped.update(float_parameters(gm, set(result.changed), set(result.skipped)))
        return result

    def ensures(self, gm):
        for node in gm.graph.nodes:
            ann = node.meta.get(ANNOTATION)
            if ann is not None and QUANTIZABLE_OPS.get(node.target) is None:
                raise AssertionError(f"{node.name} annotated but not a quantizable op")


def float_parameters(gm, quantized: set, listed: set) -> dict[str, str]:
    """``{module path: why it stays float}`` for the parameters the graph reads that no annotated op
    reads, found from the graph (not from module types, so a custom module is found too): an
    ``nn.LSTM`` (``aten.lstm``) gets "no quantized kernel for LSTM (kept float)". A parameter that
    reaches a quantizable op through other ops (a weight-normed conv's ``weight_g``) is the weight
    of a layer already in ``listed``, and is not listed twice. The key is the owning module's path,
    or the parameter's full name when that module is also a quantized layer or the root."""
    params = {name for name, _ in gm.named_parameters()}
    found: dict[str, dict[str, set]] = {}   # owner -> {parameter attribute: ops reading it}
    types: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in params or not node.users:
            continue
        # read by a quantizable op: quantized, or already listed with the recipe's reason
        if any(u.op == "call_function" and u.target in QUANTIZABLE_OPS for u in node.users) or _reaches_quantizable(node):
            continue
        if all(_batch_norm_after_conv(u) for u in node.users):
            continue   # QAT's training graph: folded into the conv at convert (report.folded_batch_norms)
        owner, _, attr = node.target.rpartition(".")
        found.setdefault(owner, {}).setdefault(attr, set()).update(_op_name(u) for u in node.users)
        for u in node.users:
            if u.meta.get(LAYER) == owner and u.meta.get(LAYER_TYPE):
                types[owner] = u.meta[LAYER_TYPE]
    out = {}
    for owner, attrs in found.items():
        mtype = types.get(owner) or "this module"
        ops = set().union(*attrs.values())
        if ops <= NORMALIZATION_OPS:
            why = f"no quantized kernel for {mtype} (kept float: normalization stays float by design)"
        elif owner and owner in types and (ops <= RECURRENT_OPS or
                                           (len(ops) == 1 and min(ops).replace("_", "") in mtype.lower())):
            why = f"no quantized kernel for {mtype} (kept float)"
        else:
            read = "; ".join(f"{a} read by {', '.join(sorted(o))}" for a, o in sorted(attrs.items()))
            why = f"no quantized kernel for {mtype}: {read} (kept float)"
        if owner and owner not in quantized and owner not in listed:
            out[owner] = why
        else:
            out.update({f"{owner}.{a}" if owner else a: why for a in attrs})
    return out


def _reaches_quantizable(node, depth: int = 6) -> bool:
    """Whether ``node``'s value is computed, through at most ``depth`` ops that read only constants
    (a weight norm, a transpose), into the weight of a quantizable op."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for src in frontier:
            for u in src.users:
                info = QUANTIZABLE_OPS.get(u.target) if u.op == "call_function" else None
                if info is not None and u.args[info.weight_arg] is src:
                    return True
                if info is None and u.op == "call_function" and all(_constant(a) for a in u.all_input_nodes):
                    nxt.append(u)
        if not nxt:
            return False
        frontier = nxt
    return False


def _batch_norm_after_conv(node) -> bool:
    x = node.args[0] if node.args else None
    return ("batch_norm" in _op_name(node) and isinstance(x, torch.fx.Node) and x.op == "call_function"
            and getattr(QUANTIZABLE_OPS.get(x.target), "kind", None) == "conv")


def _constant(node) -> bool:
    return node.op == "get_attr" or (node.op == "call_function" and bool(node.all_input_nodes)
                                     and all(_constant(a) for a in node.all_input_nodes))


def _op_name(node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


def annotated_nodes(gm):
    """(node, annotation) for every annotated node, in graph order."""
    return [(n, n.meta[ANNOTATION]) for n in gm.graph.nodes if ANNOTATION in n.meta]


__all__ = ["AnnotatePass", "AnnotateResult", "QUANTIZABLE_OPS", "OpInfo", "annotated_nodes", "float_parameters", "LayerConfig"]
