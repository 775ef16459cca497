import torch
from torch import nn

from qcompile.capture import capture
from qcompile.passes import FoldBatchNormPass

aten = torch.ops.aten


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_fold_removes_bn_and_keeps_numerics(tiny_cnn):
    model, batches = tiny_cnn
    gm = capture(model, batches[0]).graph_module
    assert aten.batch_norm.default in _targets(gm)
    result = FoldBatchNormPass()(gm)
    assert result.modified
    assert aten.batch_norm.default not in _targets(gm)
    assert result.changed == ["conv1", "conv2"]
    with torch.no_grad():
        for (x,) in batches:
            torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_skips_conv_with_other_users_and_says_why():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is also used raw: folding would change it

    model = Branch().eval()
    x = torch.randn(2, 1, 6, 6)
    gm = capture(model, (x,)).graph_module
    result = FoldBatchNormPass()(gm)
    assert not result.modified
    assert list(result.skipped.values()) == ["the convolution output has other users"]
    assert aten.batch_norm.default in _targets(gm)
    torch.testing.assert_close(gm(x), model(x))
