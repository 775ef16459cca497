"""Weight-parallel GPTQ on torch.distributed: two real gloo processes (``torch.multiprocessing.spawn``)
each solve their share of a block's Linears and broadcast it; the model equals one process's bit for
bit, both ranks did solves, and a solve failing on one rank alone (a NaN weight only its owner looks
at) raises the same error, rank and layer named, on both ranks.
"""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qcompile
from qcompile import distributed
from qcompile.errors import CalibrationError
from conftest import free_port

WORLD = 2
NAN_LAYER = "model.layers.0.self_attn.k_proj"   # q (cost 64²·64) goes to rank 0, k and v (64²·32) to rank 1


def _case(nan_layer=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, use_cache=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    if nan_layer:
        with torch.no_grad():
            model.get_submodule(nan_layer).weight[3, 5] = float("nan")
    g = torch.Generator().manual_seed(5)
    return model, [(torch.randint(0, 64, (2, 8), generator=g),) for _ in range(4)]


def _quantize(data=lambda b: b, nan_layer=None):
    model, batches = _case(nan_layer)
    return qcompile.quantize(model, "w4-g64-gptq", batches[0], calibration=data(batches), report_samples=0)


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        qmodel = _quantize(distributed.shard)
        got = {"state": {k: v.detach().clone() for k, v in qmodel.graph_module.state_dict().items()},
               "records": qmodel.report.weight_algorithm}
        try:
            _quantize(distributed.shard, nan_layer=NAN_LAYER).save(Path(out) / "nan-model")
            got["nan"] = None
        except CalibrationError as e:
            got["nan"] = (type(e).__name__, str(e))
        torch.save(got, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("wp")
    mp.spawn(_rank_main, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_weight_parallel_equals_one_process(two_ranks):
    """Both ranks hold one process's codes, scales and every other tensor bit for bit, and each rank
    solved some of the Linears (the plan of :func:`distributed.owners`, in the report)."""
    _, ranks = two_ranks
    single = _quantize()
    expected = {k: v.detach() for k, v in single.graph_module.state_dict().items()}
    for r, got in enumerate(ranks):
        assert got["state"].keys() == expected.keys()
        differing = {k: int((got["state"][k] != v).sum()) for k, v in expected.items() if not torch.equal(got["state"][k], v)}
        assert differing == {}, f"rank {r}: {differing}"
    solved = {e["layer"]: e["rank"] for e in ranks[0]["records"] if e["method"] == "gptq"}
    assert solved == {e["layer"]: e["rank"] for e in ranks[1]["records"] if e["method"] == "gptq"}
    assert set(solved.values()) == {0, 1}
    assert solved["model.layers.0.self_attn.q_proj"] == 0 and solved["model.layers.0.self_attn.k_proj"] == 1
    assert [e["layer"] for e in single.report.weight_algorithm] == [e["layer"] for e in ranks[0]["records"]]


def test_failed_solve_on_one_rank_reaches_every_rank(two_ranks):
    """A NaN weight seen only by its owner (rank 1): both ranks raise the same CalibrationError naming
    rank 1 and the layer; nothing is written."""
    out, ranks = two_ranks
    assert ranks[0]["nan"] is not None and ranks[0]["nan"] == ranks[1]["nan"]
    name, message = ranks[0]["nan"]
    assert name == "CalibrationError"
    assert message == f"rank 1 of 2: GPTQ: the weight of layer '{NAN_LAYER}' has NaN or Inf entries"
    assert not (out / "nan-model").exists()


def test_nan_weight_named_in_one_process():
    with pytest.raises(CalibrationError, match=f"GPTQ: the weight of layer '{NAN_LAYER}' has NaN"):
        _quantize(nan_layer=NAN_LAYER)


def test_owners_balance_by_cost():
    """Longest solve first to the least loaded rank; ties to the lower rank; one process: rank 0."""
    assert distributed.owners([4.0, 1.0, 1.0], world=2) == [0, 1, 1]
    assert distributed.owners([1.0, 1.0, 1.0, 1.0], world=2) == [0, 1, 0, 1]
    assert distributed.owners([1.0, 8.0, 3.0, 3.0, 2.0], world=3) == [2, 0, 1, 2, 1]
    assert distributed.owners([5.0, 2.0]) == [0, 0]
