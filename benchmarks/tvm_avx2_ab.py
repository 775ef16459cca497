"""A/B of the ``avx2`` integer GEMM (qcompile/backends/tvm/int8_gemm.py), one thread, one process:
the kernel on split weights (``vpmaddubsw`` on ``16·hi + lo``, 16-bit sums over ``AVX2_STEPS`` steps,
family ``avx2``) against the kernel it replaced (``vpmaddwd`` on codes widened to 16 bits, kept as
family ``avx2-wide``), called in alternation:

- GEMM M x 768 x 3072 (M = 128 and 1) and MiniLM's GEMMs at batch 1 (:data:`SHAPES`), both
  compiled for an AVX2 target without AVX-512 (``--mcpu``, default ``x86-64-v3``), checked
  bit-exact against int64 numpy (identity epilogue) or against each other (GELU + quantize);
  GOP/s = 2·M·K·N / time; and the register-only ``vpmaddubsw`` loop, the host's peak;
- MiniLM w8a8 x 128 tokens, batch 1 and 32, the model lowered with each family (``--model-mcpu``:
  the LLVM CPU of the whole model; default the host's), cosine of each against the reference
  backend.

Medians and minimums over interleaved rounds, and the load average before and after (the machines
are shared: compare the two kernels, not these numbers with other runs). Run::

    TVM_NUM_THREADS=1 python benchmarks/tvm_avx2_ab.py [--skip-model] [--out FILE.json]
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FAMILIES = ("avx2-wide", "avx2")   # old, new


def _interleaved(calls: dict, rounds: int) -> dict:
    """Wall and CPU time of each call (``time.thread_time``: the time this thread ran, which a
    loaded machine's preemptions do not inflate), the calls in alternation, round by round."""
    times = {k: ([], []) for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            f()
            times[k][0].append(time.perf_counter() - t0)
            times[k][1].append(time.thread_time() - c0)
    return {k: {"median_s": statistics.median(w), "min_s": min(w), "cpu_median_s": statistics.median(c)}
            for k, (w, c) in times.items()}


# (M, K, N, epilogue): the GEMM and its one-row case, then MiniLM's four GEMMs at batch 1
# (Q/K/V/output, FFN up with its fused GELU + uint8 quantize, FFN down)
SHAPES = [(128, 768, 3072, None), (1, 768, 3072, None), (128, 384, 384, None), (128, 384, 1536, ("gelu", "uint8")),
          (128, 1536, 384, None)]


def _gemm_case(target, m, k, n, epilogue, rng):
    """The two families' calls for one shape, their outputs checked equal (and, with the identity
    epilogue, equal to the int64 product)."""
    import tvm

    from qcompile.backends.tvm import int8_gemm
    from qcompile.backends.tvm.host import compile_kernel

    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    np_ = int8_gemm.padded_n(n)
    scales = [np.full(1, 1e-3, np.float32), np.zeros(1, np.int32), np.full(np_, 1e-2, np.float32)] if epilogue else [
        np.ones(1, np.float32), np.zeros(1, np.int32), np.ones(np_, np.float32)]
    extra = [np.ones(np_, np.float32), np.array([0.05], np.float32), np.array([3], np.int32)] if epilogue else []
    calls, outs = {}, {}
    for fam in FAMILIES:
        f = compile_kernel(int8_gemm.gemm_kernel(k, np_, False, fam, epilogue), target)["main"]
        t = [tvm.runtime.tensor(x) for x in (
            a, int8_gemm.weights_for_family(int8_gemm.pack_weights(w), fam), np.zeros(np_, np.int32), *scales,
            np.zeros(np_, np.float32), *extra, np.zeros((m, np_), np.uint8 if epilogue else np.float32))]
        f(*t)
        outs[fam] = t[-1].numpy()[:, :n]
        calls[fam] = lambda f=f, t=t: f(*t)
    assert np.array_equal(*outs.values()), f"the two kernels differ at {m}x{k}x{n}"
    if not epilogue:
        assert np.array_equal(outs["avx2"], (a.astype(np.int64) @ w.astype(np.int64).T).astype(np.float32))
    return calls


def gemm(mcpu: str) -> dict:
    import tvm

    from qcompile.backends.tvm.host import compile_kernel
    from qcompile.backends.tvm.peak import pmaddubsw_peak_kernel

    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    rng = np.random.default_rng(0)
    iters = 20000
    f = compile_kernel(pmaddubsw_peak_kernel(iters), target)["main"]
    t = [tvm.runtime.tensor(np.ones(32, np.int8)), tvm.runtime.tensor(np.ones(32, np.int8)),
         tvm.runtime.tensor(np.zeros(12 * 16, np.int16))]
    f(*t)
    assert (t[-1].numpy() == 2).all()   # every lane: u8 (1, 1) . s8 (1, 1) = 2, then (2, 0) . (1, 1) = 2
    peak = _interleaved({"peak": lambda: f(*t)}, 20)["peak"]
    out = {"pmaddubsw_peak_gops_cpu_median": iters * 12 * 64 / peak["cpu_median_s"] / 1e9}
    print(f"vpmaddubsw peak ({mcpu}, 32 multiply-adds per instruction): {out['pmaddubsw_peak_gops_cpu_median']:.1f} GOP/s "
          "(CPU time); the exact avx2 kernel's ceiling is 2 / 4.5 of it")
    for m, k, n, epilogue in SHAPES:
        res = _interleaved(_gemm_case(target, m, k, n, epilogue, rng), 1000 if m == 1 else 40)
        ops = 2 * m * k * n
        for fam in FAMILIES:
            r = res[fam]
            r["gops_median"], r["gops_min_time"], r["gops_cpu_median"] = (
                ops / r[x] / 1e9 for x in ("median_s", "min_s", "cpu_median_s"))
            r["pct_of_pmaddubsw_peak"] = 100 * r["gops_cpu_median"] / out["pmaddubsw_peak_gops_cpu_median"]
        for x in ("median", "min", "cpu_median"):
            res[f"new_vs_old_{x}"] = res["avx2-wide"][f"{x}_s"] / res["avx2"][f"{x}_s"]
        name = f"{m}x{k}x{n}" + (f"_{'_'.join(epilogue)}" if epilogue else "")
        out[name] = res
        print(f"GEMM {name} ({mcpu}): " + "; ".join(
            f"{fam} {res[fam]['median_s'] * 1e6:.1f} us ({res[fam]['gops_median']:.1f} GOP/s), "
            f"min {res[fam]['min_s'] * 1e6:.1f} us ({res[fam]['gops_min_time']:.1f}), "
            f"CPU {res[fam]['cpu_median_s'] * 1e6:.1f} us ({res[fam]['gops_cpu_median']:.1f})" for fam in FAMILIES)
            + f"; new/old speed {res['new_vs_old_median']:.2f}x median, {res['new_vs_old_min']:.2f}x min, "
            f"{res['new_vs_old_cpu_median']:.2f}x CPU time")
    return out


def minilm(model_mcpu, batches, rounds) -> dict:
    from test_minilm import _calibration_batches, _fixed_inputs, _quantize

    import qcompile
    import qcompile.backends.tvm as tvm_backend
    from qcompile.models import load_minilm
    from qcompile.report import cosine

    if model_mcpu:   # the whole model for another LLVM CPU of this host's flags (an AVX2-only target)
        host = tvm_backend.detect()
        tvm_backend.detect = lambda: dataclasses.replace(host, mcpu=model_mcpu, mattr=())
    model = load_minilm()
    qmodel = _quantize(model, _calibration_batches(model))
    arts = {fam: qcompile.lower(qmodel, backend="tvm", family=fam, threads=1) for fam in FAMILIES}
    out = {"mcpu": arts["avx2"].meta["target"]["mcpu"]}
    for batch, n in zip(batches, rounds):
        ids, mask = _fixed_inputs(model, batch)
        with torch.inference_mode():
            ref = qmodel(ids, mask)
            cos = {fam: cosine(ref, a(ids, mask)) for fam, a in arts.items()}
            res = _interleaved({fam: (lambda a=a: a(ids, mask)) for fam, a in arts.items()}, n)
        res["new_vs_old_median"] = res["avx2-wide"]["median_s"] / res["avx2"]["median_s"]
        res["new_vs_old_cpu_median"] = res["avx2-wide"]["cpu_median_s"] / res["avx2"]["cpu_median_s"]
        res["cosine_vs_reference"] = cos
        out[f"batch{batch}"] = res
        print(f"MiniLM w8a8 batch {batch} ({out['mcpu']}): " + "; ".join(
            f"{fam} {res[fam]['median_s'] * 1e3:.2f} ms (min {res[fam]['min_s'] * 1e3:.2f}, "
            f"CPU {res[fam]['cpu_median_s'] * 1e3:.2f})" for fam in FAMILIES)
            + f"; new/old speed {res['new_vs_old_median']:.2f}x median, {res['new_vs_old_cpu_median']:.2f}x CPU time; "
            f"cosine vs reference {cos}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mcpu", default="x86-64-v3", help="LLVM CPU of the GEMM kernels")
    parser.add_argument("--model-mcpu", default=None, help="LLVM CPU of the MiniLM builds (default: the host's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, nargs="+", default=[30, 5])
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"load_average_start": os.getloadavg(), "gemm": gemm(args.mcpu)}
    if not args.skip_model:
        results["minilm"] = minilm(args.model_mcpu, args.batch, args.rounds)
    results["load_average_end"] = os.getloadavg()
    print("load average", results["load_average_start"], "->", results["load_average_end"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
