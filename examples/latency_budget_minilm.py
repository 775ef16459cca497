"""Latency budgets measured on onnxruntime, MiniLM at batch 1 and 32, sequence 128 (issue 9).

For each batch size: the float and all-``w8a8`` models are lowered and timed end to end (one
thread), then ``Recipe.auto(["float", "w8a8", "w8", "w4-g64", "w4-g128"], budget={"latency_ms": b,
"backend": "onnx"})`` runs for three budgets between them. Each row: the budget, the predicted and
the measured latency of the chosen recipe, whether it met the budget, the layers per candidate and
the mean cosine vs the float model on 64 held-out docstring sentences. Rows are appended to
``--out`` (JSON lines) as they finish.

Run::

    python examples/latency_budget_minilm.py --out latency_minilm.jsonl   # ~15-25 min on a shared core
"""
import argparse
import dataclasses
import json
import time

import torch

import qcompile
from qcompile.backends.onnx import timing
from qcompile.eval import docstring_sentences
from qcompile.models import load_minilm

SEQUENCE = 128
CANDIDATES = ["float", "w8a8", "w8", "w4-g64", "w4-g128"]


def _quiet(name):
    return dataclasses.replace(qcompile.Recipe.preset(name), calibration=qcompile.CalibrationConfig(progress=False))


def _fixed_inputs(m, batch):
    """``batch`` rows of exactly 128 real tokens (held-out docstrings joined until long enough)."""
    texts, current = [], []
    for s in docstring_sentences("evaluation"):
        current.append(s)
        if len(m.tokenizer.encode(" ".join(current)).ids) >= SEQUENCE:
            texts.append(" ".join(current))
            current = []
            if len(texts) == batch:
                break
    ids, mask = m.encode_batch(texts, max_length=SEQUENCE)
    assert ids.shape == (batch, SEQUENCE) and bool(mask.all())
    return ids, mask


def _cosine(m, qmodel, batches):
    with torch.no_grad():
        return float(torch.cat([torch.nn.functional.cosine_similarity(m.model(*b), qmodel(*b), dim=-1)
                                for b in batches]).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="latency_minilm.jsonl")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--clock", default="cpu", choices=["wall", "cpu"])
    ap.add_argument("--fractions", default="0.75,0.45,0.15", help="budgets between all-w8a8 (0) and float (1)")
    ap.add_argument("--ends", default=None, help="w8a8,float ms already measured (skips the uniform rows)")
    ap.add_argument("--calibration-batch", type=int, default=None, help="default: the timed batch size")
    args = ap.parse_args()
    torch.set_num_threads(1)
    m = load_minilm()
    cal = docstring_sentences("calibration", limit=128)
    held = docstring_sentences("evaluation", limit=64)
    for batch in [int(b) for b in args.batches.split(",")]:
        # the search times the model on its example inputs; a batch-1 capture is specialised to
        # batch 1, so calibration batches then hold one sentence (any size > 1 works for batch > 1)
        cb = args.calibration_batch or batch
        calibration = [m.encode_batch(cal[i:i + cb]) for i in range(0, min(len(cal), 64 * cb), cb)]
        samples = 8 if batch < 16 else 4
        evaluation = [m.encode_batch(held[i:i + batch]) for i in range(0, len(held), batch)]
        example = _fixed_inputs(m, batch)
        ends = {}
        if args.ends:
            lo, hi = (float(x) for x in args.ends.split(","))
            ends = {"w8a8": {args.clock: lo}, "float": {args.clock: hi}}
        for name in ("float", "w8a8") if not ends else ():
            q = qcompile.quantize(m.model, _quiet(name), example, calibration=calibration, backend="onnx")
            ends[name] = timing.time_artifact(timing.lower(q, "onnxruntime"), example, {}, 10)
            row = {"batch": batch, "uniform": name, "measured_ms": ends[name], "cosine": _cosine(m, q, evaluation)}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        lo, hi = ends["w8a8"][args.clock], ends["float"][args.clock]
        for frac in [float(x) for x in args.fractions.split(",")]:
            budget = round(lo + frac * (hi - lo), 2 if hi < 100 else 0)
            t0 = time.perf_counter()
            runs = 10 if batch < 16 else 5  # end-to-end timing runs: a batch-32 run takes ~1 s of CPU
            auto = qcompile.Recipe.auto(CANDIDATES, {"latency_ms": budget, "backend": "onnx", "clock": args.clock,
                                                     "runs": runs}, max_samples=samples)
            q = qcompile.quantize(m.model, auto, example, calibration=calibration)
            mp = q.report.mixed_precision
            lat = mp["latency"]
            row = {"batch": batch, "budget_ms": budget, "clock": args.clock, "predicted_ms": lat["predicted_ms"],
                   "measured_ms": lat["measured_ms"], "met": lat["met"],
                   "attempts": [{k: a[k] for k in ("limit_ms", "predicted_ms", "measured_ms_both_clocks", "met",
                                                   "layers_per_candidate")} for a in lat["attempts"]],
                   "layers_per_candidate": {c: list(mp["choice"].values()).count(c) for c in CANDIDATES},
                   "float_ms": lat["float_ms"], "layer_table": lat["layer_table"], "cosine": _cosine(m, q, evaluation),
                   "search_s": time.perf_counter() - t0}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
