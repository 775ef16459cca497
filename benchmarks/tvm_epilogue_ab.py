"""A/B of the fused GEMM epilogue (qcompile/backends/tvm/epilogue.py) on MiniLM w8a8, one thread,
in one process: the same quantized model lowered twice, without the epilogue fusions (``old``: neither
FuseEpiloguePass nor FuseNormQuantizePass) and with them (``new``), called in alternation; medians, the ratio, cosine vs the reference backend, and
per-kernel times of both builds (the profile hook of tvm_minilm_profile.py). Run::

    TVM_NUM_THREADS=1 python benchmarks/tvm_epilogue_ab.py [--batch 1 32] [--rounds 30 6] [--out FILE.json]

Results are written to ``--out`` after each batch, so a cut-off run still leaves numbers.
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, nargs="+", default=[30, 6])
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from test_minilm import _calibration_batches, _fixed_inputs, _quantize
    from tvm_minilm_profile import profile

    import qcompile
    from qcompile.backends.tvm import epilogue
    from qcompile.models import load_minilm
    from qcompile.passes.lowering import FuseResult
    from qcompile.report import cosine

    minilm = load_minilm()
    qmodel = _quantize(minilm, _calibration_batches(minilm))
    new = qcompile.lower(qmodel, backend="tvm")
    passes = (epilogue.FuseEpiloguePass, epilogue.FuseNormQuantizePass)
    calls = [p.call for p in passes]
    for p in passes:   # the build before this change: neither fusion
        p.call = lambda self, gm: FuseResult.of(gm, {}, {})
    try:
        old = qcompile.lower(qmodel, backend="tvm")
    finally:
        for p, call in zip(passes, calls):
            p.call = call
    arts = {"old": old, "new": new}
    results = {"epilogues": new.meta["epilogues"], "load_average": os.getloadavg(), "batches": {}}
    for batch, rounds in zip(args.batch, args.rounds + args.rounds[-1:] * len(args.batch)):
        ids, mask = _fixed_inputs(minilm, batch)
        times = {k: [] for k in arts}
        with torch.inference_mode():
            ref = qmodel(ids, mask)
            outs = {k: a(ids, mask) for k, a in arts.items()}   # warm-up
            for _ in range(rounds):
                for k, a in arts.items():
                    t0 = time.perf_counter()
                    a(ids, mask)
                    times[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        res = {"median_ms": med, "speedup_new_vs_old": med["old"] / med["new"],
               "cosine_vs_reference": {k: cosine(ref, o) for k, o in outs.items()},
               "kernels": {k: profile(a, ids, mask, 3)["kernels"] for k, a in arts.items()}}
        results["batches"][batch] = res
        print(f"batch {batch}: old {med['old']:.2f} ms, new {med['new']:.2f} ms, old/new {res['speedup_new_vs_old']:.3f}; "
              f"cosine vs reference {res['cosine_vs_reference']}")
        for k in arts:
            top = sorted(res["kernels"][k].items(), key=lambda kv: -kv[1]["ms"])[:12]
            print(f"  {k}: " + "; ".join(f"{n} {v['ms']:.2f} ms x{v['calls']}" for n, v in top))
        results["load_average_end"] = os.getloadavg()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print("load average", results["load_average"], "→", results["load_average_end"])


if __name__ == "__main__":
    main()
