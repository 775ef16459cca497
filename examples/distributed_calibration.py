"""Data-parallel calibration on torch.distributed: every rank calibrates on its shard of the data and
gets the model one process would get on all of it; rank 0 alone writes the artifact.

A small Llama (random weights, transformers ``LlamaConfig``) quantized with ``--recipe`` (default
``w4-g64-gptq``) on ``--batches`` calibration batches of random tokens, split contiguously over the
ranks (:func:`qcompile.distributed.shard`). Rank 0 prints a sha256 of the saved codes and scales;
run it once with ``--nproc-per-node 1`` and once with 2 and compare (``docs/distributed.md``).

Run (gloo on CPU; NCCL when every rank has a GPU)::

    PYTHONPATH=. torchrun --nproc-per-node 2 examples/distributed_calibration.py --out out/dist-llama
    PYTHONPATH=. torchrun --nproc-per-node 1 examples/distributed_calibration.py --out out/one-llama

Two machines (run on each, ``--node-rank 0`` on the first, ``1`` on the second)::

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29500 --rdzv-id qc1 examples/distributed_calibration.py --out out/m
"""
from __future__ import annotations

import argparse
import hashlib
import time

import torch
import torch.distributed as dist

import qcompile
from qcompile import distributed


def tiny_llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)   # the same weights on every rank
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def digest(qmodel) -> str:
    """sha256 over the converted model's tensors (codes, scales, float tensors), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(qmodel.graph_module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="w4-g64-gptq")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default="out/distributed-llama")
    args = p.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    torch.set_num_threads(1)
    model = tiny_llama(args.hidden, args.layers)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (2, 32), generator=g),) for _ in range(args.batches)]
    mine = distributed.shard(batches)    # rank 0 the first part, rank 1 the next, ...
    t0 = time.perf_counter()
    qmodel = qcompile.quantize(model, args.recipe, batches[0], calibration=mine)
    seconds = time.perf_counter() - t0
    qmodel.save(args.out)                # rank 0 writes; the others wait for it and write nothing
    print(f"rank {dist.get_rank()}/{dist.get_world_size()}: {len(mine)} of {len(batches)} batches, "
          f"{seconds:.1f} s, calibration_samples={qmodel.report.calibration_samples}, "
          f"tensors sha256 {digest(qmodel)[:16]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
