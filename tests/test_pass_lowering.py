"""GatherBeforeDequantizePass: gather codes and row scales, then dequantize (exact).
ViewsAsReshapesPass: views become reshapes (same values) unless something writes through them."""
import copy

import torch

import qcompile
from backend_conformance import _quantize
from conftest import TinyBlock
from qcompile.ops import DEQUANTIZE
from qcompile.passes import PassManager
from qcompile.passes.lowering import GatherBeforeDequantizePass, ViewsAsReshapesPass

aten = torch.ops.aten


def _batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 50, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.long)) for _ in range(3)]


def test_gathers_codes_then_dequantizes_bit_identically():
    torch.manual_seed(0)
    batches = _batches()
    q = _quantize(TinyBlock().eval(), "w8a8", batches)
    gm = copy.deepcopy(q.graph_module)
    PassManager([GatherBeforeDequantizePass()])(gm)
    emb = [n for n in gm.graph.nodes if n.target == aten.embedding.default]
    assert len(emb) == 2  # the int8 codes and the per-row scales
    assert all(getattr(n.args[0], "target", None) != DEQUANTIZE for n in emb)
    dq = [u for n in emb for u in n.users if u.target == DEQUANTIZE]
    assert dq and dq[0].args[0].target == aten.embedding.default
    ids, mask = batches[1]
    with torch.no_grad():
        assert torch.equal(gm(ids, mask), q.graph_module(ids, mask))


def test_float_embedding_is_left_alone():
    torch.manual_seed(0)
    batches = _batches()
    recipe = qcompile.Recipe.preset("w8a8").with_overrides({"emb": None})
    q = _quantize(TinyBlock().eval(), recipe, batches)
    gm = copy.deepcopy(q.graph_module)
    assert not PassManager([GatherBeforeDequantizePass()])(gm).modified


class _Views(torch.nn.Module):
    def forward(self, x):
        y = x.transpose(0, 1).contiguous().view(-1, 4) * 2   # a view the re-export may not allow
        z = x.clone().view(-1)
        z.add_(1)                                           # written through: must stay a view
        return y, z


def test_views_become_reshapes_except_where_written_through():
    x = torch.randn(3, 4)
    gm = torch.export.export(_Views(), (x,)).module()
    expected = gm(x)
    result = ViewsAsReshapesPass()(gm)
    targets = {n.name: n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert len(result.changed) == 1 and targets[result.changed[0]] == aten.reshape.default
    assert sum(t == aten.view.default for t in targets.values()) == 1        # the written one
    assert all(torch.equal(a, b) for a, b in zip(gm(x), expected))
    assert not ViewsAsReshapesPass()(gm).modified                           # nothing left to do

