"""Which :class:`~qcompile.recipe.LayerConfig` a recipe gives one layer: the one home of that rule.

:func:`resolve_layer_config` is read by everything that needs a layer's config: the annotate pass
(on the captured graph), sensitivity analysis, latency timing and the mixed-precision allocator (on
the eager model). Precedence, highest first:

1. ``keep_first`` / ``keep_last`` (the first / last non-embedding quantizable layer stays float);
2. an override or ``keep_float`` entry that is exactly the layer's path;
3. override patterns in order, then ``keep_float`` patterns (:func:`match_pattern`);
4. ``embedding`` for embeddings, else ``default``; a Linear whose weight is an embedding's (a tied
   head) takes ``embedding`` instead when ``tied_head == "embedding"``.

A pattern that matches no layer is an error (:func:`check_patterns_used`), so is an invalid
regex (:func:`check_patterns`). Imports: ``errors``, ``recipe`` only.

Example::

    >>> cfg, source = resolve_layer_config(Recipe.preset("q4_k_m"), "layers.0.mlp.down_proj", "Linear", "linear")
    >>> cfg.weight.format, source      # the preset's override for v_proj / down_proj
    ('uint6', "overrides['re:.*\\\\.(v_proj|down_proj)$']")
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Optional

from .errors import RecipeError, closest
from .recipe import LayerConfig, Recipe


def match_pattern(pattern: str, path: str, layer_type: str) -> bool:
    """Exact path, ``re:<regex>`` (full match), ``type:<ClassName>`` or a glob."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    if pattern.startswith("type:"):
        return layer_type == pattern[5:]
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return pattern == path


def layer_rules(recipe: Recipe) -> list:
    """``(pattern, config)`` in the order they are tried: the overrides, then ``keep_float`` (``None``)."""
    return list(recipe.overrides.items()) + [(p, None) for p in recipe.keep_float]


def check_patterns(recipe: Recipe) -> None:
    """A :class:`RecipeError` naming the first override or ``keep_float`` regex that does not compile."""
    for pattern, _ in layer_rules(recipe):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise RecipeError(f"overrides['{pattern}']", f"invalid regex: {e}") from None


def resolve_layer_config(recipe: Recipe, layer: str, layer_type: str, kind: str, *, tied_to: Optional[str] = None,
                         first: bool = False, last: bool = False,
                         used: Optional[set] = None) -> tuple[Optional[LayerConfig], str]:
    """(the config ``recipe`` gives ``layer``, where it came from: ``"default"``, ``"embedding"``,
    ``"overrides['<pattern>']"``, ``"keep_float"``, ``"tied_head"``, ``"keep_first"`` or
    ``"keep_last"``). ``None``: the layer stays float.

    ``layer_type``: the module's class name (``type:`` patterns); ``kind``: ``"linear"``, ``"conv"``
    or ``"embedding"``; ``tied_to``: the embedding whose weight this layer reads, if any; ``first`` /
    ``last``: whether it is the first / last non-embedding quantizable layer. ``used`` collects the
    patterns that matched (for :func:`check_patterns_used`)."""
    cfg, source = _by_rules(recipe, layer, layer_type, used)
    if source is None:
        cfg, source = (recipe.embedding, "embedding") if kind == "embedding" else (recipe.default, "default")
    if tied_to is not None and source == "default" and recipe.tied_head == "embedding":
        cfg, source = recipe.embedding, "tied_head"
    if (recipe.keep_first and first) or (recipe.keep_last and last):
        cfg, source = None, "keep_first" if first and recipe.keep_first else "keep_last"
    return cfg, source


def _by_rules(recipe, layer, layer_type, used):
    """(config, source) from the first rule that claims ``layer``; (None, None) when none does.
    Exact paths win over patterns; patterns go in order."""
    rules = layer_rules(recipe)

    def source(pattern):
        return f"overrides['{pattern}']" if pattern in recipe.overrides else "keep_float"

    for pattern, cfg in rules:
        if pattern == layer:
            if used is not None:
                used.add(pattern)
            return cfg, source(pattern)
    for pattern, cfg in rules:
        if pattern != layer and match_pattern(pattern, layer, layer_type):
            if used is not None:
                used.add(pattern)
            return cfg, source(pattern)
    return None, None


def check_patterns_used(recipe: Recipe, used: set, layers: Iterable[str]) -> None:
    """A :class:`RecipeError` naming the first override or ``keep_float`` pattern not in ``used``
    (it matched no layer of ``layers``, the model's quantizable layers), with the closest layer."""
    layers = list(layers)
    for pattern, _ in layer_rules(recipe):
        if pattern not in used:
            field = "keep_float" if pattern in recipe.keep_float and pattern not in recipe.overrides \
                else f"overrides['{pattern}']"
            raise RecipeError(field, f"pattern '{pattern}' matches no quantizable layer (or only layers an "
                                     f"earlier pattern already claims); "
                                     f"{closest(pattern, layers) if layers else 'the model has none'}")


__all__ = ["match_pattern", "layer_rules", "check_patterns", "resolve_layer_config", "check_patterns_used"]
