"""The gguf backend: a tiny Llama (transformers ``LlamaConfig``, a byte-level BPE tokenizer trained
here) quantized with each ``gguf-*`` preset, written as GGUF, read back with the ``gguf`` package
(every quantized tensor bit for bit against qcompile's reference dequantized weight), and loaded
and run by llama.cpp itself (llama-cpp-python): logits against the reference backend's, greedy
tokens; the refusals name the layer, its grid and the nearest type."""
import importlib.util

import numpy as np
import pytest
import torch

import qcompile
from qcompile.backends.gguf.blocks import BLOCK_TYPES
from qcompile.backends.gguf.llama import rotary_permutation
from qcompile.errors import BackendError

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama_cpp (llama-cpp-python) is not installed: "
                                     "pip install 'qcompile[gguf]' builds it")

VOCAB = 384
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Return the value of the key, or a default.",
           "import os\nprint(os.path.join('a', 'b'))", "Numbers: 1, 2, 3, 4, 5, 6, 7, 8."]
# llama.cpp multiplies quantized weights by Q8-quantized activations (its CPU dot products), the
# reference by float activations: logits agree to a few percent of their range, not bit for bit
LOGIT_TOL = 0.03
PRESETS = {"gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0", "gguf-q4_1": "Q4_1", "gguf-q5_0": "Q5_0",
           "gguf-q5_1": "Q5_1", "gguf-q4_0-gptq": "Q4_0", "gguf-q4_1-gptq": "Q4_1"}


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([qcompile.__doc__ or ""] + PROMPTS * 4 + [torch.nn.Module.__doc__], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def llama(tokenizer):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, rms_norm_eps=1e-5, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # larger than the init's 0.02, so logits have a range worth comparing
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text)["input_ids"]], dtype=torch.int64)


@pytest.fixture(scope="module")
def exported(llama, tokenizer, tmp_path_factory):
    """preset -> (quantized model, saved GGUF path), built on first use."""
    cache = {}

    def get(preset):
        if preset not in cache:
            ids = _ids(tokenizer, PROMPTS[0])
            cal = [_ids(tokenizer, p) for p in PROMPTS]
            q = qcompile.quantize(llama, preset, ids, calibration=cal, example_kwargs={"use_cache": False},
                                  report_samples=1)
            art = qcompile.lower(q, backend="gguf", config=llama.config, tokenizer=tokenizer, tokenizer_pre="default")
            cache[preset] = q, art, art.save(tmp_path_factory.mktemp("gguf") / f"{preset}.gguf")
        return cache[preset]
    return get


def _reference_weights(q) -> dict:
    """layer path -> its dequantized weight as the reference backend computes it."""
    gm, out = q.graph_module, {}
    for node in gm.graph.nodes:
        if node.target == torch.ops.qcompile.dequantize.default and node.args[0].op == "get_attr":
            args = [getattr(gm, a.target) if isinstance(a, torch.fx.Node) else a for a in node.args]
            out[node.meta["qcompile.layer"]] = torch.ops.qcompile.dequantize(*args)
    return out


@pytest.mark.parametrize("preset", list(PRESETS))
def test_blocks_dequantize_bit_exactly_to_the_reference_weights(preset, exported, llama):
    q, art, path = exported(preset)
    cfg = llama.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    ref = _reference_weights(q)
    assert len(ref) == 7 * cfg.num_hidden_layers + 1   # every Linear and the (tied) embedding
    assert "output.weight" not in tensors               # tied: llama.cpp reads token_embd
    for layer, w in ref.items():
        t = tensors[names.get_name(f"{layer}.weight", try_suffixes=(".weight",))]
        want = "Q8_0" if layer == "model.embed_tokens" else PRESETS[preset]
        assert t.tensor_type.name == want, layer
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if layer.endswith(("q_proj", "k_proj")):   # llama.cpp's rotary row order
            heads = cfg.num_attention_heads if layer.endswith("q_proj") else cfg.num_key_value_heads
            w = w[rotary_permutation(w.shape[0], heads)]
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), w.numpy().view(np.uint32)), f"{layer}: not bit-exact"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert art.types["blk.0.ffn_down.weight"] == PRESETS[preset]


def test_block_sizes_are_llama_cpps():
    for name, t in BLOCK_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (32, t.block_bytes)


