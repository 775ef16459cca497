"""QuaRot's rotations inside a decoder layer (Ashkboos et al., 2024), after the residual stream's
(:mod:`.rotate`, R1). Both leave the float model's output unchanged.

* **R2, per head** (:class:`RotateHeadsPass`): attention is linear in its value and acts on each
  head's ``d`` channels alike, so rotating every head's value by one orthogonal ``H_d`` and
  rotating it back in ``o_proj`` is exact: ``v_proj`` rows, head by head, ``W_h ← H_dᵀ W_h``
  (bias ``b_h ← b_h H_d``); ``o_proj`` columns, head by head, ``W[:, h] ← W[:, h] H_d``. Folded
  offline: nothing is inserted. ``o_proj``'s input (the attention output) is then rotated per head,
  which spreads a head's outlier channel over the head.
* **R4, online** (:class:`OnlineHadamardPass`): the input of the MLP's writer (``down_proj``, the
  product ``act(gate) · up``) has no Linear before it to fold into, so it is rotated at run time:
  ``x ← x M`` with ``M = A ⊗ B`` orthogonal (:func:`~.hadamard.hadamard_factors`: SmolLM2's 1536
  = (H_12 ⊗ H_4)/√48 ⊗ H_32/√32, a true Hadamard: an outlier lands on all 1536 channels with equal
  magnitude), and ``W ← W M`` offline. The product is applied as two small matmuls on the input
  viewed as ``X = [..., a, b]``: ``Aᵀ X B``, computed as ``((X B)ᵀ A)ᵀ`` (``n · (a + b)`` multiply-adds per token, 80 per channel for
  1536, against ``n`` = 1536 for a dense ``x M``). The inserted nodes — ``unflatten``, two
  ``matmul`` by constants, two ``transpose``, ``flatten`` — are ordinary float ops every graph backend lowers
  (reference, ONNX, TVM, Triton); they sit before ``down_proj``'s activation quantizer, which then
  sees the rotated input. They carry ``ROLE = ONLINE_ROTATION`` so weights-only formats (GGUF,
  compressed-tensors) refuse the graph by name instead of dropping the rotation.

The attention (a ``scaled_dot_product_attention`` or an eager ``matmul(softmax(QKᵀ), V)``), its value projection and output projection
are found from the graph; a value or output path through anything but layout ops raises
:class:`~qcompile.errors.RotationError` naming the op.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import RotationError
from ..spec import LAYER, ONLINE_ROTATION, ROLE
from .hadamard import hadamard_factors, orthogonal_hadamard
from .infra import Pass, PassResult, add_tensor, get_attr_tensor
from .rotate import _layer, _set_arg, stream_writers

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

# ops that move elements without changing any, so a rotation of every d-channel block of the last
# dimension commutes with them as long as the last dimension stays a multiple of d and in place
_LAYOUT = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
                     aten.permute.default, aten.contiguous.default, aten.clone.default, aten.expand.default,
                     aten.unsqueeze.default, aten.slice.Tensor, aten.alias.default, aten._to_copy.default,
                     aten.to.dtype, aten.to.dtype_layout})
_NO_VALUE = frozenset({aten._assert_tensor_metadata.default})
_SOFTMAX = frozenset({aten.softmax.int, aten._softmax.default})
# between an eager attention's softmax and its P·V matmul (dtype casts, dropout)
_PROBS_PASS = frozenset({aten.to.dtype, aten._to_copy.default, aten.dropout.default, aten.clone.default,
                         aten.contiguous.default})


def attention_value(node):
    """The value operand of ``node`` when it is an attention: a ``scaled_dot_product_attention``,
    or an eager attention's ``matmul(softmax(...), V)``; else None."""
    if node.op != "call_function":
        return None
    if node.target == SDPA:
        return node.args[2]
    if node.target == aten.matmul.default:
        probs = node.args[0]
        while isinstance(probs, torch.fx.Node) and probs.op == "call_function" and probs.target in _PROBS_PASS:
            probs = probs.args[0]
        if isinstance(probs, torch.fx.Node) and probs.op == "call_function" and probs.target in _SOFTMAX:
            return node.args[1]
    return None


@dataclass
class HeadRotationResult(PassResult):
    """``pairs``: (value projection, output projection) layers rotated; ``head_dim``: ``d``."""

    pairs: list = field(default_factory=list)
    head_dim: int = 0


