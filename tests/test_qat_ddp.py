"""QAT under DistributedDataParallel: 2 CPU processes, gloo. Each rank trains on its own data; the
observed activation ranges are reduced over both ranks, so after convert every rank holds the same
quantization parameters, and they cover both ranks' data."""
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port

WORLD = 2



def _worker(rank, port, out_dir, learn):
    import qcompile
    from qcompile.recipe import QATConfig
    from conftest import TinyCNN, randomise_bn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)                              # the same float model on every rank
        model = randomise_bn(TinyCNN()).eval()
        cfg = QATConfig(learn_scale=True, observer_steps=2, freeze_bn_steps=3) if learn else QATConfig()
        recipe = dataclasses.replace(qcompile.Recipe.preset("w4a8"), qat=cfg)
        g = torch.Generator().manual_seed(100 + rank)     # different data per rank, rank 1 wider
        x = torch.randn(24, 1, 8, 8, generator=g) * (1 + 2 * rank)
        y = torch.randint(0, 10, (24,), generator=g)
        qat = qcompile.prepare_qat(model, recipe, (x[:2],))
        # ste: no buffer broadcast, so only qcompile's reduction can make the ranks agree
        ddp = torch.nn.parallel.DistributedDataParallel(qat, broadcast_buffers=learn)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-2)
        for i in range(3):
            loss = F.cross_entropy(ddp(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
        q = qcompile.convert(qat.eval())
        qparams = {k: v for k, v in q.graph_module.state_dict().items() if "scale" in k or "zero_point" in k}
        ranges = {k: v for k, v in qat.state_dict().items() if k.endswith(("min_val", "max_val"))}
        local_max = x[:24].max()
        with torch.no_grad():
            out = q(torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7)))  # one input for all ranks
        torch.save({"qparams": qparams, "ranges": ranges, "local_max": local_max, "out": out},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("learn", [False, True], ids=["ste", "lsq"])
def test_ddp_ranks_end_with_identical_qparams(tmp_path, learn):
    mp.spawn(_worker, args=(free_port(), str(tmp_path), learn), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert r0["qparams"].keys() == r1["qparams"].keys() and len(r0["qparams"]) >= 6
    for k in r0["qparams"]:
        assert torch.equal(r0["qparams"][k], r1["qparams"][k]), k
    # reduced, not just rank 0's: the input quantizer saw rank 1's wider data on both ranks
    k_in = "graph_module.qfq_0.max_val"
    assert r1["local_max"] > r0["local_max"]
    assert torch.equal(r0["ranges"][k_in], r1["ranges"][k_in])
    assert r0["ranges"][k_in] >= r1["local_max"]
    # the converted models are the same function on both ranks
    assert torch.equal(r0["out"], r1["out"])
