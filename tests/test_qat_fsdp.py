"""QAT under FSDP2 (``torch.distributed.fsdp.fully_shard``): 2 gloo processes on CPU, each training
on its half of every batch, parameters sharded (DTensor). The losses equal one process training on
the whole batches within float tolerance, and after gathering the full state dict
(``torch.distributed.checkpoint.state_dict``) both ranks convert to identical qparams, equal to
one process's within float tolerance.

A model without batch norm: FSDP, like DDP, normalises each rank's batch by its own statistics, so
a batch-norm model differs from one process by design. Learned scales (``learn_scale: true``) are
refused by ``fully_shard`` itself: "fully_shard doesn't support scalar parameters. Change log_scale
to a 1D tensor with numel equal to 1." (per-tensor LSQ scales are 0-d parameters).
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


def _train(qat, x, y, part=slice(None)):
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    losses = []
    for i in range(STEPS):
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



def test_fsdp2_qat_equals_one_process(tmp_path):
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    model, recipe, x, y = _case()
    qat = qcompile.prepare_qat(model, recipe, (x[:2],))
    losses = _train(qat, x, y)
    expected = _qparams(qcompile.convert(qat.eval()))
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
