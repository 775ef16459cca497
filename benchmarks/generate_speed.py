"""Generation speed of SmolLM2-135M (bundled), side by side in one process, at 1 and 2 threads: a
128-token prompt of held-out docstring text, then 128 greedy tokens (no early stop), through

* qcompile: ``causal_lm(max_context=256)`` quantized with each recipe, run by ``qcompile.generate``
  on ``lower(q, "onnx", nbits_accuracy_level=...)`` (onnxruntime IOBinding decode loop),
  ``lower(q, "tvm")`` (one thread: its thread count is fixed when it is built) and, when asked, the
  reference backend;
* PyTorch float ``model.generate`` with its own (dynamic) KV cache;
* llama.cpp (``llama_cpp.Llama``) on GGUF files of the same model: the bundled Q4_1, and Q4_0,
  Q4_K_M and Q8_0 made by llama.cpp's own quantizer (``llama_model_quantize``, ``allow_requantize``)
  from the bundled Q4_1 file (the only GGUF that ships; its weights are the model's): ``eval`` of the
  prompt, then ``sample(temp=0)`` + ``eval`` of one token per step.

Prefill tokens/s = prompt tokens / the first call's seconds; decode tokens/s = the 127 later tokens /
their seconds. Best of ``--repeats`` runs (by decode). Each row records the load average before and
after it (the host is shared: read ratios between rows measured close together). Also reported: how
many of the 128 greedy tokens each row shares with the torch float model and with the first qcompile
row of the same recipe.

Quantizing and exporting SmolLM2 takes minutes (tens under load); ``--artifacts DIR`` keeps what was
built (``<recipe>.qc``, ``<recipe>-l<level>.onnx``, ``<recipe>.tvm``, the GGUF files) and reuses it.

Run::

    PYTHONPATH=$PWD python benchmarks/generate_speed.py --recipes w4-g128-a8 w8-g64-a8 --threads 1 2 \\
        --artifacts /tmp/gen-artifacts --out benchmarks/results/generate_speed.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import qcompile

PROMPT, NEW = 128, 128
GGUF_TYPES = ("Q4_0", "Q4_K_M", "Q8_0")


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


def _llama_cpp(path, ids, repeats, threads):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=PROMPT + NEW + 8,
                          n_batch=PROMPT, verbose=False)

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
    return _best(run, repeats)


def gguf_files(out_dir: Path) -> dict:
    """{type: path}: the bundled Q4_1 file, and Q4_0 / Q4_K_M / Q8_0 written by llama.cpp's quantizer
    into ``out_dir`` (kept: made once)."""
    import llama_cpp
    from qcompile.models.smollm2 import GGUF_NAME, model_dir

    src = model_dir() / GGUF_NAME
    files = {"Q4_1 (bundled)": src}
    for name in GGUF_TYPES:
        dst = out_dir / GGUF_NAME.replace("Q4_1", name)
        if not dst.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            params.allow_requantize = True
            if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
                raise RuntimeError(f"llama_model_quantize to {name} failed")
        files[name] = dst
    return files


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


def _quantized(model, tok, recipe: str, store: Path, attn=None):
    from qcompile.eval.perplexity import calibration_windows

    saved = store / f"{recipe}.qc"
    if saved.exists():
        return qcompile.load(saved), None
    lm = qcompile.causal_lm(model, max_context=PROMPT + NEW, max_batch=2, attn_implementation=attn)
    calibration = lm.calibration([w[0][:, :PROMPT] for w in calibration_windows(tok, n=4, length=PROMPT)])
    t0 = time.perf_counter()
    q = qcompile.quantize(lm, recipe, lm.example_inputs, calibration=calibration, **lm.capture_options)
    seconds = time.perf_counter() - t0
    q.save(saved)
    return q, seconds


def _onnx(q, recipe: str, level: int, threads: int, store: Path):
    """(artifact, lowering seconds or None when the file was reused)."""
    from qcompile.backends.onnx import OnnxArtifact

    path = store / f"{recipe}-l{level}.onnx"
    seconds = None
    if not path.exists():
        t0 = time.perf_counter()
        art = qcompile.lower(q, "onnx", threads=threads, nbits_accuracy_level=level)
        seconds = time.perf_counter() - t0
        path.write_bytes(art.model_bytes)
        return art, seconds
    import onnx

    data = path.read_bytes()
    names = [i.name for i in onnx.load_from_string(data).graph.input]
    return OnnxArtifact(data, names, q, threads), seconds


def _tvm(q, recipe: str, store: Path):
    from qcompile.backends.tvm.runtime import load

    path = store / f"{recipe}.tvm"
    if path.exists():
        return load(path), None
    t0 = time.perf_counter()
    art = qcompile.lower(q, "tvm", threads=1)
    seconds = time.perf_counter() - t0
    art.save(path)
    return art, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=["w4-g128-a8", "w8-g64-a8"])
    parser.add_argument("--backends", nargs="+", default=["onnx", "tvm"], help="onnx, tvm, reference")
    parser.add_argument("--onnx-level", type=int, default=4, help="MatMulNBits accuracy level of the onnx rows")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--gguf", nargs="*", default=None, help="llama.cpp types (default: all)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--artifacts", default="/tmp/qcompile-generate-speed")
    parser.add_argument("--out", default=None, help="a .jsonl file: one row per line")
    parser.add_argument("--attn", default=None, help="causal_lm's attn_implementation (e.g. qcompile_grouped); "
                        "use its own --artifacts directory: saved artifacts are keyed by recipe only")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    from qcompile.eval.perplexity import PerplexityProtocol, text_tokens
    from qcompile.models.smollm2 import load_smollm2

    store = Path(args.artifacts)
    store.mkdir(parents=True, exist_ok=True)
    lm_bundle = load_smollm2()
    model, tok = lm_bundle.model, lm_bundle.tokenizer
    ids = text_tokens(tok, PerplexityProtocol(window=PROMPT, stride=PROMPT, tokens=PROMPT))[None]
    ggufs = gguf_files(store)
    wanted = list(ggufs) if args.gguf is None else [k for k in ggufs if k.split()[0] in args.gguf]
    quantized = {r: _quantized(model, tok, r, store, args.attn) for r in args.recipes}
    rows = []
    out = open(args.out, "a") if args.out else None
    host = f"{platform.machine()} {os.cpu_count()} cpus"

    def emit(row, load_before):
        row = {**row, "load_before": load_before, "load_after": os.getloadavg(), "host": host,
               "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    for threads in args.threads:
        torch.set_num_threads(threads)
        base = None
        if not args.no_torch:
            load = os.getloadavg()
            base = _torch_float(model, ids, args.repeats)
            emit({"impl": "torch float generate", "threads": threads, **base}, load)
        import llama_cpp

        for kind in wanted:
            load = os.getloadavg()
            row = _llama_cpp(ggufs[kind], ids, args.repeats, threads)
            emit({"impl": f"llama.cpp {llama_cpp.__version__} {kind}", "threads": threads, **row,
                  **({"vs_torch_float": _agree(base["tokens"], row["tokens"])} if base else {})}, load)
        for recipe in args.recipes:
            q, quantize_s = quantized[recipe]
            first = None
            for backend in args.backends:
                if backend == "tvm" and threads != 1:
                    continue     # a TVM artifact's thread count is fixed when it is built
                load = os.getloadavg()
                if backend == "onnx":
                    art, lower_s = _onnx(q, recipe, args.onnx_level, threads, store)
                    name = f"qcompile {recipe} onnx (MatMulNBits accuracy level {args.onnx_level} where int8)"
                elif backend == "tvm":
                    art, lower_s = _tvm(q, recipe, store)
                    name = f"qcompile {recipe} tvm"
                else:
                    art, lower_s, name = q, 0.0, f"qcompile {recipe} reference"
                row = _qcompile(art, ids, args.repeats)
                first = first or row["tokens"]
                emit({"impl": name, "threads": threads, **row, "quantize_s": quantize_s, "lower_s": lower_s,
                      "vs_first_qcompile_row": _agree(first, row["tokens"]),
                      **({"vs_torch_float": _agree(base["tokens"], row["tokens"])} if base else {})}, load)
    print(f"\nhost: {platform.processor() or platform.machine()}")
    print(f"{'impl':70} {'thr':>3} {'prefill tok/s':>14} {'decode tok/s':>13} {'load':>10}")
    for r in rows:
        print(f"{r['impl']:70} {r['threads']:3d} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} "
              f"{r['load_before'][0]:5.1f}-{r['load_after'][0]:.1f}")
    if out:
        out.close()


if __name__ == "__main__":
    main()
