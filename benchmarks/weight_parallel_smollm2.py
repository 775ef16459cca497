"""Weight-parallel GPTQ (:func:`qcompile.distributed.owners`): SmolLM2-135M's first decoder layers
quantized with ``w4-g64-gptq`` by one process and by two gloo processes (``torch.multiprocessing``,
one thread each, calibration in halves, each rank solving its share of every block's Linears).
Reports the wall time of ``qcompile.quantize`` and of its GPTQ pass on each, whether the codes are
identical, which rank solved which layer, and the host's load average (the host may be shared).

Run::

    python benchmarks/weight_parallel_smollm2.py --layers 4 --items 8 --seq 128
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run(layers: int, items: int, seq: int, shard: bool) -> dict:
    import qcompile
    from qcompile import distributed
    from qcompile.models.smollm2 import load_smollm2

    model = load_smollm2().model
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, model.config.vocab_size, (1, seq), generator=g),) for _ in range(items)]
    t0 = time.perf_counter()
    qmodel = qcompile.quantize(model, "w4-g64-gptq", batches[0], example_kwargs={"use_cache": False},
                               calibration=distributed.shard(batches) if shard else batches, report_samples=0)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "timings_s": dict(qmodel.report.timings_s),
            "owners": {e["layer"]: e.get("rank", 0) for e in qmodel.report.weight_algorithm if e["method"] == "gptq"},
            "state": {k: v.detach().clone() for k, v in qmodel.graph_module.state_dict().items()},
            "loadavg_1m": os.getloadavg()[0]}


def _rank_main(rank: int, port: int, out: str, layers: int, items: int, seq: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(_run(layers, items, seq, shard=True), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/weight_parallel_smollm2.json")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import free_port

    torch.set_num_threads(1)
    one = _run(a.layers, a.items, a.seq, shard=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mp.spawn(_rank_main, args=(free_port(), tmp, a.layers, a.items, a.seq), nprocs=2, join=True)
        spawn_wall = time.perf_counter() - t0
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    differing = {r: [k for k, v in one["state"].items() if not torch.equal(v, got["state"][k])]
                 for r, got in enumerate(ranks)}

    def gptq_s(res):
        return res["timings_s"].get("gptq", 0.0)

    result = {
        "model": f"SmolLM2-135M, first {a.layers} decoder layers", "recipe": "w4-g64-gptq",
        "calibration": f"{a.items} items x {a.seq} tokens (random ids), halves per rank", "threads_per_process": 1,
        "one_process": {"quantize_wall_s": one["wall_s"], "gptq_pass_s": gptq_s(one), "loadavg_1m": one["loadavg_1m"]},
        "two_processes": {"quantize_wall_s": [r["wall_s"] for r in ranks], "gptq_pass_s": [gptq_s(r) for r in ranks],
                          "spawn_total_wall_s": spawn_wall, "loadavg_1m": [r["loadavg_1m"] for r in ranks]},
        "gptq_speedup": gptq_s(one) / max(gptq_s(r) for r in ranks),
        "quantize_speedup": one["wall_s"] / max(r["wall_s"] for r in ranks),
        "tensors_differing_from_one_process": differing,
        "solves_per_rank": {r: sum(1 for v in ranks[0]["owners"].values() if v == r) for r in range(2)},
        "timings_s_one_process": one["timings_s"], "timings_s_rank0": ranks[0]["timings_s"],
        "host": f"{os.cpu_count()} CPUs, shared",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("timings")}, indent=2))


if __name__ == "__main__":
    main()
