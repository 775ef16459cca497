"""Layer-by-layer quantization (qcompile.blockwise) of a tiny Llama saved as several safetensors
shards: one program per block, the assembled model runs, codes bit-identical to the whole-model
path, a SIGKILLed run resumes to the same bytes, and directories that are not a supported decoder
model are refused by name."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qcompile
from qcompile.artifact import load_program
from qcompile.blockwise import MARKER, RESUME, quantize_directory
from qcompile.blockwise_artifact import EMBED, HEAD, BlockwiseModel, layer_dir
from qcompile.errors import ArtifactError, InputError
from qcompile.ops import DEQUANTIZE

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LAYERS = 3
CAL = [(torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(i)),) for i in range(4)]


def _recipe(name):
    return dataclasses.replace(qcompile.Recipe.preset(name), calibration=qcompile.CalibrationConfig(progress=False))


def _save_llama(path: Path, tied: bool) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("tiny-llama"), tied=False)


@pytest.fixture(scope="module")
def gptq_out(llama_dir, tmp_path_factory):
    return quantize_directory(llama_dir, _recipe("w4-g64-gptq"), CAL, tmp_path_factory.mktemp("bw") / "out")


def _whole(model_dir, name):
    m = transformers.LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    m.config.use_cache = False
    return m, qcompile.quantize(m, _recipe(name), CAL[0], calibration=CAL, example_kwargs={"use_cache": False},
                                report_samples=1)


def _program_tensors(out: Path) -> dict:
    tensors = {}
    for p in json.loads((out / "qcompile.json").read_text())["programs"]:
        ep, _ = load_program(out / p)
        tensors.update({f"{p}:{k}": v for k, v in ep.state_dict.items()})
    return tensors


def _quantized_weights(gm) -> list:
    """(op, codes, scale, zero point) of every quantized weight, in graph order: names differ
    between paths (a tied weight is named after lm_head by torch.export), the order does not."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.linear.default,
                                                          torch.ops.aten.embedding.default):
            w = node.args[1] if node.target == torch.ops.aten.linear.default else node.args[0]
            if getattr(w, "target", None) == DEQUANTIZE:
                out.append((node.target.__name__, *[getattr(gm, a.target) if isinstance(a, torch.fx.Node) else a
                                                    for a in w.args[:3]]))
    return out


def _table_weights(ep) -> list:
    """(op, codes, scale, zero point) of a table program (:mod:`qcompile.blockwise_tables`: the
    embedding or the head quantized row chunk by row chunk, codes held as buffers)."""
    state = ep.state_dict
    return [("embedding.default" if "embed_tokens" in k else "linear.default", state[k],
             state[k[:-1] + "scale"], state.get(k[:-1] + "zero_point"))
            for k in state if k.endswith(".weight_q")]


def _compare(whole_gm, out: Path):
    """(number of quantized weights compared, indices of those that differ)."""
    ref = _quantized_weights(whole_gm)
    got = [w for p in json.loads((out / "qcompile.json").read_text())["programs"]
           for ep in [load_program(out / p)[0]]
           for w in _table_weights(ep) or _quantized_weights(ep.module())]
    assert [r[0] for r in ref] == [g[0] for g in got]
    same = [all(a is None and b is None or isinstance(a, torch.Tensor) and torch.equal(a, b) for a, b in zip(r[1:], g[1:]))
            for r, g in zip(ref, got)]
    return len(ref), [i for i, ok in enumerate(same) if not ok]


def test_structure_one_program_per_block_and_runs(gptq_out, llama_dir):
    names = sorted(p.relative_to(gptq_out).as_posix() for p in gptq_out.glob("**/qcompile.json"))
    assert names == sorted([f"{EMBED}/qcompile.json", f"{HEAD}/qcompile.json", "qcompile.json"]
                           + [f"{layer_dir(i)}/qcompile.json" for i in range(LAYERS)])
    assert not (gptq_out / RESUME).exists() and not (gptq_out / MARKER).exists()
    manifest = json.loads((gptq_out / "qcompile.json").read_text())
    steps = [s["step"] for s in manifest["report"]["steps"]]
    assert steps[1:] == [EMBED] + [layer_dir(i) for i in range(LAYERS)] + [HEAD]
    assert all(s["peak_rss_mb"] > 0 and s["seconds"] > 0 for s in manifest["report"]["steps"])
    qm = qcompile.load(gptq_out)
    assert isinstance(qm, BlockwiseModel)
    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(7))  # another length
    m = transformers.LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = m(ids, use_cache=False).logits
    got = qm(ids)
    assert got.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert 0.9 < cos < 1.0   # quantized: close to the float model, not equal


