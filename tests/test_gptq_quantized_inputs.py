"""GPTQ solved against the input as its dynamic activation quantizer gives it to the matmul
(``WeightAlgorithmConfig.quantized_inputs``: llama.cpp's int8 activation blocks in the ``-a8`` GGUF
recipes): the recipe field, the Hessian it builds (checked against llama.cpp's Q8_0 rule written out
here by hand) and the cases it refuses."""
import dataclasses

import pytest
import torch
from torch import nn

import qcompile
from qcompile.errors import RecipeError
from qcompile.passes import weight_algorithms as wa
from qcompile.presets import gguf_activation, gguf_recipe, llama_cpp_mix
from qcompile.recipe import LayerConfig, Recipe, WeightAlgorithmConfig
from qcompile.spec import ANNOTATION
from test_backend_gguf import tokenizer  # noqa: F401  (the gguf tests' tiny BPE tokenizer fixture)


class TwoLinear(nn.Module):
    def __init__(self, k=64, n=64, out=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(k, n, bias=False), nn.Linear(n, out, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
            self.b.weight.copy_(torch.randn(out, n, generator=g) / n ** 0.5)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _data(n=4, k=64):
    g = torch.Generator().manual_seed(3)
    items = []
    for _ in range(n):
        x = torch.randn(1, 24, k, generator=g)
        x[..., 5] *= 20   # an outlier channel: the int8 blocks holding it round the others coarsely
        items.append((x,))
    return items


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's quantize_row_q8_0 then dequantize, written out: per block of 32, d = amax / 127,
    codes round(x / d) (half to even), value d * code."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0).clamp(-127, 127)
    return (codes * d).reshape(x.shape)


def _recipe(quantized_inputs=True, activation=True, method="gptq"):
    r = gguf_recipe("Q4_0", "gptq", activations=activation)   # less its lm_head override (no head here)
    return dataclasses.replace(r, overrides={}, weight_algorithm=WeightAlgorithmConfig(method, quantized_inputs=quantized_inputs),
                               calibration=qcompile.CalibrationConfig(progress=False))


def _grams(monkeypatch):
    seen = []
    real = wa.ApplyWeightAlgorithmPass._stats

    def recording(run, op, max_rows=None, quantized=None):
        st = real(run, op, max_rows, quantized)
        seen.append((op.meta[ANNOTATION].layer, st.gram.clone(), st.rows))
        return st

    monkeypatch.setattr(wa.ApplyWeightAlgorithmPass, "_stats", staticmethod(recording))
    return seen


def test_recipe_field_round_trips_and_is_left_out_while_false():
    a8 = gguf_recipe("Q4_0", "gptq", activations=True)
    r = dataclasses.replace(a8, weight_algorithm=dataclasses.replace(a8.weight_algorithm, quantized_inputs=True))
    assert r.to_dict()["weight_algorithm"]["quantized_inputs"] is True
    assert Recipe.from_dict(r.to_dict()) == r
    off = gguf_recipe("Q4_0", "gptq")
    assert "quantized_inputs" not in off.to_dict()["weight_algorithm"]   # older records unchanged
    assert Recipe.from_dict(off.to_dict()) == off
    # an opt-in: the -a8 recipes keep the float Hessian (it gave the better file under llama.cpp)
    assert not a8.weight_algorithm.quantized_inputs
    assert not gguf_recipe("Q5_0", "awq", activations=True).weight_algorithm.quantized_inputs
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    assert not llama_cpp_mix(cfg, "q4_k_m", "gptq", activations=True)[0].weight_algorithm.quantized_inputs


def test_hessian_is_of_the_input_llama_cpp_quantizes(monkeypatch):
    """The first Linear's Gram matrix is that of llama.cpp's Q8_0 rounding of the model input (not of
    the float input), and the solved weights differ from those solved on the float input."""
    data = _data()
    seen = _grams(monkeypatch)
    q = qcompile.quantize(TwoLinear().eval(), _recipe(), data[0], calibration=data)
    layer, gram, rows = seen[0]
    assert layer == "a" and rows == 4 * 24
    x = torch.cat([d[0].reshape(-1, 64) for d in data])
    want = (_q8_0(x).double().T @ _q8_0(x).double())
    torch.testing.assert_close(gram, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    assert not torch.allclose(gram, x.double().T @ x.double(), rtol=1e-3)   # the float input's differs
    assert [e["method"] for e in q.report.weight_algorithm] == ["gptq", "gptq"]
    seen.clear()
    q_float = qcompile.quantize(TwoLinear().eval(), _recipe(quantized_inputs=False), data[0], calibration=data)
    torch.testing.assert_close(seen[0][1], x.double().T @ x.double(), rtol=1e-6, atol=1e-3)
    wq = {k: v for k, v in q.graph_module.state_dict().items() if k.endswith("_q")}
    wf = {k: v for k, v in q_float.graph_module.state_dict().items() if k.endswith("_q")}
    assert wq.keys() == wf.keys() and any(not torch.equal(wq[k], wf[k]) for k in wq)


def test_quantized_inputs_need_a_dynamic_activation_on_every_solved_layer():
    data = _data(2)
    with pytest.raises(RecipeError, match=r"weight_algorithm.quantized_inputs.*layer\(s\) a .*dynamic activation"):
        qcompile.quantize(TwoLinear().eval(), _recipe(activation=False), data[0], calibration=data)
    r = _recipe()   # one layer's input left in float
    r = dataclasses.replace(r, overrides={"b": LayerConfig(r.default.weight)})
    with pytest.raises(RecipeError, match=r"layer\(s\) b "):
        qcompile.quantize(TwoLinear().eval(), r, data[0], calibration=data)


def test_awq_refuses_quantized_inputs():
    data = _data(2)
    with pytest.raises(RecipeError, match="weight_algorithm.quantized_inputs.*'awq'"):
        qcompile.quantize(TwoLinear().eval(), _recipe(method="awq"), data[0], calibration=data)
    bad = _recipe().to_dict()
    bad["weight_algorithm"]["quantized_inputs"] = "yes"
    with pytest.raises(RecipeError, match="weight_algorithm.quantized_inputs"):
        Recipe.from_dict(bad)
    assert gguf_activation("Q4_0").dynamic


def test_llama_cpp_runs_the_gptq_a8_file_like_the_reference(tmp_path, tokenizer):  # noqa: F811
    """End to end on a tiny Llama: ``gguf-q4_0-gptq-a8`` with ``quantized_inputs`` (solved on llama.cpp's int8 activation blocks),
    written bit for bit (verify_gguf), run by llama.cpp itself within the backend tests' logit
    tolerance of the reference (which quantizes its activations as llama.cpp does)."""
    pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python): pip install 'qcompile[gguf]'")
    from qcompile.backends.gguf import verify_gguf
    from test_backend_gguf import logits_within_tolerance
    from test_gguf_kquants import _quantize, _tiny_llama

    tok = tokenizer
    model = _tiny_llama(64, 128, 2, 0.1)
    a8 = gguf_recipe("Q4_0", "gptq", activations=True)
    a8 = dataclasses.replace(a8, weight_algorithm=dataclasses.replace(a8.weight_algorithm, quantized_inputs=True))
    q = _quantize(model, a8, tok)
    assert [e["method"] for e in q.report.weight_algorithm].count("gptq") == 14   # 7 Linears x 2 layers
    art = qcompile.lower(q, backend="gguf", config=model.config, tokenizer=tok)
    path = art.save(tmp_path / "a8.gguf")
    assert set(verify_gguf(path, q, model.config).values()) == {"F32", "Q4_0", "Q8_0"}
    logits_within_tolerance(q, art, tok)


def test_awq_gguf_file_folds_into_norms_only_and_llama_cpp_runs_it(tmp_path, tokenizer):  # noqa: F811
    """``gguf-q5_0-awq``: AWQ's 1/s goes into the RMSNorm weights (written under their GGUF names) and
    nowhere else (``fold_only``: o_proj/down_proj clip only); llama.cpp loads the file and runs it
    within the logit tolerance. The same AWQ with inserted ``mul``s is refused by layer, not written
    without them."""
    pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python): pip install 'qcompile[gguf]'")
    from qcompile.backends.gguf import verify_gguf
    from qcompile.backends.gguf.llama import _norms
    from qcompile.errors import BackendError
    from test_backend_gguf import logits_within_tolerance
    from test_gguf_kquants import _quantize, _tiny_llama

    model = _tiny_llama(64, 128, 2, 0.1)
    recipe = gguf_recipe("Q5_0", "awq")
    assert recipe.name == "gguf-q5_0-awq" and recipe.weight_algorithm.fold_only
    recipe = dataclasses.replace(recipe, weight_algorithm=dataclasses.replace(recipe.weight_algorithm, grid=10,
                                                                              clip_grid=4))   # a faster search
    q = _quantize(model, recipe, tokenizer)
    how = {tuple(e["layers"]): e["inverse_scale"] for e in q.report.weight_algorithm if e["method"] == "awq"}
    assert all(v.startswith(("folded into", "none")) for v in how.values())
    assert how[("model.layers.0.mlp.down_proj",)].startswith("none (fold_only")
    norms = _norms(q.graph_module)
    assert len(norms) == 5   # 2 x (input, post-attention) and the final norm, folded or not
    folded = [k for k, v in norms.items() if not torch.equal(v, dict(model.named_parameters())[k + ".weight"])]
    assert folded, "no norm absorbed an AWQ scale"
    art = qcompile.lower(q, backend="gguf", config=model.config, tokenizer=tokenizer)
    path = art.save(tmp_path / "awq.gguf")
    types = verify_gguf(path, q, model.config)
    assert sum(1 for n in types if n.endswith("norm.weight")) == 5
    logits_within_tolerance(q, art, tokenizer)
    with_mul = dataclasses.replace(recipe, weight_algorithm=dataclasses.replace(recipe.weight_algorithm, fold_only=False))
    q_mul = _quantize(model, with_mul, tokenizer)
    with pytest.raises(BackendError, match=r"layer 'model\.layers\.\d\.(self_attn\.o_proj|mlp\.down_proj)'.*per-channel"):
        qcompile.lower(q_mul, backend="gguf", config=model.config, tokenizer=tokenizer)
