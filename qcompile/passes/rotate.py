"""QuaRot-style residual-stream rotation (Ashkboos et al., 2024), folded into the weights.

A pre-norm decoder (Llama: embedding → [RMSNorm → q/k/v … o_proj → add; RMSNorm → gate/up … down_proj
→ add] × L → RMSNorm → lm_head) carries one hidden vector ``h`` per token, the *residual stream*. It
is read only through RMSNorms (``h / rms(h) · γ``) and written only by residual adds of Linear
outputs. RMSNorm without its scale is invariant under any orthogonal ``Q`` (``rms(hQ) = rms(h)``),
so after each ``γ`` is absorbed into the Linears it feeds (``W ← W diag(γ)``, ``γ ← 1``) the stream
can be carried rotated, ``h' = hQ``, with no change to the model's output:

* readers (the Linears fed by a norm): ``W ← W diag(γ) Q``
* writers (the Linears whose output is added to the stream): ``W ← Qᵀ W``, ``b ← Qᵀ b``
* the embedding table: ``E ← E Q``

Rotated inputs and weights have their channel outliers spread over every channel, so per-token
activation scales and per-channel weight scales fit them at 4 bits.

``Q`` is the Kronecker product of a randomized Hadamard matrix of the largest power-of-two factor of
the hidden size and a seeded random orthogonal matrix (QR of a Gaussian) of the odd factor
(576 = 64 · 9: a 64 × 64 Hadamard ⊗ 9 × 9 orthogonal). The Hadamard part is what spreads an outlier
evenly (every entry has magnitude ``1/√n``); the odd factor of a hidden size is small, where a
random orthogonal block mixes nearly as well. (:mod:`.hadamard` also builds Paley orders — 12, 20,
24, … — used by the rotations inside a layer, :mod:`.rotate_inner`; this one was measured as is.)

The readers, writers and norms are found from the graph: the stream starts at the token
embedding's output and is followed through pass-through ops, RMSNorms and residual adds. Anything
else reading the stream (a LayerNorm, whose mean subtraction does not commute with ``Q``; an
activation; a graph output) raises :class:`~qcompile.errors.RotationError` naming the node.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import RotationError
from ..recipe import RotationConfig
from ..spec import LAYER
from .hadamard import hadamard, rotation_matrix  # noqa: F401  (re-exported: the rotation's matrices)
from .infra import Pass, PassResult, add_tensor, get_attr_tensor

aten = torch.ops.aten

# ops whose output is their (first) input unchanged in value: the stream passes through them
_PASS_THROUGH = frozenset({aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
                           aten.clone.default, aten.contiguous.default, aten.alias.default,
                           aten.dropout.default})
_NO_VALUE = frozenset({aten._assert_tensor_metadata.default})   # checks that read the stream, output nothing


@dataclass
class RotationResult(PassResult):
    """``readers``/``writers``: the layers whose weights were rotated on their input / output side;
    ``norms``: the RMSNorm scales absorbed (set to 1); ``untied``: Linears that read an embedding's
    table (a tied ``lm_head``): the head now holds ``E diag(γ) Q`` and the embedding ``E Q``, two
    tensors, each quantized on its own; ``size``: the hidden size."""

    readers: list = field(default_factory=list)
    writers: list = field(default_factory=list)
    norms: list = field(default_factory=list)
    untied: list = field(default_factory=list)
    size: int = 0


class RotateResidualPass(Pass):
    """Rotate the residual stream of a pre-norm (RMSNorm) decoder; see the module docstring.

    Example::

        >>> RotateResidualPass(RotationConfig(seed=0))(gm).readers   # q/k/v, gate/up, lm_head ..."""

    name = "rotate_residual"

    def __init__(self, config: RotationConfig = RotationConfig()):
        self.config = config

    def call(self, gm):
        embeddings, plan = _planned(gm)
        size = get_attr_tensor(gm, embeddings[0].args[0]).shape[1]
        q = rotation_matrix(size, self.config.seed)
        result = RotationResult(gm, True, size=size)
        tables = {emb.args[0].target for emb in embeddings}
        for emb in embeddings:
            e = get_attr_tensor(gm, emb.args[0])
            if e.shape[1] != size:
                raise RotationError(f"rotation: embedding '{_layer(emb)}' has width {e.shape[1]}, the stream {size}")
            _set_arg(gm, emb, 0, (e.double() @ q).to(e.dtype), "rot", _layer(emb))
        for norm_mul, gamma_arg, readers in plan.norms:
            gamma = torch.ones(size, dtype=torch.float64)
            if gamma_arg is not None:
                idx, g_node = gamma_arg
                g = get_attr_tensor(gm, g_node)
                gamma = g.double().reshape(-1)
                _set_arg(gm, norm_mul, idx, torch.ones_like(g), "absorbed", norm_mul.meta.get(LAYER, norm_mul.name))
                result.norms.append(norm_mul.meta.get(LAYER, norm_mul.name))
            for r in readers:
                w = get_attr_tensor(gm, r.args[1])
                _check_width(r, w.shape[1], size)
                if r.args[1].target in tables:
                    result.untied.append(_layer(r))
                _set_arg(gm, r, 1, ((w.double() * gamma[None, :]) @ q).to(w.dtype), "rot", _layer(r))
                result.readers.append(_layer(r))
        for w_lin in plan.writers:
            w = get_attr_tensor(gm, w_lin.args[1])
            _check_width(w_lin, w.shape[0], size)
            _set_arg(gm, w_lin, 1, (q.t() @ w.double()).to(w.dtype), "rot", _layer(w_lin))
            if len(w_lin.args) > 2 and w_lin.args[2] is not None:
                b = get_attr_tensor(gm, w_lin.args[2])
                _set_arg(gm, w_lin, 2, (b.double() @ q).to(b.dtype), "rot", _layer(w_lin))
            result.writers.append(_layer(w_lin))
        result.changed = result.readers + result.writers
        return result


