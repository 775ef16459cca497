"""Nothing silent: every parameter the captured graph reads is either read by a quantized op or
listed in the report's ``kept_float`` under its module (``AnnotatePass`` finds them from the graph,
``passes.annotate.float_parameters``), with a reason a user can read."""
import pytest
import torch
from conftest import TinyBlock
from torch import nn

import qcompile
from qcompile.passes.annotate import float_parameters
from qcompile.pipeline import report_from_log
from qcompile.spec import ANNOTATION


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.fc = nn.Embedding(50, 16), nn.LSTM(16, 24, batch_first=True), nn.Linear(24, 3)

    def forward(self, ids):
        h, _ = self.rnn(self.emb(ids))
        return self.fc(h[:, -1])


class GRUTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.GRU(12, 16, num_layers=2, batch_first=True), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.ln, self.fc = nn.MultiheadAttention(16, 2, batch_first=True), nn.LayerNorm(16), nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.ones(16))   # a learned per-channel scale: a bare mul

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(self.ln(x + a) * self.scale)


def _zoo():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "lstm": (LSTMClassifier().eval(), (torch.randint(0, 50, (2, 6), generator=g),)),
        "gru": (GRUTagger().eval(), (torch.randn(2, 6, 12, generator=g),)),
        "mha": (AttentionBlock().eval(), (torch.randn(2, 6, 16, generator=g),)),
        "tiny_block": (TinyBlock().eval(), (torch.randint(0, 50, (2, 7), generator=g), torch.ones(2, 7, dtype=torch.long))),
    }


ZOO = _zoo()


def _listed(name: str, kept: dict) -> bool:
    return any(name == k or name.startswith(k + ".") for k in kept)


@pytest.mark.parametrize("cid", list(ZOO))
def test_every_parameter_quantized_or_listed(cid):
    model, example = ZOO[cid]
    prepared = qcompile.prepare(model, "w8", example)
    kept = report_from_log("w8", prepared.pipeline, 0).kept_float
    gm = prepared.graph_module
    params = {n for n, _ in gm.named_parameters()}
    unaccounted = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in params and node.users:
            quantized = any(ANNOTATION in u.meta for u in node.users)
            if not quantized and not _listed(node.target, kept):
                unaccounted.append(node.target)
    assert not unaccounted, f"{cid}: parameters neither quantized nor listed: {unaccounted}; kept_float {kept}"
    for why in kept.values():
        assert why.startswith(("no quantized kernel for", "kept float by", "its weight is computed")), why


def test_recurrent_layers_quantized_or_named_with_reason():
    """LSTM/GRU are unrolled and quantized (passes/recurrent.py); kept float by the recipe, they are
    listed with the recipe's reason and counted in the summary."""
    model, example = ZOO["lstm"]
    q = qcompile.quantize(model, "w8", example)
    assert "rnn" in {r.layer for r in q.report.layers} and q.report.kept_float == {}
    out = q(*example)
    assert torch.nn.functional.cosine_similarity(out.flatten(), model(*example).flatten(), dim=0) > 0.99
    recipe = qcompile.Recipe.from_dict({**qcompile.Recipe.preset("w8").to_dict(), "keep_float": ["rnn"]})
    kept = qcompile.quantize(model, recipe, example)
    assert kept.report.kept_float == {"rnn": "kept float by keep_float"}
    assert "1 kept float (1 kept float by keep_float)" in kept.report.summary()
    assert kept.report.summary() in str(kept.report)
    gru_model, gru_example = ZOO["gru"]
    gru = qcompile.quantize(gru_model, "w8", gru_example)
    assert "rnn" in {r.layer for r in gru.report.layers} and gru.report.kept_float == {}


def test_mha_in_proj_is_quantized_and_stray_parameters_named():
    model, example = ZOO["mha"]
    q = qcompile.quantize(model, "w8", example)
    assert [r.layer for r in q.report.layers] == ["attn", "attn", "fc"]   # in_proj and out_proj: F.linear in MHA
    assert q.report.kept_float == {
        "ln": "no quantized kernel for LayerNorm (kept float: normalization stays float by design)",
        "scale": "no quantized kernel for AttentionBlock: scale read by mul (kept float)"}


def test_kept_by_recipe_not_listed_twice():
    """A Linear the recipe keeps float is listed once, with the recipe's reason (negative case of
    ``float_parameters``: its parameters are read by a quantizable op)."""
    model, example = ZOO["lstm"]
    recipe = qcompile.Recipe.from_dict({**qcompile.Recipe.preset("w8").to_dict(), "keep_float": ["fc"]})
    q = qcompile.quantize(model, recipe, example)
    assert q.report.kept_float["fc"].startswith("kept float by keep_float")
    assert set(q.report.kept_float) == {"fc"}


def test_float_parameters_empty_when_everything_quantized():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    prepared = qcompile.prepare(model, "w8", (torch.randn(2, 8),))
    assert float_parameters(prepared.graph_module, {"0", "2"}, set()) == {}
    assert report_from_log("w8", prepared.pipeline, 0).kept_float == {}
