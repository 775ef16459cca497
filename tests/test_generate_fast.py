"""The fast decode paths of ``qcompile.generate`` (issue 20, speed): the ONNX artifact's IOBinding
decoder against the plain call, token for token and logit for logit, and the capture at
``max_batch`` 2 that TVM could not build (one batch symbol for every cache input)."""
import pytest
import torch

import qcompile
from conftest import tiny_causal_lm
from qcompile.llm import write_new_entries
from qcompile.llm.generation import decoder

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(batch, seq, seed=1):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _quantized(model, recipe, max_batch=8):
    lm = qcompile.causal_lm(model, max_context=32, max_batch=max_batch)
    calibration = lm.calibration([_prompt(2, 8, seed=s) for s in range(2)])
    return qcompile.quantize(lm, recipe, lm.example_inputs, calibration=calibration, **lm.capture_options)


@pytest.fixture(scope="module")
def onnx_w4():
    q = _quantized(tiny_causal_lm("llama"), "w4-g64")
    return q, qcompile.lower(q, "onnx", threads=1)


def test_onnx_decoder_steps_equal_the_plain_call(onnx_w4):
    q, art = onnx_w4
    layout = qcompile.llm.cache_layout(art)
    fast = decoder(art, layout, 2)
    assert type(fast).__name__ == "OnnxDecoder"
    cache, ids = layout.empty_cache(2), _prompt(2, 9)
    # prefill 6 tokens, then 3 single-token steps: logits and the whole cache equal the plain path's
    for positions in (torch.arange(0, 6), torch.tensor([6]), torch.tensor([7]), torch.tensor([8])):
        logits, *new = art(ids[:, positions], positions, *cache)
        write_new_entries(cache, new, positions)
        got = fast(ids[:, positions], positions)
        assert torch.equal(got, logits)
        assert all(torch.equal(fast.cache[i], c) for i, c in enumerate(cache))


def test_onnx_generate_through_the_decoder_equals_the_reference(onnx_w4):
    q, art = onnx_w4
    for prompt in (_prompt(1, 5, seed=3), _prompt(2, 7, seed=4)):
        assert torch.equal(qcompile.generate(art, prompt, max_new_tokens=12),
                           qcompile.generate(q, prompt, max_new_tokens=12))


def test_onnx_decoder_refuses_a_file_without_the_layouts_signature(onnx_w4):
    # a layout that does not describe the file (another layer count): the plain loop runs it instead
    import dataclasses
    from qcompile.backends.onnx.decode import OnnxDecoder

    _, art = onnx_w4
    layout = qcompile.llm.cache_layout(art)
    other = dataclasses.replace(layout, layers=layout.layers + 1)
    assert "not the captured cache signature" in OnnxDecoder.supports(art.session, other)
    assert art.decoder(other, 1) is None
    assert type(decoder(art, layout, 1)).__name__ == "OnnxDecoder"


def test_onnx_file_updates_the_cache_by_scatter_not_by_a_blend(onnx_w4):
    # the capture's one-hot where() blend over the whole max_context becomes one ScatterElements per
    # cache tensor (13 % of SmolLM2's decode step was that blend); the steps above check its numbers
    import onnx

    _, art = onnx_w4
    layout = qcompile.llm.cache_layout(art)
    graph = onnx.load_from_string(art.model_bytes).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("ScatterElements") == 2 * layout.layers
    assert ops.count("Expand") >= 1 and "ReduceSum" not in ops and "Equal" not in ops   # the one-hot is gone
    assert sum(n.op_type == "Expand" and n.name.startswith("qc_cache_update") for n in graph.node) == 1


def test_a_where_that_is_not_a_cache_blend_is_left_alone():
    # a Where over a MatMul of anything but a one-hot of cache_position (and a file without
    # cache_position at all) is not rewritten
    import onnx
    from onnx import TensorProto, helper
    from qcompile.backends.onnx.cache_update import cache_blends_as_scatter

    def model(inputs):
        nodes = [helper.make_node("MatMul", ["a", "b"], ["m"]), helper.make_node("Where", ["c", "m", "p"], ["y"])]
        value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in ("a", "b", "p")]
        value.append(helper.make_tensor_value_info("c", TensorProto.BOOL, [4, 4]))
        value += [helper.make_tensor_value_info(n, TensorProto.INT64, [1]) for n in inputs]
        graph = helper.make_graph(nodes, "g", value, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])])
        return helper.make_model(graph)

    for m in (model(["cache_position"]), model([])):
        before = m.SerializeToString()
        assert cache_blends_as_scatter(m) == 0
        assert m.SerializeToString() == before


