"""llama.cpp's k-quants (Q4_K, Q5_K, Q6_K) in the gguf backend: every super-block type packs
qcompile's codes and two-level scales so that ``gguf.quants.dequantize`` returns qcompile's
reference weight bit for bit (random codes, and codes solved by GPTQ in a tiny Llama whose rows are
multiples of 256); llama.cpp loads and runs the exported k-quant file; ``llama_cpp_mix`` gives every
layer the type llama.cpp's own quantizer gives it (checked against ``llama_model_quantize`` on the
same model, fallbacks for rows that are not multiples of 256 included); the refusals name the layer,
its grid and the nearest type; gguf-q4_0's round-to-nearest scale is llama.cpp's."""
import ctypes

import numpy as np
import pytest
import torch

import qcompile
from qcompile.backends.gguf import verify_gguf
from qcompile.backends.gguf.blocks import BLOCK_TYPES, match, refusal
from qcompile.backends.gguf.kquants import K_TYPES, match_k
from qcompile.backends.gguf.llama import _weights, rotary_permutation
from qcompile.errors import BackendError, RecipeError
from qcompile.formats import TWO_LEVEL, get_format, two_level_values
from qcompile.models import load_gguf
from qcompile.presets import _gguf_block, gguf_spec, llama_cpp_mix
from qcompile.recipe import LayerConfig, Recipe
from qcompile.spec import QuantSpec
from test_backend_gguf import PROMPTS, VOCAB, _greedy_agreement, _ids, logits_within_tolerance, tokenizer  # noqa: F401

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python): pip install 'qcompile[gguf]'")


def _tiny_llama(hidden: int, intermediate: int, layers: int, std: float):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                   attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model


@pytest.fixture(scope="module")
def llama256():
    """Rows of 256 and 512: every Linear and the embedding a whole number of super-blocks."""
    return _tiny_llama(256, 512, 1, 0.08)


def _quantize(model, recipe, tokenizer):
    ids = _ids(tokenizer, PROMPTS[0])
    return qcompile.quantize(model, recipe, ids, calibration=[_ids(tokenizer, p) for p in PROMPTS],
                             example_kwargs={"use_cache": False}, report_samples=1)


@pytest.mark.parametrize("name", list(K_TYPES))
def test_k_blocks_dequantize_bit_exactly_on_random_codes(name):
    ktype = K_TYPES[name]
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (256, ktype.block_bytes)
    rng = np.random.default_rng(0)
    rows, k = 3, 512
    fmt = get_format(ktype.format)
    codes = torch.from_numpy(rng.integers(fmt.qmin, fmt.qmax + 1, (rows, k))).to(fmt.storage)
    sub = get_format(TWO_LEVEL[ktype.scale_dtype])
    groups, supers = k // ktype.group_size, k // 256
    sc = torch.from_numpy(rng.integers(0, sub.qmax + 1, (rows, groups))).to(sub.storage)
    d = torch.from_numpy(rng.uniform(1e-4, 1e-2, (rows, supers))).half()
    scale = two_level_values(sc, d, ktype.group_size)
    mn = dmin = zp = None
    if ktype.zero_point_dtype:
        mn = torch.from_numpy(rng.integers(0, sub.qmax + 1, (rows, groups))).to(torch.uint8)
        dmin = torch.from_numpy(rng.uniform(1e-4, 1e-2, (rows, supers))).half()
        zp = two_level_values(mn, -dmin, ktype.group_size, torch.float64)
    ref = torch.ops.qcompile.dequantize(codes, scale, zp, ktype.format, ktype.group_size, torch.float32)
    u = (codes.to(torch.int16) - int(fmt.qmin)).to(torch.uint8).numpy()
    blocks = ktype.pack(u, sc.numpy(), d.numpy(), None if mn is None else mn.numpy(),
                        None if dmin is None else dmin.numpy())
    got = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name]).reshape(rows, k)
    assert np.array_equal(got.view(np.uint32), ref.numpy().view(np.uint32))


@pytest.fixture(scope="module")
def exported_k(llama256, tokenizer, tmp_path_factory):
    cache = {}

    def get(preset):
        if preset not in cache:
            q = _quantize(llama256, preset, tokenizer)
            art = qcompile.lower(q, backend="gguf", config=llama256.config, tokenizer=tokenizer)
            cache[preset] = q, art, art.save(tmp_path_factory.mktemp("gguf_k") / f"{preset}.gguf")
        return cache[preset]
    return get


def _value(gm, node):
    """What the reference backend computes at a stored tensor or a dequantize of stored tensors."""
    if not isinstance(node, torch.fx.Node):
        return node
    if node.op == "get_attr":
        return getattr(gm, node.target)
    return node.target(*[_value(gm, a) for a in node.args])


