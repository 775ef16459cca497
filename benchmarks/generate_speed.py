"""Generation speed of SmolLM2-135M (bundled), one thread, side by side in one process: a 128-token
prompt of held-out docstring text, then 128 greedy tokens (no early stop), through

* qcompile: ``causal_lm(max_context=256)`` quantized with each recipe, run by ``qcompile.generate`` on
  the reference backend, ``lower(q, "onnx", threads=1)`` and ``lower(q, "tvm", threads=1)``;
* PyTorch float ``model.generate`` with its own (dynamic) KV cache;
* llama.cpp (``llama_cpp.Llama``, ``n_threads=1``) on the bundled Q4_1 GGUF: ``eval`` of the
  prompt, then ``sample(temp=0)`` + ``eval`` of one token per step.

Prefill tokens/s = prompt tokens / the first call's seconds; decode tokens/s = the 127 later tokens /
their seconds. Best of ``--repeats`` runs. Also reported: how many of the 128 greedy tokens each
backend shares with the reference backend of the same recipe (first mismatch position).

Run::

    PYTHONPATH=$PWD python benchmarks/generate_speed.py --recipes w4-g64 --out benchmarks/results/generate_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import qcompile

PROMPT, NEW = 128, 128


def _best(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    return max(runs, key=lambda r: r["decode_tok_s"])


def _torch_float(model, ids, repeats):
    model.config.use_cache = True

    def run():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        t2 = time.perf_counter()
        return {"prefill_tok_s": PROMPT / (t1 - t0), "decode_tok_s": (NEW - 1) / ((t2 - t1) - (t1 - t0)),
                "tokens": out[0, PROMPT:].tolist()}
    return _best(run, repeats)


def _llama_cpp(path, ids, repeats):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_threads=1, n_threads_batch=1, n_ctx=PROMPT + NEW + 8, n_batch=PROMPT,
                          verbose=False)

    def run():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[0].tolist())
        token = llm.sample(temp=0.0)
        t1 = time.perf_counter()
        tokens = [token]
        for _ in range(NEW - 1):
            llm.eval([token])
            token = llm.sample(temp=0.0)
            tokens.append(token)
        t2 = time.perf_counter()
        return {"prefill_tok_s": PROMPT / (t1 - t0), "decode_tok_s": (NEW - 1) / (t2 - t1), "tokens": tokens}
    return _best(run, repeats), llama_cpp.__version__


def _qcompile(art, ids, repeats):
    qcompile.generate(art, ids[:, :8], max_new_tokens=4)          # warm-up (first-call set-up)

    def run():
        out, stats = qcompile.generate(art, ids, max_new_tokens=NEW, return_stats=True)
        return {"prefill_tok_s": stats.prefill_tokens_per_s, "decode_tok_s": stats.decode_tokens_per_s,
                "tokens": out[0, PROMPT:].tolist()}
    return _best(run, repeats)


def _agree(a, b) -> dict:
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return {"same_tokens": same, "first_mismatch": first}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["w4-g64"])
    parser.add_argument("--backends", nargs="+", default=["reference", "onnx", "tvm"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    from qcompile.eval.perplexity import PerplexityProtocol, calibration_windows, text_tokens
    from qcompile.models.smollm2 import GGUF_NAME, load_smollm2, model_dir

    lm_bundle = load_smollm2()
    model, tok = lm_bundle.model, lm_bundle.tokenizer
    ids = text_tokens(tok, PerplexityProtocol(window=PROMPT, stride=PROMPT, tokens=PROMPT))[None]
    rows, load = [], os.getloadavg()

    def emit(row):                     # each row as soon as it is measured: a slow TVM build loses nothing
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    base = _torch_float(model, ids, args.repeats)
    emit({"impl": "torch float generate", **base})
    cpp, version = _llama_cpp(model_dir() / GGUF_NAME, ids, args.repeats)
    emit({"impl": f"llama.cpp {version} Q4_1 (bundled)", **cpp})
    for recipe in args.recipes:
        lm = qcompile.causal_lm(model, max_context=PROMPT + NEW, max_batch=2)
        calibration = lm.calibration([w[0][:, :PROMPT] for w in calibration_windows(tok, n=4, length=PROMPT)])
        t0 = time.perf_counter()
        q = qcompile.quantize(lm, recipe, lm.example_inputs, calibration=calibration, **lm.capture_options)
        quantize_s = time.perf_counter() - t0
        reference = None
        for backend in args.backends:
            t0 = time.perf_counter()
            art = q if backend == "reference" else qcompile.lower(q, backend, threads=1)
            lower_s = time.perf_counter() - t0
            row = _qcompile(art, ids, args.repeats)
            reference = reference or row["tokens"]
            emit({"impl": f"qcompile {recipe} {backend}", **row, "quantize_s": quantize_s, "lower_s": lower_s,
                  "vs_reference": _agree(reference, row["tokens"]), "vs_torch_float": _agree(base["tokens"], row["tokens"])})
    print(f"\nhost: {platform.processor() or platform.machine()}, load average {load} -> {os.getloadavg()}, one thread")
    print(f"{'impl':42} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode vs llama.cpp':>20}")
    for r in rows:
        print(f"{r['impl']:42} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} "
              f"{r['decode_tok_s'] / cpp['decode_tok_s']:19.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"load_before": load, "load_after": os.getloadavg(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