def test_onnx_rms_norm_is_written_in_the_form_onnxruntime_fuses(onnx_w4):
    # x * Reciprocal(Sqrt(v)) -> x / Sqrt(v), which SimplifiedLayerNormFusion turns into one node per
    # norm; the decoder and generate tests above check the numbers (token for token)
    import onnx
    from onnx import TensorProto, helper
    from qcompile.backends.onnx.rewrites import rsqrt_scale_as_div

    _, art = onnx_w4
    ops = [n.op_type for n in onnx.load_from_string(art.model_bytes).graph.node]
    assert "Reciprocal" not in ops and ops.count("Div") == 2 * 2 + 1   # two norms per layer, one final
    # a Reciprocal read twice is kept: the rewrite would compute it twice
    nodes = [helper.make_node("Sqrt", ["v"], ["s"]), helper.make_node("Reciprocal", ["s"], ["r"]),
             helper.make_node("Mul", ["x", "r"], ["y"]), helper.make_node("Mul", ["r", "x"], ["z"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("v", "x")]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("y", "z")]
    m = helper.make_model(helper.make_graph(nodes, "g", io, out))
    assert rsqrt_scale_as_div(m) == 0 and [n.op_type for n in m.graph.node] == ["Sqrt", "Reciprocal", "Mul", "Mul"]


def test_grouped_attention_scores_exactly_like_eager():
    # the queries grouped per KV head instead of the cache repeated per query head: same logits
    model = tiny_causal_lm("llama")           # 4 heads on 2 KV heads
    ids, cache = _prompt(2, 9), None
    logits = {}
    for impl in ("eager", "qcompile_grouped"):
        lm = qcompile.causal_lm(model, max_context=32, attn_implementation=impl)
        cache = lm.layout.empty_cache(2)
        logits[impl] = lm(ids, torch.arange(9), *cache)[0]
    assert torch.equal(logits["eager"], logits["qcompile_grouped"])


def test_onnx_grouped_attention_reads_the_cache_without_copying_it_per_head():
    import onnx

    model = tiny_causal_lm("llama", num_hidden_layers=1)
    model.set_attn_implementation("eager")
    files = {}
    for impl in ("eager", "qcompile_grouped"):
        lm = qcompile.causal_lm(model, max_context=32, attn_implementation=impl)
        q = qcompile.quantize(lm, "w4-g64", lm.example_inputs, calibration=lm.calibration([_prompt(2, 8)]),
                              **lm.capture_options)
        art = qcompile.lower(q, "onnx", threads=1)
        files[impl] = [n.op_type for n in onnx.load_from_string(art.model_bytes).graph.node]
        prompt = _prompt(1, 5, seed=3)
        assert torch.equal(qcompile.generate(art, prompt, max_new_tokens=8), qcompile.generate(q, prompt, max_new_tokens=8))
    # eager's repeat_kv is one Expand per cache tensor (K, V of the one layer); grouped has none of them
    assert files["eager"].count("Expand") - files["qcompile_grouped"].count("Expand") == 2


def test_max_batch_two_captures_one_batch_symbol():
    # torch.export gave every cache input its own batch symbol when the batch dim's range was [1, 2];
    # TVM then could not infer the shape of the cache blend's where() (SmolLM2 failed to build)
    lm = qcompile.causal_lm(tiny_causal_lm("llama"), max_context=32, max_batch=2)
    options = lm.capture_options
    ep = torch.export.export(lm, lm.example_inputs, options["example_kwargs"], dynamic_shapes=options["dynamic_shapes"])
    batch_dims = {str(n.meta["val"].shape[0]) for n in ep.graph.nodes
                  if n.op == "placeholder" and n.name.startswith(("input_ids", "past_"))}
    assert len(batch_dims) == 1, batch_dims
    with pytest.raises(qcompile.GenerationError, match="max_batch 2"):
        qcompile.generate(lm, _prompt(3, 4), max_new_tokens=2)


@pytest.mark.slow
def test_tvm_generates_at_max_batch_two():
    # the graph TVM could not build before (SmolLM2's benchmark captured with max_batch=2): legalizing
    # the expand_dims after the cache blend's where() failed on a tensor of unknown shape (~80 s build)
    pytest.importorskip("tvm")
    model = tiny_causal_lm("llama", num_hidden_layers=1)
    model.set_attn_implementation("eager")
    q = _quantized(model, "w4-g64", max_batch=2)
    art = qcompile.lower(q, "tvm", threads=1)
    prompt = _prompt(2, 5, seed=7)
    assert torch.equal(qcompile.generate(art, prompt, max_new_tokens=6), qcompile.generate(q, prompt, max_new_tokens=6))
