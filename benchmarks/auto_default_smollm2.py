"""Issue 25's "a search a user can afford by default": ``Recipe.auto`` with its defaults on SmolLM2,
called exactly as a new user would, timed with its peak memory, and scored against uniform
``w4-g64`` on the perplexity protocol of docs/llm.md::

    PYTHONPATH=. python benchmarks/auto_default_smollm2.py --out benchmarks/results/auto_default_smollm2.json

Targets (issue 25): quantize with the auto recipe and 32 calibration windows in <= 10 minutes and
<= 4 GB peak RSS on 2 cores, and a lower perplexity than uniform int4 g64. One thread.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB


def main(argv=None) -> None:
    import qcompile
    from qcompile.eval.perplexity import PerplexityProtocol, calibration_windows, perplexity
    from qcompile.models.smollm2 import load_smollm2

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results/auto_default_smollm2.json")
    p.add_argument("--windows", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    protocol = PerplexityProtocol()
    lm = load_smollm2()
    cal = calibration_windows(lm.tokenizer, n=args.windows, length=protocol.window)
    rss_loaded = peak_rss_gb()
    rows = {"windows": args.windows, "torch": torch.__version__, "rss_after_load_gb": rss_loaded}
    auto = qcompile.Recipe.auto(candidates=["w8", "w4-g64", "w3-g64", "w2-g64"], budget={"bits_per_weight": 4.5})
    t = time.perf_counter()
    q = qcompile.quantize(lm.model, auto, cal[0], calibration=cal, example_kwargs={"use_cache": False},
                          report_samples=1)
    rows["auto"] = {"quantize_s": time.perf_counter() - t, "peak_rss_gb": peak_rss_gb(),
                    "cost": q.report.mixed_precision["cost"],
                    "bits_per_weight": q.report.mixed_precision["bits_per_weight"],
                    "ppl": perplexity(q, lm.tokenizer, protocol).perplexity}
    print(json.dumps(rows), flush=True)
    del q
    t = time.perf_counter()
    u = qcompile.quantize(lm.model, "w4-g64", cal[0], calibration=cal, example_kwargs={"use_cache": False},
                          report_samples=1)
    rows["w4-g64"] = {"quantize_s": time.perf_counter() - t, "ppl": perplexity(u, lm.tokenizer, protocol).perplexity}
    rows["float_ppl"] = perplexity(lm.model, lm.tokenizer, protocol).perplexity
    print(json.dumps(rows), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
