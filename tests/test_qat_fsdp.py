"""QAT under FSDP2 (``torch.distributed.fsdp.fully_shard``): 2 gloo processes on CPU, each training
on its half of every batch, parameters sharded (DTensor). The losses equal one process training on
the whole batches within float tolerance, and after gathering the full state dict
(``torch.distributed.checkpoint.state_dict``) both ranks convert to identical qparams, equal to
one process's within float tolerance.

A model without batch norm: FSDP, like DDP, normalises each rank's batch by its own statistics, so
a batch-norm model differs from one process by design. Learned scales and zero points (LSQ+) shard
too (per-tensor ones are stored with one dim of size 1: ``fully_shard`` refuses 0-d parameters), and
a run checkpointed with ``torch.distributed.checkpoint`` mid-way, reloaded into fresh sharded models
and trained on, ends where an uninterrupted one-process run ends.
"""
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import qcompile
from conftest import free_port

WORLD, STEPS, BATCH = 2, 3, 16


def _case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    recipe = dataclasses.replace(qcompile.Recipe.preset("w8a8"), smoothing=None, qat=qcompile.QATConfig())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(STEPS * BATCH, 8, generator=g)
    y = torch.randint(0, 4, (STEPS * BATCH,), generator=g)
    return model, recipe, x, y


def _learned_case(observer_steps=0):
    model, recipe, x, y = _case()
    qat = qcompile.QATConfig(learn_scale=True, learn_zero_point=True, observer_steps=observer_steps)
    return model, dataclasses.replace(recipe, qat=qat), x, y


def _prepare_learned(model, recipe, x):
    """Learned scales start from calibration (on every rank the same batches), then only train."""
    return qcompile.prepare_qat(model, recipe, (x[:2],), calibration=[(x[:BATCH],), (x[BATCH:2 * BATCH],)])


def _train(qat, x, y, part=slice(None), steps=range(STEPS)):
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)   # no momentum: a new optimizer after a reload is the same
    losses = []
    for i in steps:
        xb, yb = x[i * BATCH:(i + 1) * BATCH][part], y[i * BATCH:(i + 1) * BATCH][part]
        loss = F.cross_entropy(qat(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _qparams(q) -> dict:
    return {k: v.clone() for k, v in q.graph_module.state_dict().items()}


def _rank_main(rank, port, out):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, recipe, x, y = _case()
        qat = qcompile.prepare_qat(model, recipe, (x[:2],))
        fully_shard(qat)
        sharded = all(type(p).__name__ == "DTensor" for p in qat.parameters())
        half = BATCH // WORLD
        losses = _train(qat, x, y, slice(rank * half, (rank + 1) * half))
        full = get_model_state_dict(qat, options=StateDictOptions(full_state_dict=True))
        local = qcompile.prepare_qat(model, recipe, (x[:2],))   # an unsharded copy to convert
        local.load_state_dict(full)
        q = qcompile.convert(local.eval())
        torch.save({"losses": losses, "qparams": _qparams(q), "sharded": sharded}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def _rank_checkpointed(rank, port, out):
    """Learned scales under FSDP2: 2 steps, a ``torch.distributed.checkpoint`` save, a fresh sharded
    model loaded from it, the last step; then the full state dict converted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, recipe, x, y = _learned_case(observer_steps=1)
        observing = qcompile.prepare_qat(model, recipe, (x[:2],))
        fully_shard(observing)
        try:   # an observer step inside FSDP's forward would write a copy that is then dropped
            observing(x[:2])
            refused = ""
        except qcompile.RecipeError as e:
            refused = f"{e.field}: {e}"
        model, recipe, x, y = _learned_case()
        half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        qat = _prepare_learned(model, recipe, x)
        fully_shard(qat)
        learned = [n for n, p in qat.named_parameters() if n.endswith(("log_scale", "zero_point"))]
        sharded = all(type(p).__name__ == "DTensor" for p in qat.parameters())
        losses = _train(qat, x, y, half, range(STEPS - 1))
        dcp.save({"model": get_model_state_dict(qat)}, checkpoint_id=f"{out}/checkpoint")
        resumed = _prepare_learned(model, recipe, x)
        fully_shard(resumed)
        state = {"model": get_model_state_dict(resumed)}
        dcp.load(state, checkpoint_id=f"{out}/checkpoint")
        set_model_state_dict(resumed, state["model"])
        losses += _train(resumed, x, y, half, range(STEPS - 1, STEPS))
        full = get_model_state_dict(resumed, options=StateDictOptions(full_state_dict=True))
        local = qcompile.prepare_qat(model, recipe, (x[:2],))
        local.load_state_dict(full)
        q = qcompile.convert(local.eval())
        torch.save({"losses": losses, "qparams": _qparams(q), "sharded": sharded, "learned": learned,
                    "refused": refused},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _check_equal_to_one_process(ranks, losses, expected):
    assert all(r["sharded"] for r in ranks)
    # each rank's loss is its half's mean; one process's the whole batch's: their mean
    mean_losses = [sum(r["losses"][i] for r in ranks) / WORLD for i in range(STEPS)]
    assert mean_losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert ranks[0]["qparams"].keys() == ranks[1]["qparams"].keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(ranks[0]["qparams"][k], ranks[1]["qparams"][k]), k
        if v.is_floating_point():
            torch.testing.assert_close(ranks[0]["qparams"][k], v, rtol=1e-5, atol=1e-6)
        else:   # codes: a float-tolerance difference in a weight may move a code across a rounding tie
            assert int((ranks[0]["qparams"][k].int() - v.int()).abs().max()) <= 1, k


def test_fsdp2_qat_learned_scales_checkpoint_resume_equals_one_process(tmp_path):
    mp.spawn(_rank_checkpointed, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert len(ranks[0]["learned"]) == 6   # 2 weights' and 2 activations' scales, the activations' 2 zero points
    assert all(r["refused"].startswith("qat.observer_steps: ") and "fully_shard" in r["refused"] for r in ranks)
    assert len(list((tmp_path / "checkpoint").glob("*.distcp"))) == WORLD   # one shard file per rank
    model, recipe, x, y = _learned_case()
    qat = _prepare_learned(model, recipe, x)
    losses = _train(qat, x, y)
    _check_equal_to_one_process(ranks, losses, _qparams(qcompile.convert(qat.eval())))


def test_fsdp2_qat_equals_one_process(tmp_path):
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    model, recipe, x, y = _case()
    qat = qcompile.prepare_qat(model, recipe, (x[:2],))
    losses = _train(qat, x, y)
    _check_equal_to_one_process(ranks, losses, _qparams(qcompile.convert(qat.eval())))