@dataclass
class OnlineHadamardResult(PassResult):
    """``layers``: the Linears whose input is rotated online; ``factors``: ``(a, b)`` per layer
    (``M = A ⊗ B``); ``exact_hadamard``: False where a size fell back to a random orthogonal block."""

    layers: list = field(default_factory=list)
    factors: dict = field(default_factory=dict)
    exact_hadamard: bool = True


class RotateHeadsPass(Pass):
    """R2: rotate every attention head's value by ``H_d`` (folded into ``v_proj`` and ``o_proj``).

    Example::

        >>> RotateHeadsPass()(gm).pairs   # [("model.layers.0.self_attn.v_proj", "...o_proj"), ...]"""

    name = "rotate_heads"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def call(self, gm):
        attentions = [n for n in gm.graph.nodes if attention_value(n) is not None]
        if not attentions:
            raise RotationError("rotation.per_head: the graph has no attention (scaled_dot_product_attention or "
                                "matmul(softmax(...), V)); the per-head rotation of V/O follows one (set "
                                "rotation.per_head to false)")
        result = HeadRotationResult(gm, True)
        for att in attentions:
            d = _last_dim(attention_value(att))
            if d is None:
                raise RotationError(f"rotation.per_head: attention '{att.name}' ({_layer(att)}) has no static head size")
            v_lin = _value_projection(gm, att, d)
            o_lin = _output_projection(gm, att, d)
            h = orthogonal_hadamard(d, self.seed)
            w = get_attr_tensor(gm, v_lin.args[1])
            rows = torch.einsum("ji,mjk->mik", h, w.double().reshape(-1, d, w.shape[1])).reshape(w.shape)
            _set_arg(gm, v_lin, 1, rows.to(w.dtype), "rot_heads", _layer(v_lin))
            if len(v_lin.args) > 2 and v_lin.args[2] is not None:
                b = get_attr_tensor(gm, v_lin.args[2])
                _set_arg(gm, v_lin, 2, (b.double().reshape(-1, d) @ h).reshape(b.shape).to(b.dtype), "rot_heads",
                         _layer(v_lin))
            w = get_attr_tensor(gm, o_lin.args[1])
            cols = (w.double().reshape(w.shape[0], -1, d) @ h).reshape(w.shape)
            _set_arg(gm, o_lin, 1, cols.to(w.dtype), "rot_heads", _layer(o_lin))
            result.pairs.append((_layer(v_lin), _layer(o_lin)))
            result.head_dim = d
        result.changed = [layer for pair in result.pairs for layer in pair]
        return result


class OnlineHadamardPass(Pass):
    """R4: rotate the input of every residual-stream writer that is not an attention output (the
    MLP's ``down_proj``) online by ``A ⊗ B``, and its weight offline by the same matrix.

    Example::

        >>> OnlineHadamardPass()(gm).layers   # ["model.layers.0.mlp.down_proj", ...]"""

    name = "online_hadamard"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def call(self, gm):
        result = OnlineHadamardResult(gm, False)
        for lin in stream_writers(gm):
            if _from_attention(lin.args[0]):
                continue
            w = get_attr_tensor(gm, lin.args[1])
            a, b, exact = hadamard_factors(w.shape[1], self.seed)
            x = lin.args[0]
            _replace_input(gm, lin, _rotate_online(gm, x, a.to(w.dtype), b.to(w.dtype), lin))
            m = torch.kron(a.contiguous(), b.contiguous())
            _set_arg(gm, lin, 1, (w.double() @ m).to(w.dtype), "rot_online", _layer(lin))
            result.layers.append(_layer(lin))
            result.factors[_layer(lin)] = (a.shape[0], b.shape[0])
            result.exact_hadamard &= exact
        result.modified = bool(result.layers)
        result.changed = list(result.layers)
        return result


def _rotate_online(gm, x, a, b, lin):
    """Insert ``flatten(Aᵀ · unflatten(x, [a, b]) · B)`` before ``lin``; returns its output node."""
    layer = _layer(lin)

    def call(target, args):
        with gm.graph.inserting_before(lin):
            node = gm.graph.call_function(target, args)
        node.meta[LAYER], node.meta[ROLE] = layer, ONLINE_ROTATION
        node.meta["val"] = _fake_value(gm, target, args)
        return node

    def const(value, what):
        node = add_tensor(gm, f"{layer}.hadamard_{what}", value, lin)
        node.meta[LAYER], node.meta[ROLE] = layer, ONLINE_ROTATION
        node.meta["val"] = _fake(x, value)
        return node

    # only right-multiplications by 2-D constants (X B, then (X B)ᵀ A = Yᵀ): what every importer
    # turns into a plain matmul; positive dims (TVM's importer does not normalize negative ones)
    rank = x.meta["val"].dim()
    y = call(aten.unflatten.int, (x, rank - 1, [a.shape[0], b.shape[0]]))
    if b.shape[0] > 1:
        y = call(aten.matmul.default, (y, const(b, "right")))
    if a.shape[0] > 1:
        y = call(aten.transpose.int, (y, rank - 1, rank))
        y = call(aten.matmul.default, (y, const(a, "left")))
        y = call(aten.transpose.int, (y, rank - 1, rank))
    return call(aten.flatten.using_ints, (y, rank - 1, rank))


