import torch
from torch import nn

from qcompile.capture import capture
from qcompile.passes import NormalizeLinearPass

aten = torch.ops.aten


class Conv1DLike(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], applied with addmm."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))
        self.bias = nn.Parameter(torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(4, 3))

    def forward(self, x, other):
        h = torch.addmm(self.bias, x.view(-1, 6), self.weight)
        h = torch.mm(h, self.w2)
        return h + torch.mm(h, other)  # a matmul with a runtime operand is not a linear


def test_addmm_and_mm_with_parameters_become_linear():
    torch.manual_seed(0)
    model = Conv1DLike()
    x, other = torch.randn(5, 6), torch.randn(3, 3)
    gm = capture(model, (x, other)).graph_module
    assert NormalizeLinearPass()(gm).modified
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.linear.default) == 2
    assert aten.addmm.default not in targets
    assert targets.count(aten.mm.default) == 1  # h @ other stays: its weight is an input
    torch.testing.assert_close(gm(x, other), model(x, other))
    assert model.weight.shape == (6, 4)  # the user's parameter was not transposed in place


def test_no_matmul_no_change(tiny_cnn):
    model, batches = tiny_cnn
    gm = capture(model, batches[0]).graph_module
    assert not NormalizeLinearPass()(gm).modified
