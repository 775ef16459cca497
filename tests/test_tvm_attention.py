"""The tvm backend's fused attention (qcompile/backends/tvm/attention.py): the kernel against
float64 attention on odd shapes and masks, the Relax rewrite on an exported attention module
(structure, numerics, the attentions it must leave alone), and a tiny BERT end to end."""
import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm", reason="the tvm backend needs the 'tvm' extra: pip install 'qcompile[tvm]'")

from tvm import relax

from qcompile.backends.tvm import attention, pipeline
from qcompile.backends.tvm.host import compile_kernel, detect

TARGET = detect().target()
NEG = torch.finfo(torch.float32).min


def _reference(q, k, v, mask, heads, scale):
    """softmax(Q·Kᵀ * scale + mask)·V in float64, per head, on [B, S, H·D] inputs."""
    b, s, hd = q.shape
    split = [t.double().reshape(b, s, heads, hd // heads).transpose(1, 2) for t in (q, k, v)]
    p = torch.softmax(split[0] @ split[1].transpose(-1, -2) * scale + mask.double(), -1)
    return (p @ split[2]).transpose(1, 2).reshape(b, s, hd)


@pytest.mark.parametrize("batch, seq, heads, head_dim, mask_rows, parallel", [
    (2, 37, 3, 32, True, False),    # S not a multiple of the 4-row or 32-key tiles
    (2, 37, 3, 32, True, True),     # the same, one thread-pool task per (sequence, head)
    (1, 1, 2, 32, True, False),     # one token
    (3, 17, 2, 64, False, True),    # head size 64, a [B, 1, 1, S] mask
    (2, 33, 1, 16, True, False),
])
def test_kernel_matches_float64_attention(batch, seq, heads, head_dim, mask_rows, parallel):
    g = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(batch, seq, heads * head_dim, generator=g) * 2 for _ in range(3))
    mask = torch.zeros(batch, 1, seq if mask_rows else 1, seq)
    mask[0, ..., seq // 2 + 1:] = NEG               # padded keys, as BERT's extended mask writes them
    if seq > 2:
        mask[-1, ..., 1] = float("-inf")
    scale = 1 / head_dim ** 0.5
    ex = compile_kernel(attention.attention_kernel(heads, head_dim, scale, mask_rows, parallel))
    out = tvm.runtime.tensor(np.zeros((batch, seq, heads * head_dim), np.float32))
    ex["main"](*[tvm.runtime.tensor(t.numpy()) for t in (mask, q.reshape(-1, heads * head_dim),
                                                          k.reshape(-1, heads * head_dim), v.reshape(-1, heads * head_dim))], out)
    ref = _reference(q, k, v, mask, heads, scale)
    # float32 rounding of outputs of magnitude up to ~5 (inputs scaled by 2): a few 1e-6 absolute
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_kernel_rejects_head_size_off_the_vector():
    with pytest.raises(ValueError, match="multiple of 16"):
        attention.attention_kernel(2, 24, 0.2, True)


def test_fast_exp_is_topi_fast_exp():
    """The kernel's exp is topi's, term for term: identical results on a range that includes the clamps."""
    from tvm import te, tirx, topi

    x = np.concatenate([np.linspace(-100, 90, 4001), [0.0, -1e30, 1e-8]]).astype(np.float32)
    n = x.size
    xp = te.placeholder((n,), "float32", name="x")
    ref_f = compile_kernel(te.create_prim_func([xp, topi.fast_exp(xp)]))
    xb = tirx.decl_buffer((n,), "float32", name="xb")
    yb = tirx.decl_buffer((n,), "float32", name="yb")
    i = tirx.Var("i", "int32")
    body = tirx.For(i, 0, n, tirx.ForKind.SERIAL, tirx.BufferStore(yb, attention.fast_exp(tirx.BufferLoad(xb, [i])), [i]))
    ours = compile_kernel(tirx.PrimFunc([xb, yb], body).with_attr("tir.noalias", True))
    got, want = (tvm.runtime.tensor(np.zeros(n, np.float32)) for _ in range(2))
    ref_f["main"](tvm.runtime.tensor(x), want)
    ours["main"](tvm.runtime.tensor(x), got)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    inside = (x >= -80) & (x <= 5)   # the range docs/tvm.md measured fast_exp on
    np.testing.assert_allclose(got.numpy()[inside], np.exp(x[inside].astype(np.float64)), rtol=3e-7)


class Attention(nn.Module):
    """BERT's eager self-attention on its own: Linears, heads split by view + transpose, Q·Kᵀ
    scaled, an additive mask from a [B, S] 0/1 mask, softmax, P·V, heads merged."""

    def __init__(self, d=64, heads=2, variant="bert"):
        super().__init__()
        self.h, self.dh, self.variant = heads, d // heads, variant
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask):
        b, s, _ = x.shape

        def split(t):
            return t.view(b, s, self.h, self.dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        ext = (1.0 - mask[:, None, None, :].float()) * NEG
        if self.variant == "bert":
            scores = q @ k.transpose(-1, -2) / self.dh ** 0.5 + ext
        elif self.variant == "mask_before_scale":
            scores = (q @ k.transpose(-1, -2) + ext) / self.dh ** 0.5
        elif self.variant == "causal":
            causal = torch.triu(torch.full((s, s), NEG), 1)[None, None]
            scores = q @ k.transpose(-1, -2) / self.dh ** 0.5 + causal
        ctx = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, s, self.h * self.dh)
        return self.o(ctx)


def _relax_module(model, x, mask):
    from tvm.relax.frontend.torch import from_exported_program

    batch, seq = torch.export.Dim("batch", min=2, max=64), torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(model, (x, mask), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    return from_exported_program(ep.run_decompositions())


def _ops(mod):
    names = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: names.append(e.op.name) if isinstance(e, relax.Call)
                                            and isinstance(e.op, tvm.ir.Op) else None)
    return names


def _inputs(batch=3, seq=11, d=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, d, generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 3:] = 0
    return x, mask


def test_rewrite_replaces_bert_attention_and_matches_torch():
    torch.manual_seed(0)
    model = Attention().eval()
    x, mask = _inputs()
    mod = _relax_module(model, x, mask)
    assert {"relax.permute_dims", "relax.matmul", "relax.nn.softmax"} <= set(_ops(mod))
    rewritten = attention.rewrite_attention()(mod)
    ops = _ops(rewritten)
    # only the four Linears' matmuls stay (their weights are transposed by a permute_dims each)
    assert "relax.nn.softmax" not in ops and "relax.broadcast_to" not in ops
    assert ops.count("relax.matmul") == 4 and ops.count("relax.permute_dims") <= 4
    kernels_in = [gv.name_hint for gv in rewritten.functions if gv.name_hint.startswith(attention.ATTENTION)]
    assert len(kernels_in) == 1
    ex = tvm.compile(mod, target=TARGET, relax_pipeline=pipeline.get_pipeline(TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for batch, seq in ((3, 11), (2, 37)):
        x, mask = _inputs(batch, seq)
        with torch.no_grad():
            ref = model(x, mask).numpy()
        got = vm["main"](tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(mask.numpy()))[0].numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["mask_before_scale", "causal"])
def test_rewrite_leaves_other_attentions_alone(variant):
    torch.manual_seed(0)
    x, mask = _inputs()
    mod = _relax_module(Attention(variant=variant).eval(), x, mask)
    rewritten = attention.rewrite_attention()(mod)
    assert "relax.nn.softmax" in _ops(rewritten)
    assert not [gv for gv in rewritten.functions if gv.name_hint.startswith(attention.ATTENTION)]


def test_rewrite_leaves_head_size_off_the_vector_alone():
    torch.manual_seed(0)
    x, mask = _inputs(d=48)
    mod = _relax_module(Attention(d=48, heads=2).eval(), x, mask)   # head size 24
    assert "relax.nn.softmax" in _ops(attention.rewrite_attention()(mod))


def test_tiny_bert_lowers_with_fused_attention_and_verifies(tmp_path):
    transformers = pytest.importorskip("transformers")
    from backend_conformance import _quantize

    import qcompile
    from qcompile.backends.tvm import load, lower
    from qcompile.models.minilm import SentenceEncoder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, attn_implementation="eager")
    model = SentenceEncoder(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for seq in (9, 16, 23):
        ids, mask = torch.randint(0, 100, (3, seq), generator=g), torch.ones(3, seq, dtype=torch.long)
        mask[0, seq - 4:] = 0
        batches.append((ids, mask))
    q = _quantize(model, "w8a8", batches)
    mod, _ = lower.import_relax(q, "vnni")
    rewritten = attention.rewrite_attention()(mod)
    ops = _ops(rewritten)
    assert "relax.nn.softmax" not in ops and "relax.permute_dims" not in ops and "relax.matmul" not in ops
    assert ops.count("relax.call_tir") >= 2 * 4 + 2 * 1   # per layer: 6 int8 Linears and one attention
    art = qcompile.lower(q, backend="tvm")
    report = qcompile.verify(art, q, batches)
    assert report.passed and report.output_max_rel < 1e-3, report.to_dict()
    again = load(art.save(tmp_path / "bert"))   # the kernel's workspace buffers work from the saved library
    with torch.no_grad():
        assert torch.equal(again(*batches[1]), art(*batches[1]))