def _planned(gm):
    """(the token embeddings, the :class:`_Plan` of the residual stream they start)."""
    embeddings = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.embedding.default
                  and get_attr_tensor(gm, n.args[0]) is not None]
    if not embeddings:
        raise RotationError("rotation: no token embedding with a constant table found; the residual stream "
                            "starts at one (a decoder-only LM)")
    plan = _Plan()
    for emb in embeddings:
        plan.follow(gm, emb)
    return embeddings, plan


def stream_writers(gm) -> list:
    """The Linear nodes whose outputs the residual adds write into the stream (``o_proj``,
    ``down_proj`` of a Llama), found from the graph; raises :class:`RotationError` where the stream
    is read by something the rotation cannot take."""
    return list(_planned(gm)[1].writers)


class _Plan:
    """The stream's readers (grouped by the norm feeding them), writers and norms, found by walking
    every use of the stream from the embedding's output; raises on any use it cannot rotate."""

    def __init__(self):
        self.norms: list = []      # (the γ-multiply or the normalizing multiply, (arg index, γ node) | None, readers)
        self.writers: list = []
        self.seen: set = set()

    def follow(self, gm, start):
        todo = [start]
        while todo:
            x = todo.pop()
            if x in self.seen:
                continue
            self.seen.add(x)
            for user in list(x.users):
                todo.extend(self._use(gm, x, user))

    def _use(self, gm, x, user):
        """The stream nodes ``user`` produces from stream node ``x`` (after recording what it reads)."""
        t = user.target if user.op == "call_function" else None
        if t in _NO_VALUE:
            return []
        if _keeps_channels(user, x):
            return [user]
        if t == aten.mul.Tensor and isinstance(user.args[1], (int, float)) and user.args[0] is x:
            return [user]   # a scalar scale (Gemma's √d on the embedding) commutes with Q
        if t == aten.add.Tensor and len(user.args) == 2 and all(isinstance(a, torch.fx.Node) for a in user.args):
            other = user.args[1] if user.args[0] is x else user.args[0]
            if other in self.seen:
                return [user]   # both operands already rotated (a residual add seen from its other side)
            self.writers.append(_writer(gm, other, user))
            return [user]
        if t == aten.pow.Tensor_Scalar and user.args[1] == 2:
            return []   # the RMSNorm's statistics, checked from its normalizing multiply
        if t == aten.mul.Tensor and _is_rms(x, user):
            self.norms.append(_norm(gm, user))
            return []
        if t in (aten.layer_norm.default, aten.native_layer_norm.default):
            raise RotationError(f"rotation: node '{user.name}' ({_layer(user)}) is a LayerNorm: its mean subtraction "
                                "does not commute with a rotation of the residual stream; only RMSNorm models "
                                "(Llama-style) can be rotated")
        what = "the graph output" if user.op == "output" else f"node '{user.name}' ({t}, layer {_layer(user)})"
        raise RotationError(f"rotation: {what} reads the residual stream (from '{x.name}') and is neither an RMSNorm, "
                            "a residual add nor a pass-through: it cannot take the rotated stream")


