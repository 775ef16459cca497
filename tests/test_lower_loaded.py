"""A quantized model saved with qcompile and loaded back lowers like the one quantize() returned:
the artifact keeps each input's shape, dtype and dynamic dims with their ranges (not the example
data), and the loaded model exports its graph again from zero tensors of those shapes
(``QuantizedModel.export_example``, the one home both the tvm and onnx backends call)."""
import dataclasses
import json

import pytest
import torch
from torch.export import Dim

import qcompile
from qcompile.atomic import MANIFEST, write_manifest

pytest.importorskip("tvm", reason="the tvm backend needs the 'tvm' extra: pip install 'qcompile[tvm]'")

POSITIONS = 40   # the tiny BERT's position table: torch.export records seq <= POSITIONS
SEQ_MAX = 32     # the user's bound on the sequence (torch.export Dim max)


def _tiny_minilm():
    """all-MiniLM-L6-v2's architecture (BERT encoder, mean pooling, L2 norm), one small layer."""
    transformers = pytest.importorskip("transformers")
    from qcompile.models.minilm import SentenceEncoder

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=POSITIONS,
                                  attn_implementation="eager")
    return SentenceEncoder(transformers.BertModel(cfg, add_pooling_layer=False)).eval()


def _text_batch(batch, seq, generator):
    ids, mask = torch.randint(0, 100, (batch, seq), generator=generator), torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0   # a padded row: the mask path is exercised
    return ids, mask


def _rewrite_manifest(path, edit):
    """Change the saved manifest as an older qcompile would have written it (checksums redone)."""
    body = json.loads((path / MANIFEST).read_text())
    files = list(body.pop("files"))
    body.pop("manifest_sha256")
    edit(body)
    write_manifest(path, body, files)


@pytest.fixture(scope="module")
def saved_minilm(tmp_path_factory):
    """Quantized with the user's bound on the sequence, SEQ_MAX, tighter than the position table's:
    only the saved ranges can bring it back (Dim.AUTO would find POSITIONS in the graph)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [_text_batch(3, seq, g) for seq in (9, 16, 23)]
    seq = Dim("seq", max=SEQ_MAX)
    recipe = dataclasses.replace(qcompile.Recipe.preset("w8a8"), calibration=qcompile.CalibrationConfig(progress=False))
    q = qcompile.quantize(_tiny_minilm(), recipe, batches[0], calibration=batches, report_samples=1,
                          dynamic_shapes={"input_ids": {0: Dim.AUTO, 1: seq}, "attention_mask": {0: Dim.AUTO, 1: seq}})
    path = q.save(tmp_path_factory.mktemp("loaded") / "minilm")
    return q, path


def test_saved_record_has_shapes_and_ranges_not_data(saved_minilm):
    _, path = saved_minilm
    record = json.loads((path / MANIFEST).read_text())["example"]
    ids = record["inputs"]["input_ids"]
    assert ids["shape"] == [3, 9] and ids["dtype"] == "int64" and set(ids) == {"shape", "dtype", "dynamic", "dims"}
    batch, seq = ids["dims"]["0"], ids["dims"]["1"]
    assert batch["max"] is None and seq["max"] == SEQ_MAX
    assert record["inputs"]["attention_mask"]["dims"] == ids["dims"]   # one symbol each: sizes must agree
    args, _, dynamic = qcompile.load(path).export_example("a test")
    assert all(not a.any() for a in args)   # zeros of the saved shapes, no example values stored
    assert dynamic["input_ids"][1] is dynamic["attention_mask"][1]


def test_loaded_minilm_lowers_to_tvm_like_the_original(saved_minilm):
    q, path = saved_minilm
    loaded = qcompile.load(path)
    original, again = qcompile.lower(q, backend="tvm"), qcompile.lower(loaded, backend="tvm")
    assert again.meta["fused"] == original.meta["fused"] and again.meta["epilogues"] == original.meta["epilogues"]
    assert again.meta["input_bounds"] == original.meta["input_bounds"]
    # the user's bound, kept: the library plans memory for it and refuses a longer input by name
    assert {(b["name"], b["dim"]): b["max"] for b in again.meta["input_bounds"]} == \
        {("input_ids", 1): SEQ_MAX, ("attention_mask", 1): SEQ_MAX}
    g = torch.Generator().manual_seed(2)
    for batch, seq in ((1, 5), (6, SEQ_MAX)):   # neither is the saved example's (3, 9): the dims stayed dynamic
        ids, mask = _text_batch(batch, seq, g)
        with torch.no_grad():
            out = again(ids, mask)
            assert torch.equal(out, original(ids, mask))
            assert (out - q(ids, mask)).abs().max() < 1e-4
    with pytest.raises(qcompile.BackendError, match=rf"input 'input_ids' has size {SEQ_MAX + 1} in dim 1.*at most"):
        again(*_text_batch(2, SEQ_MAX + 1, g))


def test_a_save_without_the_record_cannot_be_lowered_and_says_why(saved_minilm, tmp_path):
    _, path = saved_minilm
    old = tmp_path / "old"
    old.mkdir()
    for f in path.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    _rewrite_manifest(old, lambda body: body.pop("example"))
    loaded = qcompile.load(old)   # still loads and runs
    ids, mask = _text_batch(2, 7, torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), qcompile.load(path)(ids, mask))
    for backend, target in (("tvm", "the tvm backend"), ("onnx", "the onnx backend")):
        with pytest.raises(qcompile.BackendError, match=rf"no capture examples .* for {target}.*older qcompile"):
            qcompile.lower(loaded, backend=backend)


def test_a_record_without_ranges_still_exports_with_dynamic_dims(saved_minilm, tmp_path):
    """A save from before the ranges were recorded (shapes and dynamic dim numbers only) gets
    Dim.AUTO on those dims: torch.export finds the graph's own bounds again."""
    _, path = saved_minilm
    old = tmp_path / "old"
    old.mkdir()
    for f in path.iterdir():
        (old / f.name).write_bytes(f.read_bytes())

    def drop_ranges(body):
        for entry in body["example"]["inputs"].values():
            entry.pop("dims")

    _rewrite_manifest(old, drop_ranges)
    loaded = qcompile.load(old)
    args, kwargs, dynamic = loaded.export_example("a test")
    assert dynamic["input_ids"] == {0: Dim.AUTO, 1: Dim.AUTO}
    ep = torch.export.export(loaded.graph_module, args, kwargs, dynamic_shapes=dynamic)
    ranges = sorted((int(r.lower), r.upper) for r in ep.range_constraints.values())
    assert len(ranges) == 2 and any(upper == POSITIONS for _, upper in ranges)
