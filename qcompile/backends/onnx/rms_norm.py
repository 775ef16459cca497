"""RMSNorm in the form onnxruntime fuses: ``x * Reciprocal(Sqrt(v))`` written as ``x / Sqrt(v)``.

torch's ``x * torch.rsqrt(mean(x^2) + eps) * weight`` (Llama, Qwen2, SmolLM2's RMSNorm) exports as
``Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul -> Mul``: seven onnxruntime nodes per norm,
61 per SmolLM2 token, each a kernel launch on a ``[1, 576]`` row. onnxruntime's
``SimplifiedLayerNormFusion`` matches the ``... -> Sqrt -> Div -> Mul`` form only, and turns it into
one ``SimplifiedLayerNormalization`` node. The rewrite changes the last rounding of the scale (a
divide instead of a reciprocal then a multiply, ~1 ulp); the fused kernel's reduction order is
onnxruntime's. Greedy generation still equals the reference token for token on the tests
(tests/test_generate_fast.py)."""
from __future__ import annotations


def rsqrt_scale_as_div(model) -> int:
    """Rewrite each ``Mul(x, Reciprocal(Sqrt(v)))`` (either operand order) whose ``Reciprocal`` has
    no other consumer into ``Div(x, Sqrt(v))``, in place, and drop the ``Reciprocal``. Returns the
    number rewritten."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    uses: dict = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
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