@pytest.mark.parametrize("name", list(K_TYPES))
@pytest.mark.parametrize("algorithm", [None, "gptq", "awq"])
def test_k_blocks_hold_qcompile_solved_codes_bit_exactly(name, algorithm):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 16, bias=False)).eval()
    x = torch.randn(4, 512)
    recipe = Recipe(name="k", default=LayerConfig(gguf_spec(name)),
                    weight_algorithm=None if algorithm is None else qcompile.recipe.WeightAlgorithmConfig(algorithm))
    q = qcompile.quantize(model, recipe, x, calibration=[torch.randn(32, 512) for _ in range(2)], report_samples=1)
    (node,) = [n for n in q.graph_module.graph.nodes if n.target == torch.ops.qcompile.dequantize.default
               and n.args[3] == K_TYPES[name].format]
    (weight,) = _weights(q.graph_module).values()
    ktype, blocks = match_k(weight, refusal)
    assert ktype.name == name
    got = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name]).reshape(16, 512)
    want = _value(q.graph_module, node)
    assert np.array_equal(got.view(np.uint32), want.numpy().view(np.uint32))
    if algorithm != "awq":   # (AWQ also scales the Linear's input)
        assert torch.equal(q(x), x @ want.t())   # the reference runs on exactly that weight


def test_the_k_quant_preset_writes_every_tensor_bit_exactly(exported_k, llama256):
    q, art, path = exported_k("gguf-q4_k_m-gptq")
    cfg = llama256.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    seen = set()
    for node in q.graph_module.graph.nodes:   # the weights' dequantize (reading the two-level scales)
        if node.target != torch.ops.qcompile.dequantize.default or node.args[3] not in ("uint4", "int6"):
            continue
        w = _value(q.graph_module, node)
        layer = node.meta["qcompile.layer"]
        t = tensors[names.get_name(f"{layer}.weight", try_suffixes=(".weight",))]
        want = "Q6_K" if layer.endswith(("v_proj", "down_proj")) else "Q4_K"
        assert t.tensor_type.name == want, layer
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if layer.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if layer.endswith("q_proj") else cfg.num_key_value_heads
            w = w[rotary_permutation(w.shape[0], heads)]
        assert np.array_equal(got.view(np.uint32), w.numpy().view(np.uint32)), f"{layer}: not bit-exact"
        seen.add(layer)
    assert len(seen) == 7 * cfg.num_hidden_layers
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"   # every preset keeps the tied head >= 8 bits


def test_llama_cpp_runs_the_k_quant_file_like_the_reference(exported_k, tokenizer):
    q, art, _ = exported_k("gguf-q4_k_m-gptq")
    for text, ref, got in logits_within_tolerance(q, art, tokenizer):
        exact, near_tie = _greedy_agreement(ref[0], got[0].argmax(-1))
        assert bool((exact | near_tie).all()) and exact.float().mean().item() >= 0.75


def test_llama_cpp_mix_gives_each_layer_llama_cpps_own_type(tokenizer, tmp_path):
    """llama.cpp's quantizer (Q4_K_M) on an F32 export of a model with 4 layers and rows of 64
    (not multiples of 256: fallbacks) and 256 (down_proj: Q4_K / Q6_K by layer): the same types
    per tensor as llama_cpp_mix, and qcompile's export of that mix writes them bit for bit."""
    model = _tiny_llama(64, 256, 4, 0.1)
    f32 = qcompile.lower(_quantize(model, "float", tokenizer), backend="gguf", config=model.config,
                         tokenizer=tokenizer).save(tmp_path / "f32.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 1
    theirs = tmp_path / "q4_k_m.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    their_types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(theirs)).tensors}
    recipe, types = llama_cpp_mix(model.config, "q4_k_m")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4)
    ours = {names.get_name(f"{layer}.weight", try_suffixes=(".weight",)): t for layer, (t, _) in types.items()}
    assert ours == {k: v for k, v in their_types.items() if k in ours}
    assert set(ours.values()) == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    assert "falls back to Q8_0" in types["model.embed_tokens"][1]
    art = qcompile.lower(_quantize(model, recipe, tokenizer), backend="gguf", config=model.config, tokenizer=tokenizer)
    assert {k: v for k, v in art.types.items() if k in ours} == ours


def test_a_k_quant_row_that_is_not_whole_super_blocks_names_llama_cpps_fallback(tokenizer):
    model = _tiny_llama(64, 256, 1, 0.1)
    recipe = Recipe(name="k", default=LayerConfig(gguf_spec("Q4_K")), embedding=LayerConfig(gguf_spec("Q8_0")),
                    tied_head="embedding")
    q = _quantize(model, recipe, tokenizer)
    with pytest.raises(BackendError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'.*uint4, groups of 32, "
                                           r"kquant6 two-level scales, kquant6 minima.*a row of 64 is not a whole "
                                           r"number of Q4_K super-blocks of 256; the nearest type is Q5_0, llama.cpp's "
                                           r"own fallback"):
        qcompile.lower(q, backend="gguf", config=model.config, tokenizer=tokenizer)


