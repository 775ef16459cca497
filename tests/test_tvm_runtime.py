"""The tvm artifact's call path: zero-copy DLPack in and out (aligned, contiguous, unaliased),
the input bounds the compiled memory plan assumes (a longer sequence is refused by name, not
overrun), those bounds surviving save/load, and the pipeline's reshape tidy-up."""
import pytest
import torch
from torch import nn

import qcompile
from backend_conformance import _quantize, assert_matches_reference

pytest.importorskip("tvm", reason="the tvm backend needs the 'tvm' extra: pip install 'qcompile[tvm]'")

from qcompile.backends.tvm import load  # noqa: E402
from qcompile.backends.tvm.runtime import _aligned, _own  # noqa: E402

POSITIONS = 16


class PositionBlock(nn.Module):
    """BERT's shape of the problem: position ids are a slice of a fixed buffer, so torch.export
    records ``seq <= POSITIONS``; then a quantized Linear and a LayerNorm."""

    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(POSITIONS, d)
        self.register_buffer("position_ids", torch.arange(POSITIONS)[None])
        self.fc, self.ln, self.head = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 8)

    def forward(self, ids, mask):
        x = self.emb(ids) + self.pos(self.position_ids[:, :ids.shape[1]])
        x = self.ln(x + self.fc(x)) * mask[..., None].float()
        return self.head(x)


@pytest.fixture(scope="module")
def lowered():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 50, (3, 9), generator=g), torch.ones(3, 9, dtype=torch.long)) for _ in range(3)]
    q = _quantize(PositionBlock().eval(), "w8a8", batches)
    return q, qcompile.lower(q, backend="tvm")


def test_bound_recorded_from_the_position_table(lowered):
    _, art = lowered
    bounds = {(b["name"], b["dim"]): b["max"] for b in art.meta["input_bounds"]}
    assert bounds[("ids", 1)] == POSITIONS and bounds[("mask", 1)] == POSITIONS
    assert all(b["dim"] != 0 for b in art.meta["input_bounds"])   # the batch has no bound


def test_sequence_at_the_bound_runs_and_over_it_raises_naming_the_input(lowered, tmp_path):
    q, art = lowered
    ids, mask = torch.randint(0, 50, (2, POSITIONS)), torch.ones(2, POSITIONS, dtype=torch.long)
    with torch.no_grad():
        assert_matches_reference(art(ids, mask), q(ids, mask))
    long_ids, long_mask = torch.randint(0, 50, (1, POSITIONS + 1)), torch.ones(1, POSITIONS + 1, dtype=torch.long)
    with pytest.raises(qcompile.BackendError, match=rf"input 'ids' has size {POSITIONS + 1} in dim 1.*at most {POSITIONS}"):
        art(long_ids, long_mask)
    again = load(art.save(tmp_path / "m"))   # the bound is in tvm.json: the loaded library checks it too
    with pytest.raises(qcompile.BackendError, match=r"input 'ids'"):
        again(long_ids, long_mask)
    with torch.no_grad():
        assert torch.equal(again(ids, mask), art(ids, mask))


def test_outputs_are_not_overwritten_by_the_next_call(lowered):
    _, art = lowered
    a = (torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long))
    b = (torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long))
    first = art(*a)
    kept = first.clone()
    second = art(*b)
    assert torch.equal(first, kept) and not torch.equal(first, second)
    assert first.data_ptr() != second.data_ptr()


def test_unaligned_and_strided_inputs_give_the_same_outputs(lowered):
    _, art = lowered
    wide = torch.randint(0, 50, (2, 12))
    ids = wide[:, 1:8]          # starts 8 bytes into its storage: not 64-byte aligned, not contiguous
    assert ids.data_ptr() % 64 and not ids.is_contiguous()
    mask = torch.ones(7, 2, dtype=torch.long).t()   # a transposed (strided) view
    expected = art(ids.contiguous().clone(), mask.contiguous())
    assert torch.equal(art(ids, mask), expected)
    assert torch.equal(wide[:, 1:8], ids)           # the inputs are untouched


def test_aligned_keeps_aligned_tensors_and_copies_the_rest():
    t = torch.arange(64, dtype=torch.int64)
    assert _aligned(t).data_ptr() == t.data_ptr()                  # zero-copy
    view = t[1:9]
    out = _aligned(view)
    assert out.data_ptr() % 64 == 0 and torch.equal(out, view) and out.data_ptr() != view.data_ptr()
    g = torch.ones(3, requires_grad=True)
    assert not _aligned(g).requires_grad


def test_an_output_that_is_an_input_buffer_is_copied():
    x = torch.arange(8.0)
    assert _own(x, {x.data_ptr()}).data_ptr() != x.data_ptr()
    assert _own(x, set()).data_ptr() == x.data_ptr()


def test_pipeline_collapses_reshape_chains():
    """reshape(reshape(x)) lowers to one VM reshape; a reshape to the same shape to none."""
    import tvm
    from tvm import relax, tirx

    from qcompile.backends.tvm.host import detect
    from qcompile.backends.tvm.pipeline import get_pipeline

    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 4, 6], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.reshape(x, (n * 4, 6)))
            b = bb.emit(relax.op.reshape(a, (n, 24)))
            c = bb.emit(relax.op.reshape(b, (n, 24)))
            out = bb.emit_output(relax.op.add(c, relax.const(1.0, "float32")))
        bb.emit_func_output(out)
    mod = bb.get()
    target = detect().target()
    with target:
        lowered = get_pipeline(target)(mod)
    assert lowered["main"].script().count("vm.builtin.reshape") == 1
    ex = tvm.compile(mod, target=target, relax_pipeline=get_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    data = torch.randn(3, 4, 6)
    got = torch.from_dlpack(vm["main"](tvm.runtime.from_dlpack(data)))
    assert torch.equal(got, data.reshape(3, 24) + 1)
