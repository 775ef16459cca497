import torch

from qcompile import LayerConfig, QuantSpec, Recipe, SmoothingConfig
from qcompile.calibration import run_calibration
from qcompile.capture import capture
from qcompile.passes import AnnotatePass, ApplySmoothingPass, InsertChannelStatsPass

W8 = QuantSpec("int8", "per_channel")
A8 = QuantSpec("uint8", "per_tensor", symmetric=False)


def _stats(model, batches):
    cap = capture(model, batches[0])
    gm = cap.graph_module
    AnnotatePass(Recipe(default=LayerConfig(W8, A8)))(gm)
    InsertChannelStatsPass()(gm)
    run_calibration(lambda b: gm(*b), batches, progress=False)
    return gm


def test_smoothing_keeps_float_numerics_and_inserts_muls(tiny_block):
    model, batches = tiny_block
    gm = _stats(model, batches)
    stats = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("qstats")]
    assert len(stats) == 4  # h -> q/k/v (shared), x -> up, u -> down, x -> head
    p = ApplySmoothingPass(SmoothingConfig(alpha=0.5))(gm)
    assert p.modified
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and "qstats" in n.target]
    muls = [n for n in gm.graph.nodes if n.meta.get("qcompile.role") == "smoothing"]
    assert [a["how"] for a in p.records].count("folded into ln") == 1  # ln feeds only q/k/v
    assert len(muls) == 3 and len(p.records) == 4
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(gm(*b), model(*b), atol=1e-4, rtol=1e-4)


def test_layer_norm_fold_when_it_feeds_only_the_linears():
    class PreNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.a, self.b = torch.nn.LayerNorm(16), torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)

        def forward(self, x):
            h = self.ln(x)
            return self.a(h) * self.b(h)

    torch.manual_seed(0)
    model = PreNorm().eval()
    with torch.no_grad():
        model.ln.weight.mul_(torch.linspace(0.5, 20, 16))  # channel outliers after the norm
    batches = [(torch.randn(2, 5, 16),) for _ in range(3)]
    gm = _stats(model, batches)
    p = ApplySmoothingPass(SmoothingConfig(alpha=0.5))(gm)
    assert p.records[0]["how"] == "folded into ln"
    assert not [n for n in gm.graph.nodes if n.meta.get("qcompile.role") == "smoothing"]
    for b in batches:
        torch.testing.assert_close(gm(*b), model(*b), atol=1e-4, rtol=1e-4)
    assert torch.equal(model.ln.weight, model.ln.weight)  # user parameters untouched (new tensors)


