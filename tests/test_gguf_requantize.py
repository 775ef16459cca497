"""The gguf backend's ``requantize=True`` option and llama.cpp's activation spec.

requantize: a layer whose grid no GGUF type holds is written to the nearest type instead of refused
(round to nearest from its reference weight; llama.cpp's fallback when a k-quant row is not whole
super-blocks), its added error reported per layer (artifact and file metadata); layers that fit stay
bit-exact; without the option the same model is refused by name.

Activations: ``llama_cpp_mix(..., activations=True)`` quantizes every Linear's input as llama.cpp's
CPU dot product does (int8 in blocks of 32, or 256 for k-quant weights); the backend checks each
layer's activation spec against the type its weight is written as and names a layer that differs."""
import json

import numpy as np
import pytest
import torch

import qcompile
from qcompile.backends.gguf import verify_gguf
from qcompile.backends.gguf.llama import REQUANTIZED_KEY
from qcompile.backends.gguf.requantize import quantize_to, value_of
from qcompile.errors import BackendError
from qcompile.presets import gguf_activation, gguf_spec, llama_cpp_mix
from qcompile.recipe import LayerConfig, Recipe
from qcompile.spec import QuantSpec
from test_backend_gguf import tokenizer  # noqa: F401
from test_gguf_kquants import _quantize, _tiny_llama

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python): pip install 'qcompile[gguf]'")

W4_G64 = LayerConfig(QuantSpec("uint4", "per_group", symmetric=False, group_size=64))


@pytest.fixture(scope="module")
def model():
    return _tiny_llama(64, 128, 1, 0.1)


@pytest.fixture(scope="module")
def one_off_grid(model, tokenizer):  # noqa: F811
    """gguf-q8_0 except up_proj, at uint4 groups of 64 (no GGUF type: legacy blocks are 32)."""
    recipe = Recipe(name="q8-with-g64", default=LayerConfig(gguf_spec("Q8_0")), embedding=LayerConfig(gguf_spec("Q8_0")),
                    overrides={"model.layers.0.mlp.up_proj": W4_G64})
    return _quantize(model, recipe, tokenizer)


def test_without_the_option_the_layer_is_refused_by_name(one_off_grid, model, tokenizer):  # noqa: F811
    with pytest.raises(BackendError, match=r"layer 'model\.layers\.0\.mlp\.up_proj'.*uint4, groups of 64.*nearest "
                                           r"type is Q4_1"):
        qcompile.lower(one_off_grid, backend="gguf", config=model.config, tokenizer=tokenizer)


