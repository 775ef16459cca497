"""Per-kernel time of MiniLM w8a8 compiled by the tvm backend, one thread: every VM call (TIR
kernels and VM builtins) timed through the Relax VM's instrument hook, the minimum over rounds of
each kernel's total per forward pass, with its share. Run::

    TVM_NUM_THREADS=1 python benchmarks/tvm_minilm_profile.py [--batch 1 32] [--rounds 5] [--out FILE.json]

The hook costs a few microseconds per call (~600 calls per pass): the per-kernel sum is a little
above the un-instrumented time, which is printed too (same process, same rounds).
"""
import argparse
import collections
import json
import os
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def profile(art, ids, mask, rounds: int) -> dict:
    """{"wall_ms": [...], "kernels": {name: {"ms": min total per pass, "calls": n}}}."""
    import tvm

    vm, dev = art.vm, tvm.cpu()
    feed = [tvm.runtime.tensor(np.ascontiguousarray(t.numpy()), dev) for t in (ids, mask)]
    vm["main"](*feed)  # warm-up
    wall = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        vm["main"](*feed)
        wall.append((time.perf_counter() - t0) * 1e3)
    best, calls = collections.defaultdict(lambda: float("inf")), {}
    for _ in range(rounds):
        acc, count, start = collections.defaultdict(float), collections.Counter(), {}

        def instrument(func, name, before, ret, *args, acc=acc, count=count, start=start):
            if before:
                start[name] = time.perf_counter()
            else:
                acc[name] += time.perf_counter() - start[name]
                count[name] += 1
            return 0  # VMInstrumentReturnKind.NO_OP

        vm.set_instrument(instrument)
        vm["main"](*feed)
        vm.set_instrument(lambda *a: 0)
        for name, t in acc.items():
            best[name] = min(best[name], t * 1e3)
        calls = dict(count)
    return {"wall_ms": wall, "kernels": {k: {"ms": v, "calls": calls[k]} for k, v in best.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from test_minilm import _calibration_batches, _fixed_inputs, _quantize

    import qcompile
    from qcompile.models import load_minilm

    minilm = load_minilm()
    qmodel = _quantize(minilm, _calibration_batches(minilm))
    art = qcompile.lower(qmodel, backend="tvm")
    results = {"compile_seconds": art.compile_seconds, "load_average": os.getloadavg(), "batches": {}}
    for batch in args.batch:
        ids, mask = _fixed_inputs(minilm, batch)
        res = profile(art, ids, mask, args.rounds)
        results["batches"][batch] = res
        total = sum(k["ms"] for k in res["kernels"].values())
        print(f"\nbatch {batch} x 128: wall min {min(res['wall_ms']):.1f} ms, median {np.median(res['wall_ms']):.1f} ms; "
              f"per-kernel sum {total:.1f} ms")
        for name, k in sorted(res["kernels"].items(), key=lambda kv: -kv[1]["ms"])[:args.top]:
            print(f"  {k['ms']:9.2f} ms {100 * k['ms'] / total:5.1f}%  x{k['calls']:<4d} {name}")
    results["load_average_end"] = os.getloadavg()
    print("load average", results["load_average"], "→", results["load_average_end"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