def test_a_two_level_grid_no_k_quant_holds_names_the_nearest_type(tokenizer):
    model = _tiny_llama(64, 128, 1, 0.1)
    k6_g32 = QuantSpec("int6", "per_group", symmetric=True, group_size=32, scale_dtype="kquant8")   # Q6_K: groups of 16
    q = _quantize(model, Recipe(name="k", default=LayerConfig(k6_g32), embedding=LayerConfig(gguf_spec("Q8_0"))),
                  tokenizer)
    with pytest.raises(BackendError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'.*int6, groups of 32, kquant8 "
                                           r"two-level scales.*nearest type is Q6_K"):
        qcompile.lower(q, backend="gguf", config=model.config, tokenizer=tokenizer)


def test_k_quant_and_signed_max_specs_are_validated():
    with pytest.raises(RecipeError, match=r"w\.scale_dtype.*per_group weights with a group size dividing 256"):
        QuantSpec("uint4", "per_group", symmetric=False, group_size=48, scale_dtype="kquant6").validate("w")
    with pytest.raises(RecipeError, match=r"w\.observer.*signed_max.*not 'int8'"):
        QuantSpec("int8", "per_group", group_size=32, observer="signed_max").validate("w")
    with pytest.raises(RecipeError, match=r"default\.activation\.observer.*weight scale rule"):
        Recipe(name="x", default=LayerConfig(None, QuantSpec("uint8", symmetric=True, observer="signed_max"))).validate()


def test_gguf_q4_0_round_to_nearest_takes_llama_cpps_scale():
    """gguf-q4_0's scales are llama.cpp's (``gguf.quants``' Q4_0 reference quantizer) exactly, and its
    codes agree except where llama.cpp rounds against the unrounded float32 scale."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(w)
    q = qcompile.quantize(model, "gguf-q4_0", torch.randn(1, 256), report_samples=1)
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(64, 8, 18)
    (weight,) = _weights(q.graph_module).values()
    btype, u, d, _ = match(weight)
    ours = btype.pack(u, d, None).reshape(64, 8, 18)
    assert btype is BLOCK_TYPES["Q4_0"]
    assert np.array_equal(ours[..., :2], theirs[..., :2])          # d: the signed max / -8, float16
    assert (ours[..., 2:] == theirs[..., 2:]).mean() > 0.99         # the code bytes
    assert _gguf_block(4).observer == "minmax" and qcompile.Recipe.preset("gguf-q4_0").default.weight.observer == "signed_max"


def test_verify_gguf_passes_the_file_and_names_a_flipped_block(exported_k, llama256, tmp_path):
    q, _, path = exported_k("gguf-q4_k_m-gptq")
    types = verify_gguf(path, q, llama256.config)
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q6_K"
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_k.weight")
    raw = bytearray(path.read_bytes())
    raw[int(tensor.data_offset) + 144 + 20] ^= 0x10   # a code byte of the second Q4_K block
    bad = tmp_path / "flipped.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(BackendError, match=r"'blk\.0\.attn_k\.weight' \(Q4_K, layer 'model\.layers\.0\.self_attn\."
                                           r"k_proj'\): 1 of \d+ blocks differ"):
        verify_gguf(bad, q, llama256.config)


def test_load_gguf_reads_an_exported_file_back_as_the_reference_weights(exported_k, llama256):
    """transformers' GGUF loader (via qcompile.models.load_gguf) on a qcompile k-quant file: every
    Linear's float weight is qcompile's reference dequantized weight bit for bit (the q/k rotary
    order undone), so a file can be re-quantized or checked from its float model."""
    q, _, path = exported_k("gguf-q4_k_m-gptq")
    loaded = load_gguf(path)
    assert loaded.types["blk.0.attn_q.weight"] == "Q4_K" and loaded.model.config.num_hidden_layers == 1
    gm = q.graph_module
    weights = {n.meta["qcompile.layer"]: _value(gm, n) for n in gm.graph.nodes
               if n.target == torch.ops.qcompile.dequantize.default and n.args[3] in ("uint4", "int6")}
    params = dict(loaded.model.named_parameters())
    for layer, w in weights.items():
        got = params[f"{layer}.weight"].detach()
        assert torch.equal(got, w), f"{layer}: the loaded float weight is not the reference's"
    ids = loaded.encode(PROMPTS[1])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, q(ids, use_cache=False).logits, atol=1e-4)


def test_load_gguf_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file at .*nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")