def test_requantize_writes_the_nearest_type_and_reports_the_added_error(one_off_grid, model, tokenizer, tmp_path):  # noqa: F811
    art = qcompile.lower(one_off_grid, backend="gguf", config=model.config, tokenizer=tokenizer, requantize=True)
    assert list(art.requantized) == ["model.layers.0.mlp.up_proj"]
    entry = art.requantized["model.layers.0.mlp.up_proj"]
    assert entry["type"] == "Q4_1" and "groups of 64" in entry["grid"] and "groups of 32" in entry["why"]
    assert 0 < entry["added_rel_rms"] < 0.2 and entry["added_sqnr_db"] > 10 and entry["added_max_abs"] > 0
    path = art.save(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    field = reader.fields[REQUANTIZED_KEY]
    assert json.loads(bytes(field.parts[field.data[0]]).decode())["model.layers.0.mlp.up_proj"]["type"] == "Q4_1"
    types = verify_gguf(path, one_off_grid, model.config, requantize=True)   # every other layer bit for bit
    assert types["blk.0.ffn_up.weight"] == "Q4_1" and types["blk.0.ffn_down.weight"] == "Q8_0"
    # the stored blocks are the reference weight rounded to nearest on Q4_1's grid
    ref = {n.meta["qcompile.layer"]: n for n in one_off_grid.graph_module.graph.nodes
           if n.target == torch.ops.qcompile.dequantize.default and n.args[0].op == "get_attr"}
    gm = one_off_grid.graph_module
    node = ref["model.layers.0.mlp.up_proj"]
    weight = torch.ops.qcompile.dequantize(*[getattr(gm, a.target) if isinstance(a, torch.fx.Node) else a
                                             for a in node.args])
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
    assert np.array_equal(stored, value_of(quantize_to("x", weight, "Q4_1")).numpy())
    assert qcompile.check(path).passed   # the contract's parity includes the added error


def test_requantize_takes_llama_cpps_fallback_for_short_k_quant_rows(model, tokenizer):  # noqa: F811
    """int6 in groups of 32 with kquant8 scales: the nearest k-quant is Q6_K, whose super-blocks a row
    of 64 cannot fill: llama.cpp's fallback Q8_0."""
    k6_g32 = QuantSpec("int6", "per_group", symmetric=True, group_size=32, scale_dtype="kquant8")
    q = _quantize(model, Recipe(name="k", default=LayerConfig(k6_g32), embedding=LayerConfig(gguf_spec("Q8_0"))),
                  tokenizer)
    art = qcompile.lower(q, backend="gguf", config=model.config, tokenizer=tokenizer, requantize=True)
    assert {e["type"] for e in art.requantized.values()} == {"Q8_0"} and len(art.requantized) == 7


def test_requantize_handles_double_quantized_scales(model, tokenizer):  # noqa: F811
    q = _quantize(model, "q4_k_m", tokenizer)   # bitsandbytes-style int8 scales: refused without the option
    with pytest.raises(NotImplementedError, match="double-quantized"):
        qcompile.lower(q, backend="gguf", config=model.config, tokenizer=tokenizer)
    art = qcompile.lower(q, backend="gguf", config=model.config, tokenizer=tokenizer, requantize=True)
    assert art.requantized["model.layers.0.self_attn.q_proj"]["type"] == "Q4_1"
    assert art.requantized["model.layers.0.mlp.down_proj"]["type"] == "Q8_0"   # uint6: no 6-bit legacy type


def test_llama_cpp_activations_follow_each_layers_type(tokenizer):  # noqa: F811
    """Rows of 64 (fallback types, Q8_0 activation blocks of 32) and 256 (down_proj Q4_K / Q6_K: Q8_K
    blocks of 256); the tied head reads the Q8_0 embedding, so its input gets blocks of 32."""
    model = _tiny_llama(64, 256, 4, 0.1)
    recipe, types = llama_cpp_mix(model.config, "q4_k_m", activations=True)
    assert recipe.name == "gguf-q4_k_m-a8"
    assert recipe.overrides["model.layers.0.mlp.down_proj"].activation.group_size == 256
    assert recipe.overrides["model.layers.0.self_attn.q_proj"].activation.group_size == 32
    assert recipe.overrides["lm_head"] == LayerConfig(gguf_spec("Q8_0"), gguf_activation("Q8_0"))
    q = _quantize(model, recipe, tokenizer)
    art = qcompile.lower(q, backend="gguf", config=model.config, tokenizer=tokenizer)
    assert "output.weight" not in art.types   # still tied: one spec for the embedding and the head
    assert set(art.types.values()) == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}


def test_an_activation_spec_llama_cpp_does_not_compute_is_refused(model, tokenizer):  # noqa: F811
    wrong = QuantSpec("int8", "per_token_group", symmetric=True, group_size=64, dynamic=True)
    recipe = Recipe(name="q8-a8-g64", default=LayerConfig(gguf_spec("Q8_0"), wrong),
                    embedding=LayerConfig(gguf_spec("Q8_0")))
    q = _quantize(model, recipe, tokenizer)
    with pytest.raises(BackendError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'.*group 64.*Q8_0 matmul with "
                                           r"int8 inputs in blocks of 32"):
        qcompile.lower(q, backend="gguf", config=model.config, tokenizer=tokenizer)