def _is_rms(x, mul) -> bool:
    """``mul`` is ``x * rsqrt(mean(x**2, -1, keepdim) + eps)`` (the normalizing step of an RMSNorm)."""
    other = mul.args[1] if mul.args[0] is x else mul.args[0]
    if not _call(other, aten.rsqrt.default):
        return False
    add = other.args[0]
    if not _call(add, aten.add.Tensor):
        return False
    mean = add.args[0] if isinstance(add.args[0], torch.fx.Node) else add.args[1]
    if not _call(mean, aten.mean.dim) or list(mean.args[1]) not in ([-1], [_rank(x) - 1]):
        return False
    pow_ = mean.args[0]
    if not (_call(pow_, aten.pow.Tensor_Scalar) and pow_.args[1] == 2):
        return False
    src = pow_.args[0]
    while src is not x and _call(src, *_PASS_THROUGH):   # the statistics may read a pass-through copy of x
        src = src.args[0]
    return src is x or (x.op == "call_function" and x.target in _PASS_THROUGH and x.args[0] is src)


def _norm(gm, mul):
    """(the node holding γ, (arg index, γ node) or None, the reader Linears) for the RMSNorm whose
    normalizing multiply is ``mul``."""
    out, gamma = mul, None
    while True:
        users = [u for u in out.users if not _call(u, *_NO_VALUE)]
        if len(users) == 1 and _call(users[0], *_PASS_THROUGH):
            out = users[0]
            continue
        if len(users) == 1 and _call(users[0], aten.mul.Tensor) and gamma is None:
            g_mul = users[0]
            idx = 0 if g_mul.args[1] is out else 1
            g = get_attr_tensor(gm, g_mul.args[idx])
            if g is not None and g.dim() == 1:
                gamma, out = (g_mul, (idx, g_mul.args[idx])), g_mul
                continue
        break
    readers, todo = [], [out]
    while todo:
        src = todo.pop()
        for u in src.users:
            if _call(u, *_NO_VALUE):
                continue
            if _keeps_channels(u, src):
                todo.append(u)
                continue
            if not (_call(u, aten.linear.default) and u.args[0] is src and get_attr_tensor(gm, u.args[1]) is not None):
                raise RotationError(f"rotation: node '{u.name}' ({_layer(u)}) reads the output of RMSNorm "
                                    f"'{_layer(mul)}' and is not a Linear with a constant weight: the norm's scale "
                                    "and the rotation cannot be folded into it")
            readers.append(u)
    holder, where = gamma if gamma is not None else (mul, None)
    return holder, where, readers


def _writer(gm, node, add):
    """The Linear whose output ``node`` is (through pass-through ops), added to the stream by ``add``."""
    src = node
    while _call(src, *_PASS_THROUGH) and len(src.users) == 1:
        src = src.args[0]
    if not (_call(src, aten.linear.default) and len(src.users) == 1 and get_attr_tensor(gm, src.args[1]) is not None
            and (len(src.args) < 3 or src.args[2] is None or get_attr_tensor(gm, src.args[2]) is not None)):
        raise RotationError(f"rotation: the residual add '{add.name}' ({_layer(add)}) adds '{node.name}', which is not "
                            "the output of a Linear with constant weights read only there: it cannot be rotated")
    return src


def _keeps_channels(node, src) -> bool:
    """``node`` passes ``src``'s last-dimension channels through unchanged: a pass-through op, or a
    slice/select of tokens (any dimension but the last, e.g. the ``logits_to_keep`` slice before a head)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.args and node.args[0] is src):
        return False
    if node.target in _PASS_THROUGH:
        return True
    if node.target in (aten.slice.Tensor, aten.select.int):
        dim = node.args[1] if len(node.args) > 1 else 0
        return dim != -1 and dim != _rank(src) - 1
    return False


def _call(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _rank(node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else -1


def _layer(node) -> str:
    # "" is the model's own forward (an op of no submodule)
    return node.meta.get(LAYER) or "in the model's own forward"


def _check_width(node, width, size):
    if width != size:
        raise RotationError(f"rotation: Linear '{_layer(node)}' touches the stream with {width} channels, the stream "
                            f"has {size}")


def _set_arg(gm, node, index, value, suffix, layer):
    """Replace ``node``'s constant argument ``index`` by ``value`` (a new tensor; the old one may be
    shared with another node, e.g. a tied embedding and head)."""
    new = add_tensor(gm, f"{node.args[index].target}_{suffix}", value, node)
    new.meta[LAYER] = layer
    args = list(node.args)
    args[index] = new
    node.args = tuple(args)