def test_search_picks_no_smoothing_when_it_only_hurts():
    """Inputs without channel outliers: every smoothing candidate adds weight error, so the
    measured search keeps the layer as it is (the negative case of the pass)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32)).eval()
    scale = torch.ones(32)
    scale[3] = 3.0  # a mild activation outlier channel
    batches = [(torch.randn(4, 8, 32) * scale,) for _ in range(3)]
    cap = capture(model, batches[0])
    gm = cap.graph_module
    # 2-bit weights, 8-bit activations: moving any range into the weights costs more than it saves
    AnnotatePass(Recipe(default=LayerConfig(QuantSpec("int2", "per_channel"), A8)))(gm)
    InsertChannelStatsPass()(gm)
    run_calibration(lambda b: gm(*b), batches, progress=False)
    p = ApplySmoothingPass(SmoothingConfig(alpha=None))(gm)
    assert p.records[0]["alpha"] is None and p.records[0]["how"].startswith("not smoothed")
    assert not [n for n in gm.graph.nodes if n.meta.get("qcompile.role") == "smoothing"]


def test_fold_only_leaves_unfoldable_layers(tiny_block):
    model, batches = tiny_block
    gm = _stats(model, batches)
    p = ApplySmoothingPass(SmoothingConfig(alpha=0.5, fold_only=True))(gm)
    assert [a["how"] for a in p.records] == ["folded into ln"]  # the others would need a mul
    assert not [n for n in gm.graph.nodes if n.meta.get("qcompile.role") == "smoothing"]
    for b in batches:
        torch.testing.assert_close(gm(*b), model(*b), atol=1e-4, rtol=1e-4)


class _Attention(torch.nn.Module):
    """Self-attention with heads split by view/transpose and merged back, as in BERT."""

    def __init__(self, heads=4, dim=32, sdpa=False, mix_heads=False):
        super().__init__()
        self.h, self.d, self.sdpa, self.mix_heads = heads, dim // heads, sdpa, mix_heads
        self.ln = torch.nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        h = self.ln(x)
        q, k, v = (m(h).view(b, s, self.h, self.d).transpose(1, 2) for m in (self.q, self.k, self.v))
        if self.sdpa:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, -1) @ v
        # mix_heads: merge as (head_dim, heads) instead of (heads, head_dim): channels permuted
        a = a.permute(0, 2, 3, 1) if self.mix_heads else a.transpose(1, 2)
        return self.o(a.reshape(b, s, -1)) + x


def _outlier_attention(**kw):
    torch.manual_seed(0)
    model = _Attention(**kw).eval()
    with torch.no_grad():  # channel outliers in V's output, hence in the attention output
        model.v.weight.mul_(torch.linspace(0.2, 12, 32)[:, None])
    return model, [(torch.randn(2, 6, 32),) for _ in range(3)]


def test_attention_output_smoothing_folds_into_the_value_projection():
    for sdpa in (False, True):
        model, batches = _outlier_attention(sdpa=sdpa)
        gm = _stats(model, batches)
        p = ApplySmoothingPass(SmoothingConfig(alpha=0.5))(gm)
        how = {a["layers"][0]: a["how"] for a in p.records}
        assert how["o"] == "folded into the output channels of v", how
        assert not [n for n in gm.graph.nodes if n.meta.get("qcompile.role") == "smoothing"]
        for b in batches:
            torch.testing.assert_close(gm(*b), model(*b), atol=1e-4, rtol=1e-4)
        assert torch.equal(model.v.weight, _outlier_attention(sdpa=sdpa)[0].v.weight)  # user's model untouched


def test_value_fold_refused_when_heads_merge_in_another_order():
    """Heads merged as (head_dim, heads): the attention output's channels are V's channels permuted,
    so scaling V's rows in order would scale the wrong channels: a mul is inserted instead."""
    model, batches = _outlier_attention(mix_heads=True)
    gm = _stats(model, batches)
    p = ApplySmoothingPass(SmoothingConfig(alpha=0.5))(gm)
    how = {a["layers"][0]: a["how"] for a in p.records}
    assert how["o"] == "mul inserted"
    for b in batches:
        torch.testing.assert_close(gm(*b), model(*b), atol=1e-4, rtol=1e-4)


def test_gated_mlp_smoothing_folds_into_the_up_projection():
    """``down(silu(gate(x)) * up(x))``: scaling up's output channels scales the product's channels,
    so down's input smoothing needs no mul; gate (behind the SiLU) is never the one scaled."""

    class GatedMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = torch.nn.Linear(16, 48), torch.nn.Linear(16, 48), torch.nn.Linear(48, 16)

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    torch.manual_seed(0)
    model = GatedMLP().eval()
    with torch.no_grad():
        model.up.weight.mul_(torch.linspace(0.2, 15, 48)[:, None])
    batches = [(torch.randn(2, 5, 16),) for _ in range(3)]
    gm = _stats(model, batches)
    p = ApplySmoothingPass(SmoothingConfig(alpha=0.5))(gm)
    how = {a["layers"][0]: a["how"] for a in p.records}
    assert how["down"] == "folded into the output channels of up", how
    for b in batches:
        torch.testing.assert_close(gm(*b), model(*b), atol=1e-4, rtol=1e-4)
