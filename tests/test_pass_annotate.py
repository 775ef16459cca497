import pytest
import torch

from qcompile import LayerConfig, QuantSpec, Recipe, RecipeError
from qcompile.capture import capture
from qcompile.passes import AnnotatePass
from qcompile.passes.annotate import annotated_nodes

W8 = QuantSpec("int8", "per_channel")
A8 = QuantSpec("uint8", "per_tensor", symmetric=False)
W4 = QuantSpec("int4", "per_group", group_size=16)


def _annotate(model, batch, recipe):
    gm = capture(model, batch).graph_module
    result = AnnotatePass(recipe)(gm)
    return {ann.layer: ann for _, ann in annotated_nodes(gm)}, result, gm


def test_default_and_embedding(tiny_block):
    model, batches = tiny_block
    recipe = Recipe(default=LayerConfig(W8, A8), embedding=LayerConfig(W8))
    anns, p, gm = _annotate(model, batches[0], recipe)
    assert set(anns) == {"emb", "q", "k", "v", "up", "down", "head"}
    assert anns["emb"].op == "embedding" and anns["emb"].activation is None and anns["emb"].input_arg is None
    assert anns["q"].op == "linear" and anns["q"].activation == A8 and anns["q"].weight == W8
    # nothing else is touched: softmax, layer_norm, the mask add carry no annotation
    for node in gm.graph.nodes:
        if node.target in (torch.ops.aten.softmax.int, torch.ops.aten.layer_norm.default, torch.ops.aten.add.Tensor):
            assert "qcompile.annotation" not in node.meta


def test_override_precedence(tiny_block):
    model, batches = tiny_block
    recipe = Recipe(default=LayerConfig(W8, A8), overrides={
        "re:(q|k)": LayerConfig(W4),          # regex
        "k": LayerConfig(W8),                 # exact path wins over the regex
        "type:Embedding": None,               # by module type: keep float
        "d*": LayerConfig(W8),                # glob: weight-only
    }, keep_float=("head",), keep_first=False)
    anns, p, _ = _annotate(model, batches[0], recipe)
    assert anns["q"].weight == W4 and anns["q"].activation is None
    assert anns["k"].weight == W8 and anns["k"].activation is None
    assert anns["down"].activation is None
    assert "emb" not in anns and "head" not in anns
    assert "overrides['type:Embedding']" in p.skipped["emb"] and p.skipped["head"] == "kept float by keep_float"


def test_keep_first_and_last(tiny_block):
    model, batches = tiny_block
    recipe = Recipe(default=LayerConfig(W8, A8), keep_first=True, keep_last=True)
    anns, p, _ = _annotate(model, batches[0], recipe)
    assert "q" not in anns and "head" not in anns and "up" in anns
    assert p.skipped["q"] == "kept float by keep_first" and p.skipped["head"] == "kept float by keep_last"


def test_override_matching_nothing_is_an_error(tiny_block):
    model, batches = tiny_block
    recipe = Recipe(default=LayerConfig(W8, A8), overrides={"re:encoder\\..*": None})
    with pytest.raises(RecipeError) as e:
        _annotate(model, batches[0], recipe)
    assert "overrides['re:encoder\\..*']" in str(e.value) and "matches no quantizable layer" in str(e.value)


def test_keep_float_typo_suggests_closest(tiny_block):
    model, batches = tiny_block
    with pytest.raises(RecipeError) as e:
        _annotate(model, batches[0], Recipe(default=LayerConfig(W8, A8), keep_float=("dwn",)))
    assert e.value.field == "keep_float" and "'down'" in str(e.value)


def test_embedding_activation_and_group_on_conv_are_errors(tiny_block, tiny_cnn):
    model, batches = tiny_block
    with pytest.raises(RecipeError) as e:
        _annotate(model, batches[0], Recipe(default=LayerConfig(W8), overrides={"emb": LayerConfig(W8, A8)}))
    assert "emb" in str(e.value) and "weight-only" in str(e.value)
    cnn, cbatches = tiny_cnn
    with pytest.raises(RecipeError) as e:
        _annotate(cnn, cbatches[0], Recipe(default=LayerConfig(W4)))
    assert "conv1" in str(e.value) and "per_group" in str(e.value)


def test_one_resolver_decides_every_layer_config():
    """qcompile.scope.resolve_layer_config is the rule annotate, analyze, latency and the allocator read."""
    from qcompile.scope import check_patterns, check_patterns_used, resolve_layer_config

    emb = LayerConfig(W8)
    recipe = Recipe(default=LayerConfig(W8, A8), embedding=emb, overrides={"re:(q|k)": LayerConfig(W4), "k": None},
                    keep_float=("type:Conv2d",), keep_last=True, tied_head="embedding")
    used = set()
    assert resolve_layer_config(recipe, "q", "Linear", "linear", used=used) == (LayerConfig(W4), "overrides['re:(q|k)']")
    assert resolve_layer_config(recipe, "k", "Linear", "linear", used=used) == (None, "overrides['k']")
    assert resolve_layer_config(recipe, "c", "Conv2d", "conv", used=used) == (None, "keep_float")
    assert resolve_layer_config(recipe, "emb", "Embedding", "embedding") == (emb, "embedding")
    assert resolve_layer_config(recipe, "up", "Linear", "linear") == (LayerConfig(W8, A8), "default")
    assert resolve_layer_config(recipe, "head", "Linear", "linear", tied_to="emb") == (emb, "tied_head")
    assert resolve_layer_config(recipe, "head", "Linear", "linear", tied_to="emb", last=True) == (None, "keep_last")
    check_patterns_used(recipe, used, ["q", "k", "c"])
    with pytest.raises(RecipeError) as e:
        check_patterns_used(recipe, {"k", "type:Conv2d"}, ["q", "k"])
    assert e.value.field == "overrides['re:(q|k)']"
    with pytest.raises(RecipeError, match="invalid regex"):
        check_patterns(Recipe(default=LayerConfig(W8), keep_float=("re:(",)))