def _fake(like, value):
    val = like.meta.get("val")
    mode = getattr(val, "fake_mode", None)
    return mode.from_tensor(value) if mode is not None else value


def _fake_value(gm, target, args):
    """The node's ``meta["val"]``: the op run on its inputs' fake values (shapes stay symbolic)."""
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in args]
    mode = next((getattr(v, "fake_mode", None) for v in vals if getattr(v, "fake_mode", None) is not None), None)
    if mode is None or any(isinstance(a, torch.fx.Node) and v is None for a, v in zip(args, vals)):
        return None
    with mode:
        return target(*vals)


def _replace_input(gm, lin, new):
    args = list(lin.args)
    args[0] = new
    lin.args = tuple(args)


def _last_dim(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    d = val.shape[-1] if isinstance(val, torch.Tensor) and val.dim() else None
    return d if isinstance(d, int) else None


def _keeps_blocks(node, src, d) -> bool:
    """``node`` moves ``src``'s elements without touching any d-block of the last dimension."""
    if not (node.op == "call_function" and node.target in _LAYOUT and node.args and node.args[0] is src):
        return False
    last = _last_dim(node)
    if last is None or last % d:
        return False
    rank = node.meta["val"].dim()
    if node.target == aten.transpose.int:
        return all(a % rank != rank - 1 for a in node.args[1:3])
    if node.target == aten.permute.default:
        return list(node.args[1])[-1] % rank == rank - 1
    if node.target == aten.slice.Tensor:
        return (node.args[1] if len(node.args) > 1 else 0) % rank != rank - 1
    return True


def _users(node):
    return [u for u in node.users if not (u.op == "call_function" and u.target in _NO_VALUE)]


def _value_projection(gm, att, d):
    """The Linear producing ``att``'s value through layout ops only, each read once."""
    src = attention_value(att)
    while not (src.op == "call_function" and src.target == aten.linear.default):
        if len(_users(src)) != 1 or not _keeps_blocks(src, src.args[0] if src.args else None, d):
            raise RotationError(f"rotation.per_head: the value of attention '{att.name}' ({_layer(att)}) comes through "
                                f"node '{src.name}' ({src.target}), which is not a layout op read only there: a "
                                "per-head rotation of V cannot pass it")
        src = src.args[0]
    if len(_users(src)) != 1 or get_attr_tensor(gm, src.args[1]) is None or \
            (len(src.args) > 2 and src.args[2] is not None and get_attr_tensor(gm, src.args[2]) is None) or \
            get_attr_tensor(gm, src.args[1]).shape[0] % d:
        raise RotationError(f"rotation.per_head: the value projection '{_layer(src)}' of attention '{att.name}' is not "
                            f"a Linear with constant weights read only by it, with a multiple of {d} outputs")
    return src


def _output_projection(gm, att, d):
    """The Linear reading ``att``'s output through layout ops only, each read once."""
    src = att
    while True:
        users = _users(src)
        if len(users) != 1:
            break
        user = users[0]
        if user.op == "call_function" and user.target == aten.linear.default and user.args[0] is src:
            w = get_attr_tensor(gm, user.args[1])
            if w is not None and w.shape[1] % d == 0:
                return user
            break
        if not _keeps_blocks(user, src, d):
            break
        src = user
    what = ", ".join(f"'{u.name}' ({u.target})" for u in _users(src)) or "nothing"
    raise RotationError(f"rotation.per_head: the output of attention '{att.name}' ({_layer(att)}) reaches {what}, not "
                        "a Linear with a constant weight through layout ops only: the per-head rotation cannot be "
                        "folded back into an output projection")


def _from_attention(x) -> bool:
    """``x`` is an attention's output moved by layout ops (an ``o_proj`` input, R2's business)."""
    while isinstance(x, torch.fx.Node) and x.op == "call_function":
        if attention_value(x) is not None:
            return True
        if x.target not in _LAYOUT:
            return False
        x = x.args[0]
    return False