def test_gptq_codes_identical_to_whole_model(gptq_out, llama_dir):
    _, qw = _whole(llama_dir, "w4-g64-gptq")
    compared, differ = _compare(qw.graph_module, gptq_out)
    assert compared == 7 * LAYERS + 2 and differ == []
    ids = CAL[1][0]
    assert torch.equal(qcompile.load(gptq_out)(ids), qw(ids, use_cache=False).logits)


def test_api_takes_a_model_directory_rtn_tied_head(tmp_path):
    model_dir = _save_llama(tmp_path / "tied", tied=True)
    qm = qcompile.quantize(str(model_dir), "w4-g64", calibration=CAL, out=str(tmp_path / "out"), max_memory="1KB")
    assert isinstance(qm, BlockwiseModel)
    assert json.loads((tmp_path / "out" / "qcompile.json").read_text())["activation_storage"]["where"] == "disk"
    _, qw = _whole(model_dir, "w4-g64")
    compared, differ = _compare(qw.graph_module, tmp_path / "out")
    assert compared and differ == []
    assert torch.equal(qm(CAL[2][0]), qw(CAL[2][0], use_cache=False).logits)


CHILD = """
import sys, dataclasses, torch, qcompile
torch.set_num_threads(int(sys.argv[3]))
from qcompile.blockwise import quantize_directory
cal = [(torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
recipe = dataclasses.replace(qcompile.Recipe.preset("w4-g64-gptq"), calibration=qcompile.CalibrationConfig(progress=False))
quantize_directory(sys.argv[1], recipe, cal, sys.argv[2])
"""


