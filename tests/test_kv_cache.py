"""A quantized KV cache (``Recipe.kv_cache``): the recipe field as data, the captured graph taking and
returning codes plus per head/token scales, its numerics against the float cache, the same tokens
on ONNX (int8 cache inputs in the exported file) and TVM as on the reference, and a cache format a
backend cannot lower refused before anything runs."""
import dataclasses
import json

import pytest
import torch

import qcompile
from conftest import tiny_causal_lm
from qcompile.llm import write_new_entries
from qcompile.recipe import KVCacheConfig

transformers = pytest.importorskip("transformers")

MAX_CONTEXT = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(batch=2, seq=6, seed=1):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _recipe(fmt, base="w4-g64"):
    return dataclasses.replace(qcompile.Recipe.preset(base), kv_cache=KVCacheConfig(fmt))


def _quantize(lm, recipe):
    calibration = lm.calibration([_prompt(2, 8, seed=s) for s in range(2)])
    return qcompile.quantize(lm, recipe, lm.example_inputs, calibration=calibration, **lm.capture_options)


@pytest.fixture(scope="module")
def int8_model():
    lm = qcompile.causal_lm(tiny_causal_lm(), max_context=MAX_CONTEXT)
    return lm, _quantize(lm, _recipe("int8"))


def test_recipe_kv_cache_round_trips_and_bad_fields_are_named():
    recipe = _recipe("fp8_e4m3")
    assert qcompile.Recipe.from_dict(recipe.to_dict()) == recipe
    assert qcompile.Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert recipe.to_dict()["kv_cache"] == {"format": "fp8_e4m3"}
    assert "kv_cache" not in qcompile.Recipe.preset("w4-g64").to_dict()     # recipes without it keep their form
    data = recipe.to_dict()
    for bad, field in (({"format": "int4"}, "kv_cache.format"), ({"format": 8}, "kv_cache.format"),
                       ({"bits": 8}, "kv_cache.bits"), ("int8", "kv_cache")):
        with pytest.raises(qcompile.RecipeError) as err:
            qcompile.Recipe.from_dict(dict(data, kv_cache=bad))
        assert err.value.field == field


def test_kv_cache_needs_a_model_captured_with_a_cache(tiny_block):
    model, batches = tiny_block
    with pytest.raises(qcompile.RecipeError, match="qcompile.causal_lm") as err:
        qcompile.quantize(model, _recipe("int8", "w8a8-dynamic"), batches[0])
    assert err.value.field == "kv_cache"


def test_graph_takes_and_returns_codes_and_scales(int8_model):
    lm, q = int8_model
    layout = qcompile.llm.cache_layout(q)
    assert layout.kv_format == "int8"
    inputs = {n.name: n.meta["val"] for n in q.graph_module.graph.nodes if n.op == "placeholder" and "val" in n.meta}
    assert inputs["past_key_0"].dtype == torch.int8 and inputs["past_value_1"].dtype == torch.int8
    assert tuple(inputs["past_key_scale_0"].shape[1:]) == (2, MAX_CONTEXT, 1)
    cache = layout.empty_cache(1)
    logits, *new = q(_prompt(1, 3), torch.arange(3), *cache)
    assert [t.dtype for t in new] == [torch.int8] * 4 + [torch.float32] * 4
    assert [tuple(t.shape) for t in new] == [(1, 2, 3, 16)] * 4 + [(1, 2, 3, 1)] * 4
    # codes of 16 values + one float32 scale per head and token, against 16 float32 values
    float_bytes = dataclasses.replace(layout, kv_format="float").cache_nbytes()
    assert layout.cache_nbytes() / float_bytes == pytest.approx((16 + 4) / 64)


@pytest.mark.parametrize("fmt, tolerance", [("int8", 0.03), ("fp8_e4m3", 0.12)])
def test_quantized_cache_scores_close_to_the_float_cache_in_any_chunks(fmt, tolerance):
    # the float model, the same cache as the float wrapper but quantized: logits close, and the
    # same whether the prompt goes in one call or in chunks (attention reads dequantized new entries too)
    model = tiny_causal_lm()
    float_lm = qcompile.causal_lm(model, max_context=MAX_CONTEXT, logits="all")
    q = _quantize(float_lm, _recipe(fmt, "float"))
    ids = _prompt(2, 12)
    expected = model(ids, use_cache=False).logits
    layout = qcompile.llm.cache_layout(q)

    def run(chunks):
        cache, pieces = layout.empty_cache(2), []
        for positions in chunks:
            logits, *new = q(ids[:, positions], positions, *cache)
            write_new_entries(cache, new, positions)
            pieces.append(logits)
        return torch.cat(pieces, 1)

    whole = run([torch.arange(12)])
    chunked = run([torch.arange(0, 7), torch.arange(7, 11), torch.tensor([11])])
    assert torch.allclose(whole, chunked, atol=1e-5)
    error = (whole - expected).abs().max() / expected.abs().max()
    assert 0 < error < tolerance, f"{fmt} cache: max logit error {error:.4f} of the largest logit"


def test_onnx_file_holds_an_int8_cache_and_decodes_like_the_reference(int8_model):
    lm, q = int8_model
    art = qcompile.lower(q, "onnx", threads=1)
    types = {i.name: i.type for i in art.session.get_inputs()}
    assert types["past_key_0"] == "tensor(int8)" and types["past_key_scale_0"] == "tensor(float)"
    outputs = [o.name for o in art.session.get_outputs()]
    assert len(outputs) == 9 and art.session.get_outputs()[1].type == "tensor(int8)"
    for prompt in (_prompt(1, 5, seed=3), _prompt(2, 7, seed=4)):
        assert torch.equal(qcompile.generate(q, prompt, max_new_tokens=8),
                           qcompile.generate(art, prompt, max_new_tokens=8))


@pytest.mark.slow   # one TVM build: ~65 s on a quiet 2-core host
def test_tvm_decodes_an_int8_cache_like_the_reference(int8_model):
    pytest.importorskip("tvm")
    lm, q = int8_model
    art = qcompile.lower(q, "tvm", threads=1)
    prompt = _prompt(2, 7, seed=4)
    assert torch.equal(qcompile.generate(q, prompt, max_new_tokens=8), qcompile.generate(art, prompt, max_new_tokens=8))


@pytest.fixture(scope="module")
def fp8_model():
    lm = qcompile.causal_lm(tiny_causal_lm(), max_context=MAX_CONTEXT)
    return _quantize(lm, _recipe("fp8_e4m3"))


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_a_cache_format_the_backend_cannot_lower_is_refused_before_anything_runs(fp8_model, backend):
    pytest.importorskip("onnxruntime" if backend == "onnx" else "tvm")
    q = fp8_model
    prompt = _prompt(1, 4)
    before = qcompile.generate(q, prompt, max_new_tokens=4)
    with pytest.raises(qcompile.BackendError, match="fp8_e4m3.*KV cache.*set the recipe's kv_cache"):
        qcompile.lower(q, backend)
    assert torch.equal(qcompile.generate(q, prompt, max_new_tokens=4), before)   # still usable
