"""Rewrites of the exported ONNX graph into forms onnxruntime runs faster, with the same values
(or, where said, the same values up to the last rounding).

* :func:`residual_adds_as_sum`: a residual ``Add`` feeding a ``LayerNormalization`` as ``Sum``
  (bit for bit), so onnxruntime's slow SkipLayerNormalization fusion does not match it.
* :func:`rsqrt_scale_as_div`: RMSNorm in the form onnxruntime fuses, ``x * Reciprocal(Sqrt(v))``
  written as ``x / Sqrt(v)``.

Why the second: torch's ``x * torch.rsqrt(mean(x^2) + eps) * weight`` (Llama, Qwen2, SmolLM2's RMSNorm) exports as
``Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul -> Mul``: seven onnxruntime nodes per norm,
61 per SmolLM2 token, each a kernel launch on a ``[1, 576]`` row. onnxruntime's
``SimplifiedLayerNormFusion`` matches the ``... -> Sqrt -> Div -> Mul`` form only, and turns it into
one ``SimplifiedLayerNormalization`` node. The rewrite changes the last rounding of the scale (a
divide instead of a reciprocal then a multiply, ~1 ulp); the fused kernel's reduction order is
onnxruntime's. Greedy generation still equals the reference token for token on the tests
(tests/test_generate_fast.py)."""
from __future__ import annotations


def graph_index(graph) -> tuple[dict, dict, set]:
    """``(producer, uses, outputs)`` of an ONNX graph: the node writing each tensor name, how many
    node inputs read each name, and the graph's output names (what a rewrite must not drop)."""
    producer = {o: n for n in graph.node for o in n.output}
    uses: dict = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return producer, uses, {o.name for o in graph.output}


def residual_adds_as_sum(model) -> int:
    """Write each residual ``Add`` that feeds a ``LayerNormalization`` as a two-input ``Sum`` (the
    same ``a + b``, bit for bit). onnxruntime's SkipLayerNormFusion matches ``Add`` → LayerNormalization
    only; its SkipLayerNormalization CPU kernel measured 6-8x slower than the two ops (see
    :data:`.runtime.DISABLED_OPTIMIZERS`), so a file written this way runs at full speed in a plain
    onnxruntime session too, without that session option. An ``Add`` of a constant (a bias) or
    with other consumers is left alone. Returns the number rewritten."""
    graph = model.graph
    producer, consumers, outputs = graph_index(graph)
    constants = {i.name for i in graph.initializer} | \
        {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        add = producer.get(node.input[0])
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or \
                consumers.get(add.output[0]) != 1 or add.output[0] in outputs or set(add.input) & constants:
            continue
        add.op_type = "Sum"
        rewritten += 1
    return rewritten


def rsqrt_scale_as_div(model) -> int:
    """Rewrite each ``Mul(x, Reciprocal(Sqrt(v)))`` (either operand order) whose ``Reciprocal`` has
    no other consumer into ``Div(x, Sqrt(v))``, in place, and drop the ``Reciprocal``. Returns the
    number rewritten."""
    graph = model.graph
    producer, uses, outputs = graph_index(graph)
    dropped = []
    for node in graph.node:
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        for side in (1, 0):
            rec = producer.get(node.input[side])
            if rec is None or rec.op_type != "Reciprocal" or uses.get(rec.output[0]) != 1 or rec.output[0] in outputs:
                continue
            sqrt = producer.get(rec.input[0])
            if sqrt is None or sqrt.op_type != "Sqrt":
                continue
            other = node.input[1 - side]
            node.op_type = "Div"
            del node.input[:]
            node.input.extend([other, rec.input[0]])
            dropped.append(rec)
            break
    for rec in dropped:
        graph.node.remove(rec)
    return len(dropped)