def test_resume_after_sigkill_gives_identical_bytes(gptq_out, llama_dir, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(Path(qcompile.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(llama_dir), str(out), str(torch.get_num_threads())],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / layer_dir(1) / "qcompile.json").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child never finished block 1"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "qcompile.json").exists()          # unfinished: nothing loads
    with pytest.raises(ArtifactError):
        qcompile.load(out)
    quantize_directory(llama_dir, _recipe("w4-g64-gptq"), CAL, out)
    steps = [s["step"] for s in json.loads((out / "qcompile.json").read_text())["report"]["steps"]]
    assert EMBED not in steps and layer_dir(0) not in steps          # resumed, not restarted
    a, b = _program_tensors(gptq_out), _program_tensors(out)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_another_runs_directory_is_refused(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("a different run")
    with pytest.raises(ArtifactError, match="another model, recipe or calibration"):
        quantize_directory(llama_dir, _recipe("w4-g64"), CAL, out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(ArtifactError, match="refusing to write into it"):
        quantize_directory(llama_dir, _recipe("w4-g64"), CAL, tmp_path / "mine")


def test_not_a_supported_decoder_model_is_named(tmp_path, llama_dir):
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(bert)
    with pytest.raises(InputError, match="model_type 'bert' is not a supported decoder-only family"):
        quantize_directory(bert, _recipe("w4-g64"), CAL, tmp_path / "o1")
    no_weights = tmp_path / "no-weights"
    transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64).save_pretrained(no_weights)
    with pytest.raises(InputError, match="neither model.safetensors nor model.safetensors.index.json"):
        quantize_directory(no_weights, _recipe("w4-g64"), CAL, tmp_path / "o2")
    # a shard index that lost a block's tensor: the error names the tensor
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in llama_dir.iterdir():
        (broken / p.name).symlink_to(p)
    index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (broken / "model.safetensors.index.json").unlink()
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        quantize_directory(broken, _recipe("w4-g64"), CAL, tmp_path / "o3")
    with pytest.raises(InputError, match="token ids"):
        quantize_directory(llama_dir, _recipe("w4-g64"), [(torch.randn(1, 4),)], tmp_path / "o4")


def test_cli_quantizes_a_model_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    import inspect
    from qcompile.cli import main

    model_dir = _save_llama(tmp_path / "model", tied=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = [inspect.getdoc(f) or "" for f in (dict, list, str, json.dumps, os.path.join, Path.glob)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(model_dir)
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(model_dir), "--recipe", "w4-g64", "--out", str(out), "--windows", "2",
                 "--window-tokens", "24"]) == 0
    qm = qcompile.load(out)
    assert qm(CAL[0][0]).shape == (1, 16, 256)
    assert main(["quantize", "--model", str(model_dir), "--recipe", "w4-g64"]) == 2      # --out is required
    assert main(["quantize", "--model", str(model_dir), "--recipe", "w4-g64", "--out", str(tmp_path / "o2"),
                 "--max-memory", "lots"]) == 1                                            # InputError, named


def _table_shard(tmp_path, n=300, k=128):
    from safetensors.torch import save_file

    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05).to(torch.bfloat16)
    w[7] = 0   # an all-zero row
    save_file({"t": w}, str(tmp_path / "t.safetensors"))
    return tmp_path / "t.safetensors", w.float()


@pytest.mark.parametrize("preset,layer", [("w4-g64", "default"), ("w4-g64", "embedding")])
def test_row_chunks_give_the_whole_table_codes(tmp_path, preset, layer):
    """Codes, scales and zero points from row chunks (97 rows: chunks do not divide 300) equal
    the whole table's (weight_qparams + QUANTIZE on the float32 whole), and the gather-then-
    dequantize embedding equals dequantize-then-gather."""
    from qcompile.blockwise_tables import QuantizedEmbedding, RowCodes, gather_rows
    from qcompile.observers import weight_qparams
    from qcompile.ops import QUANTIZE

    shard, w = _table_shard(tmp_path)
    spec = getattr(qcompile.Recipe.preset(preset), layer).weight
    group = spec.group_size if spec.granularity == "per_group" else 0
    rc = RowCodes(shard, "t", spec, rows_per_chunk=97)
    s, z = weight_qparams(w, spec, 0)
    assert torch.equal(rc.codes, QUANTIZE(w, s, z, spec.format, group)) and torch.equal(rc.scale, s)
    assert (rc.zero_point is None and z is None) or torch.equal(rc.zero_point, z)
    ids = torch.tensor([[0, 7, 299, 150, 7]])
    whole = DEQUANTIZE(rc.codes, rc.scale, rc.zero_point, spec.format, group, torch.float32)
    assert torch.equal(QuantizedEmbedding(rc)(ids), torch.nn.functional.embedding(ids, whole))
    assert torch.equal(gather_rows(shard, "t", [ids], rows_per_chunk=97)[0], w[ids])
    row = rc.layer_report("t", "embedding")
    assert 10 < row.weight_sqnr < 60 and row.weight_bytes_quantized < row.weight_bytes_float


def test_row_separable_refuses_what_spans_rows():
    from qcompile.blockwise_tables import row_separable

    assert row_separable(qcompile.Recipe.preset("w4-g64").default)
    assert not row_separable(qcompile.Recipe.preset("w8a8").default)           # an activation format
    assert not row_separable(qcompile.Recipe.preset("w5-g64-dq-gptq").default)  # double-quantized scales
    assert not row_separable(None)                                              # kept float


def test_gptq_hessian_of_stats_is_of_bit_for_bit_and_gives_the_gram_up():
    from qcompile.algorithms.common import InputStats
    from qcompile.algorithms.gptq import GPTQHessian

    x = torch.randn(40, 96, generator=torch.Generator().manual_seed(5))
    x[:, 9] = 0   # a dead channel
    st = InputStats.of(x[:20])
    st.add(x[20:])
    h = st.hessian()
    ref = GPTQHessian.of(h)
    got = GPTQHessian.of_stats(st)
    assert st.gram is None
    assert all(torch.equal(getattr(ref, f), getattr(got, f)) for f in ("perm", "dead", "hinv", "hessian32"))
    assert ref.damping == got.damping and torch.equal(got.hessian32, h.float())


def test_spilled_hidden_states_give_identical_bytes(gptq_out, llama_dir, tmp_path):
    """A budget smaller than one block's input and output hidden states (2 x 4 items x 16 x 64
    float32 = 32 KiB): they go to disk in the output directory, the programs are the same bytes as
    the in-memory run's, and no spill file is left."""
    out = quantize_directory(llama_dir, _recipe("w4-g64-gptq"), CAL, tmp_path / "spilled", max_memory="16KB")
    storage = json.loads((out / "qcompile.json").read_text())["activation_storage"]
    assert storage == {"where": "disk", "max_memory": 16000, "bytes_per_copy": 4 * 16 * 64 * 4}
    assert json.loads((gptq_out / "qcompile.json").read_text())["activation_storage"]["where"] == "memory"
    a, b = _program_tensors(gptq_out), _program_tensors(out)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("bad", ["8 parsecs", "GB", -1, 0, "0MB", True, 1.5e9])
def test_bad_max_memory_is_named(llama_dir, tmp_path, bad):
    with pytest.raises(InputError, match=r"^max_memory="):
        quantize_directory(llama_dir, _recipe("w4-g64"), CAL, tmp_path / "o", max_memory=bad)
    assert not (tmp_path / "o").exists()


def test_parse_bytes_units():
    from qcompile.blockwise_spill import parse_bytes

    assert parse_bytes("8GB") == 8 * 10 ** 9 and parse_bytes("512MiB") == 512 * 2 ** 20
    assert parse_bytes("1.5 GiB") == 3 * 2 ** 29 and parse_bytes(4096) == 4096 and parse_bytes("100") == 100


def test_max_memory_refused_for_a_module_in_memory():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(InputError, match=r"^max_memory='1GB': a memory budget applies to a model directory"):
        qcompile.quantize(model, "w8", (torch.randn(2, 8),), max_memory="1GB")