def test_metadata_and_tokenizer(exported, llama, tokenizer):
    _, _, path = exported("gguf-q8_0")
    fields = gguf.GGUFReader(str(path)).fields
    value = {k: f.contents() for k, f in fields.items() if k != "tokenizer.ggml.merges"}
    cfg = llama.config
    assert value["general.architecture"] == "llama"
    assert value["llama.block_count"] == 2 and value["llama.embedding_length"] == 64
    assert value["llama.attention.head_count"] == 4 and value["llama.attention.head_count_kv"] == 2
    assert value["llama.rope.dimension_count"] == cfg.head_dim
    assert value["tokenizer.ggml.model"] == "gpt2"
    assert value["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(VOCAB)))
    assert value["tokenizer.ggml.token_type"][0] == 3   # <|endoftext|>: a control token


def _greedy_agreement(ref: torch.Tensor, tokens: torch.Tensor):
    """Per position: the reference's argmax is ``tokens`` (exact), or ``tokens`` is within the logit
    tolerance of the reference's best (a near-tie, where llama.cpp's Q8 activations may tip it)."""
    span = (ref.amax(-1) - ref.amin(-1)).max().item()
    picked = ref.gather(1, tokens[:, None])[:, 0]
    return ref.argmax(-1) == tokens, ref.amax(-1) - picked <= LOGIT_TOL * span


def logits_within_tolerance(q, art, tokenizer, label: str = "") -> list:
    """``(text, reference logits, llama.cpp logits)`` for each of PROMPTS, each checked: llama.cpp's
    logits within ``LOGIT_TOL`` of the reference's logit span."""
    rows = []
    for text in PROMPTS:
        ids = _ids(tokenizer, text)
        with torch.no_grad():
            ref = q(ids, use_cache=False).logits.float()
        got = art(ids)
        assert got.shape == ref.shape
        err = (got - ref).abs().max().item()
        span = (ref.amax(-1) - ref.amin(-1)).max().item()
        assert err <= LOGIT_TOL * span, f"{label} {text!r}: max |llama.cpp - reference| {err:.4f}, span {span:.3f}"
        rows.append((text, ref, got))
    return rows


@needs_llama_cpp
@pytest.mark.parametrize("preset", list(PRESETS))
def test_llama_cpp_runs_the_file_like_the_reference(preset, exported, tokenizer):
    q, art, path = exported(preset)
    for text, ref, got in logits_within_tolerance(q, art, tokenizer, preset):
        exact, near_tie = _greedy_agreement(ref[0], got[0].argmax(-1))
        assert bool((exact | near_tie).all()), f"{preset} {text!r}: llama.cpp's greedy token far from the reference's"
        assert exact.float().mean().item() >= 0.75


@needs_llama_cpp
def test_greedy_generation_agrees(exported, tokenizer):
    """32 tokens generated greedily by llama.cpp; the reference, fed the same text, picks each of
    them too, except at near-ties (top two logits within the logit tolerance), where llama.cpp's
    Q8 activations may tip the choice: a random tiny model has many."""
    q, art, _ = exported("gguf-q8_0")
    llm = art.llama()
    ids = _ids(tokenizer, PROMPTS[1])[0].tolist()
    llm.reset()
    gen = []
    for tok in llm.generate(ids, temp=0.0):
        gen.append(tok)
        if len(gen) == 32:
            break
    with torch.no_grad():
        ref = q(torch.tensor([ids + gen]), use_cache=False).logits[0, len(ids) - 1:-1].float()
    exact, near_tie = _greedy_agreement(ref, torch.tensor(gen))
    assert bool((exact | near_tie).all()), f"llama.cpp picked tokens the reference ranks far lower: {gen}"
    assert exact.float().mean().item() >= 0.75


def test_a_grid_no_type_holds_names_the_layer_and_the_nearest_type(llama, tokenizer):
    ids = _ids(tokenizer, PROMPTS[0])
    q = qcompile.quantize(llama, "w4-g64", ids, example_kwargs={"use_cache": False}, report_samples=1)
    with pytest.raises(BackendError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'.*uint4, groups of 64.*"
                                           r"nearest type is Q4_1"):
        qcompile.lower(q, backend="gguf", config=llama.config, tokenizer=tokenizer)


def test_bitsandbytes_double_quantized_scales_are_refused(llama, tokenizer):
    """Double-quantized (int8, bitsandbytes') scales: NotImplementedError naming them and the k-quant
    dtypes GGUF does store (tests/test_gguf_kquants.py); q4_k_m uses them in every layer."""
    from qcompile.recipe import LayerConfig, Recipe
    from qcompile.spec import QuantSpec

    ids = _ids(tokenizer, PROMPTS[0])
    k4 = QuantSpec("uint4", "per_group", symmetric=False, group_size=32, scale_dtype="int8")
    q = qcompile.quantize(llama, Recipe(name="k4", default=LayerConfig(k4)), ids,
                          example_kwargs={"use_cache": False}, report_samples=1)
    with pytest.raises(NotImplementedError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'.*bitsandbytes.*"
                                                  r"k-quants .* are scale_dtype kquant6/kquant8"):
        qcompile.lower(q, backend="gguf", config=llama.config, tokenizer=tokenizer)
    q = qcompile.quantize(llama, "q4_k_m", ids, example_kwargs={"use_cache": False}, report_samples=1)
    with pytest.raises(NotImplementedError, match=r"q_proj.*double-quantized \(int8\) scales"):
        qcompile.lower(q, backend="gguf", config=llama.config, tokenizer=tokenizer)


def test_activation_quantization_is_refused_by_the_contract(llama, tokenizer):
    ids = _ids(tokenizer, PROMPTS[0])
    q = qcompile.quantize(llama, "w8a8-dynamic", ids, example_kwargs={"use_cache": False}, report_samples=1)
    with pytest.raises(BackendError, match=r"backend 'gguf' does not lower format 'uint8' as dynamic per_token"):
        qcompile.lower(q, backend="gguf", config=llama.config, tokenizer=tokenizer)


def test_a_non_llama_model_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)).eval()
    q = qcompile.quantize(model, "gguf-q8_0", torch.randn(1, 64), report_samples=1)
    with pytest.raises(BackendError, match="needs the model's transformers config"):
        qcompile.lower(q, backend="gguf")
    with pytest.raises(BackendError, match="writes Llama-architecture causal LMs.*'gpt2'"):
        qcompile.lower(q, backend="gguf", config=transformers.GPT2Config())
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    with pytest.raises(BackendError, match="not a Llama causal LM"):
        qcompile.lower(q, backend="gguf", config=cfg, tokenizer=None)
