"""Annotate quantizable op nodes from a recipe: writes a :class:`~qcompile.spec.NodeAnnotation`
into ``node.meta[ANNOTATION]``; changes nothing else. Which ops are quantizable, and where their
activation and weight arguments sit, is the table :data:`QUANTIZABLE_OPS`.

Only the inputs of weight-carrying ops are ever quantized: the attention-mask add, softmax and
LayerNorm stay float by construction (quantizing them destroys transformers)."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import RecipeError, closest
from ..recipe import LayerConfig, Recipe
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


def match_pattern(pattern: str, path: str, layer_type: str) -> bool:
    """Exact path, ``re:<regex>`` (full match), ``type:<ClassName>`` or a glob."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    if pattern.startswith("type:"):
        return layer_type == pattern[5:]
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return pattern == path


@dataclass
class AnnotateResult(PassResult):
    """``skipped``: layer -> why it stays float; ``tied``: a layer whose weight is an embedding's ->
    whether the two share one quantized tensor."""

    tied: dict = field(default_factory=dict)


class AnnotatePass(Pass):
    """Resolve the recipe for every quantizable node. An override or ``keep_float`` pattern that
    matches no quantizable layer is a :class:`RecipeError`."""

    name = "annotate"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def call(self, gm):
        result = AnnotateResult(gm, False)
        rules = list(self.recipe.overrides.items()) + [(p, None) for p in self.recipe.keep_float]
        for pattern, _ in rules:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise RecipeError(f"overrides['{pattern}']", f"invalid regex: {e}") from None
        used: set[str] = set()
        candidates = []
        for node in gm.graph.nodes:
            info = QUANTIZABLE_OPS.get(node.target) if node.op == "call_function" else None
            if info is None:
                continue
            layer = node.meta.get(LAYER, node.name)
            if get_attr_tensor(gm, node.args[info.weight_arg]) is None:
                result.skipped[layer] = "its weight is computed in the graph, not a parameter"
                continue
            candidates.append((node, info, layer))
        layers = [layer for _, _, layer in candidates]

        # a Linear reading an embedding's weight is a tied head (lm_head = embed_tokens)
        emb_weight = {node.args[info.weight_arg].target: layer for node, info, layer in candidates
                      if info.kind == "embedding"}
        weighted = [c for c in candidates if c[1].kind != "embedding"]
        first = weighted[0][0] if weighted else None
        last = weighted[-1][0] if weighted else None
        for node, info, layer in candidates:
            ltype = node.meta.get(LAYER_TYPE, "")
            cfg, source = self._resolve(layer, ltype, info, rules, used)
            tied_to = emb_weight.get(node.args[info.weight_arg].target) if info.kind != "embedding" else None
            if tied_to is not None and source == "default" and self.recipe.tied_head == "embedding":
                cfg, source = self.recipe.embedding, "tied_head"
            if (self.recipe.keep_first and node is first) or (self.recipe.keep_last and node is last):
                cfg, source = None, "keep_first" if node is first and self.recipe.keep_first else "keep_last"
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
        for pattern, _ in rules:
            if pattern not in used:
                field = "keep_float" if pattern in self.recipe.keep_float and pattern not in self.recipe.overrides \
                    else f"overrides['{pattern}']"
                raise RecipeError(field, f"pattern '{pattern}' matches no quantizable layer (or only layers an "
                                         f"earlier pattern already claims); "
                                         f"{closest(pattern, layers) if layers else 'the model has none'}")
        return result

    def _resolve(self, layer, ltype, info, rules, used):
        """(config, where it came from). Exact paths win over patterns; patterns go in order."""
        def source(pattern):
            return f"overrides['{pattern}']" if pattern in self.recipe.overrides else "keep_float"

        for pattern, cfg in rules:
            if pattern == layer:
                used.add(pattern)
                return cfg, source(pattern)
        for pattern, cfg in rules:
            if pattern != layer and match_pattern(pattern, layer, ltype):
                used.add(pattern)
                return cfg, source(pattern)
        if info.kind == "embedding":
            return self.recipe.embedding, "embedding"
        return self.recipe.default, "default"

    def ensures(self, gm):
        for node in gm.graph.nodes:
            ann = node.meta.get(ANNOTATION)
            if ann is not None and QUANTIZABLE_OPS.get(node.target) is None:
                raise AssertionError(f"{node.name} annotated but not a quantizable op")


def annotated_nodes(gm):
    """(node, annotation) for every annotated node, in graph order."""
    return [(n, n.meta[ANNOTATION]) for n in gm.graph.nodes if ANNOTATION in n.meta]


__all__ = ["AnnotatePass", "AnnotateResult", "QUANTIZABLE_OPS", "OpInfo", "match_pattern", "annotated_nodes", "LayerConfig"]
