"""The KV cache update of a captured causal LM (:mod:`qcompile.llm.cache`) as one ``ScatterElements``
per cache tensor in the ONNX file, instead of the one-hot blend the capture writes.

The capture updates each cache as ``where(hit[t], onehot[t, s] @ new[s], past[t])`` (``onehot[t, s]
= (t == cache_position[s])``, ``hit = onehot.sum(1) > 0``): a form every importer takes, exact (one
non-zero term per row), but in onnxruntime it is a broadcasting ``Where`` plus a ``MatMul`` over the
whole ``max_context`` for every layer and token. Measured on SmolLM2-135M (30 layers, 256 slots),
the blend was ~13 % of a decode step's time. ``ScatterElements(past, positions, new, axis=2)`` writes
the same values (positions are distinct, so no two updates meet): a copy of ``past`` and ``S`` rows
written, nothing computed. The reference backend's graph keeps the blend; this changes only how the
ONNX file says it, and the file's numbers are equal to the blend's bit for bit (each slot is either
``past[t]`` or ``1.0 * new[s]`` summed with zeros).
"""
from __future__ import annotations

POSITIONS_INPUT = "cache_position"


def cache_blends_as_scatter(model) -> int:
    """Rewrite every ``Where(hit, MatMul(onehot, new), past)`` cache blend of ``model`` (an
    ``onnx.ModelProto`` with a ``cache_position`` input) into ``ScatterElements(past,
    positions, new, axis=2)``, in place, and drop the nodes left without consumers. A ``Where``
    whose ``MatMul`` does not read a one-hot of ``cache_position`` is left alone. Returns the number
    rewritten (0 for a model without a KV cache)."""
    import onnx
    from onnx import helper

    graph = model.graph
    if POSITIONS_INPUT not in {i.name for i in graph.input}:
        return 0
    producer = {o: n for n in graph.node for o in n.output}
    onehots = {name for name, node in producer.items() if _is_onehot_of_positions(node, producer)}
    blends = []
    for node in graph.node:
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx"):
            continue
        matmul = producer.get(node.input[1])
        if matmul is not None and matmul.op_type == "MatMul" and matmul.input[0] in onehots:
            blends.append((node, matmul.input[1]))
    if not blends:
        return 0
    # indices [1, 1, S, 1] int64, broadcast to each update's shape [B, H, S, D] (ScatterElements
    # takes indices of the updates' shape)
    axes, index = "qc_cache_positions_axes", "qc_cache_positions_4d"
    graph.initializer.append(onnx.numpy_helper.from_array(_int64([0, 1, 3]), axes))
    prologue = [helper.make_node("Unsqueeze", [POSITIONS_INPUT, axes], [index], name="qc_cache_positions_unsqueeze")]
    rewritten, index_of_shape = [], {}
    for i, (where, new) in enumerate(blends):
        key = _declared_shape(graph, new)
        nodes = []
        if key is None or key not in index_of_shape:   # one Expand per shape the file declares
            shape, indices = f"qc_cache_update_{i}_shape", f"qc_cache_update_{i}_indices"
            nodes += [helper.make_node("Shape", [new], [shape], name=f"qc_cache_update_{i}_shape"),
                      helper.make_node("Expand", [index, shape], [indices], name=f"qc_cache_update_{i}_expand")]
            if key is not None:
                index_of_shape[key] = indices
        else:
            indices = index_of_shape[key]
        nodes.append(helper.make_node("ScatterElements", [where.input[2], indices, new], [where.output[0]], axis=2,
                                      name=f"qc_cache_update_{i}"))
        rewritten.append((where, nodes))
    order = list(graph.node)
    first = min(order.index(w) for w, _ in rewritten)
    replaced = {id(w): nodes for w, nodes in rewritten}
    new_order = order[:first] + prologue + \
        [n for node in order[first:] for n in (replaced.get(id(node)) or [node])]
    del graph.node[:]
    graph.node.extend(new_order)
    drop_dead_nodes(model)
    return len(rewritten)


def _is_onehot_of_positions(node, producer) -> bool:
    """``Cast(Equal(a, b))`` where ``a`` or ``b`` is computed from ``cache_position`` alone (an
    Unsqueeze of it): the capture's ``onehot[t, s]``."""
    if node.op_type != "Cast" or producer.get(node.input[0]) is None:
        return False
    equal = producer[node.input[0]]
    if equal.op_type != "Equal":
        return False
    for name in equal.input:
        source = producer.get(name)
        while source is not None and source.op_type in ("Unsqueeze", "Reshape", "Cast"):
            if source.input[0] == POSITIONS_INPUT:
                return True
            source = producer.get(source.input[0])
    return False


def _declared_shape(graph, name: str):
    """The shape ``name`` is declared with as a graph output (symbolic dims by name), when it is one
    and every dim is named or fixed; else None. Two updates with the same declared shape (the keys
    and values of every layer: ``[s0, H_kv, s1, D]``) share one broadcast index tensor."""
    for output in graph.output:
        if output.name == name:
            dims = output.type.tensor_type.shape.dim
            shape = tuple(d.dim_param or d.dim_value for d in dims)
            return shape if dims and all(shape) else None
    return None


def _int64(values):
    import numpy as np

    return np.asarray(values, dtype=np.int64)


def drop_dead_nodes(model) -> int:
    """Remove nodes none of whose outputs reaches a graph output, and initializers no node reads
    any more. Returns the number of nodes removed."""
    graph = model.graph
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(node.input)
            for attr in node.attribute:   # subgraphs (If/Loop) read outer names too
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    live.update(i for n in sub.node for i in n.input)
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [t for t in graph.initializer if t.name not in live]
    for t in unused:
        graph.initializer.remove(t)
    return removed
