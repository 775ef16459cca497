"""Generation token for token against the reference backend on every backend (onnx, tvm, and triton
under ``TRITON_INTERPRET=1``) for tiny Llama, Qwen2 and GPT-2 models built from transformers configs,
and dynamic int8 activations on ONNX at batch 2 (onnxruntime's MatMulIntegerToFloat fusion of a
per-axis DequantizeLinear used to fail there: its activation zero point must be a scalar)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

import qcompile  # noqa: E402
from conftest import tiny_causal_lm  # noqa: E402

transformers = pytest.importorskip("transformers")

MAX_CONTEXT = 24
NEW_TOKENS = 5
GPT2_IDS = dict(bos_token_id=0, eos_token_id=0)   # inside the 256-token vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(batch=2, seq=6, seed=1):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _quantized(kind, recipe):
    lm = qcompile.causal_lm(tiny_causal_lm(kind, **GPT2_IDS if kind == "gpt2" else {}), max_context=MAX_CONTEXT)
    calibration = lm.calibration([_prompt(2, 8, seed=s) for s in range(2)])
    return qcompile.quantize(lm, recipe, lm.example_inputs, calibration=calibration, **lm.capture_options)


def _triton_interpreted() -> bool:
    try:
        from qcompile.backends.triton import graph_ops
    except ImportError:
        return False
    return graph_ops.INTERPRET


def _lower(q, backend):
    if backend == "triton":
        if not _triton_interpreted():
            pytest.skip("triton is not installed, or was imported without TRITON_INTERPRET=1")
        return qcompile.lower(q, "triton")
    pytest.importorskip("onnxruntime" if backend == "onnx" else "tvm")
    return qcompile.lower(q, backend, threads=1)


EXHAUSTIVE = pytest.mark.exhaustive   # a TVM build or a second ONNX export per model: tens of seconds each on 2 cores
CASES = [("llama", "triton", "w8a8-dynamic"), ("gpt2", "triton", "w4-g64"), ("llama", "onnx", "w8a8-dynamic"),
         pytest.param("qwen2", "triton", "w4-g64", marks=EXHAUSTIVE), pytest.param("qwen2", "onnx", "w4-g64", marks=EXHAUSTIVE),
         pytest.param("gpt2", "onnx", "w8a8-dynamic", marks=EXHAUSTIVE), pytest.param("qwen2", "tvm", "w4-g64", marks=EXHAUSTIVE),
         # found by this test: TVM's re-export of GPT-2's dynamic-int8 cache graph traced its attention
         # output with other strides, and Conv1D's view failed (fixed: ViewsAsReshapesPass)
         pytest.param("gpt2", "tvm", "w8a8-dynamic", marks=EXHAUSTIVE)]


@pytest.mark.parametrize("kind, backend, recipe", CASES)
def test_greedy_equals_the_reference_token_for_token(kind, backend, recipe):
    # batch 2 throughout: dynamic int8 on ONNX used to fail above batch 1 (the module docstring)
    q = _quantized(kind, recipe)
    art = _lower(q, backend)
    if backend == "triton":          # the Linears really ran as Triton kernels, not PyTorch
        assert art.fused, f"no Linear of the {kind} cache graph was lowered to a Triton kernel: {art.skipped}"
    if backend == "onnx" and recipe == "w8a8-dynamic":
        _assert_run_time_scales_stay_elementwise(art)
    for prompt in (_prompt(2, 6), _prompt(1, 3, seed=5)):
        assert torch.equal(qcompile.generate(q, prompt, max_new_tokens=NEW_TOKENS),
                           qcompile.generate(art, prompt, max_new_tokens=NEW_TOKENS))


def _assert_run_time_scales_stay_elementwise(art):
    # the LM head quantizes one position ([B, 1, 1] scales): the file must not carry them as a
    # per-axis DequantizeLinear, which onnxruntime fuses into a MatMulIntegerToFloat that needs a scalar
    import onnx

    graph = onnx.load_from_string(art.model_bytes).graph
    produced = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}

    def constant(name):
        node = produced.get(name)
        return name in initializers or (node is not None and (
            node.op_type == "Constant" or node.op_type in ("Reshape", "Identity", "Cast") and constant(node.input[0])))

    checked = 0
    for node in graph.node:
        if node.op_type in ("DequantizeLinear", "QuantizeLinear") and len(node.input) > 1:
            # a run-time scale comes out of the choose_qparams math: never a Q/DQ's scale
            assert constant(node.input[1]), f"{node.name} reads a run-time scale"
            checked += 1
    assert checked >= 8      # the weights' DequantizeLinear were looked at
