"""SmolLM2-135M exported to GGUF: llama.cpp's logits and greedy text against qcompile's reference
(issue 21's "logits on 4 prompts within a stated tolerance; greedy text agrees for 32 tokens").

For each recipe (a ``gguf-*`` preset, or a llama.cpp mix via ``--mixes`` as in gguf_quality.py):
quantize (RTN presets need no calibration; ``-gptq`` ones take 8 windows), lower to gguf, save, then
on 4 prompts compare llama.cpp's logits (llama-cpp-python, one thread) with the reference backend's:
max |diff| over positions and vocabulary relative to the largest per-position logit span (the tests'
``LOGIT_TOL`` measure), the mean |diff|, and how often the argmax agrees; then generate 32 tokens
greedily from each prompt in both (llama.cpp: argmax of its logits, token by token with its KV
cache; the reference: argmax of the full-sequence forward) and count the tokens before the first
disagreement, with the reference's margin between its top two logits there and llama.cpp against
itself there (:func:`runtime_spread`: its choice with flash attention and with an f32 KV cache).
Rows are JSON lines.

    PYTHONPATH=. python benchmarks/gguf_parity.py --out out/gguf_parity.json \\
        --recipes gguf-q8_0 gguf-q4_0 --mixes q4_k_m q4_k_m-a8
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import qcompile
from qcompile.eval.perplexity import PerplexityProtocol, calibration_windows, text_tokens
from qcompile.models.smollm2 import load_smollm2
from gguf_quality import recipes_of   # presets, presets.gguf_recipe names (gguf-q4_0-a8, gguf-q5_0-awq), mixes

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.",
           "Photosynthesis is the process by which", "Here is a list of three fruits: apple,"]
NEW_TOKENS = 32


def _logits(q, ids):
    with torch.no_grad():
        out = q(ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out).float()[0]


def compare_logits(q, art, ids) -> dict:
    ref, got = _logits(q, ids), art(ids)[0]
    span = (ref.amax(-1) - ref.amin(-1)).max().item()
    diff = (got - ref).abs()
    return {"tokens": ids.shape[1], "max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "span": span,
            "max_rel_span": diff.max().item() / span, "argmax_agree": (ref.argmax(-1) == got.argmax(-1)).float().mean().item()}


def greedy(q, art, ids) -> dict:
    llm = art.llama()
    llm.reset()
    prompt = ids[0].tolist()
    llm.eval(prompt)
    theirs = []
    for _ in range(NEW_TOKENS):   # llama.cpp: argmax of the last position, then one more token through its KV cache
        tok = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
        theirs.append(tok)
        llm.eval([tok])
    ours, seq = [], list(prompt)
    for _ in range(NEW_TOKENS):   # the reference: the whole sequence each step (no cache)
        tok = int(_logits(q, torch.tensor([seq]))[-1].argmax())
        ours.append(tok)
        seq.append(tok)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), NEW_TOKENS)
    row = {"agree_tokens": agree, "reference": ours, "llama_cpp": theirs}
    if agree < NEW_TOKENS:   # how close the reference's own choice was where they part
        context = prompt + ours[:agree]
        last = _logits(q, torch.tensor([context]))[-1]
        top2 = last.topk(2).values
        row["margin_at_divergence"] = (top2[0] - top2[1]).item()
        row["gap_to_llama_cpp_choice"] = (last.max() - last[theirs[agree]]).item()
        row.update(runtime_spread(art, context, ours[agree], theirs[agree]))
    return row


def runtime_spread(art, context, ours, theirs) -> dict:
    """llama.cpp against itself where the two part: its margin between its choice and the
    reference's there, and what it picks with flash attention (its other CPU attention kernel: f16
    Q·K and f16 accumulation of the values) and with an f32 KV cache. A divergence the runtime's
    own kernels do not agree on is a tie at llama.cpp's precision."""
    out = {}
    for what, kwargs in (("default", {}), ("flash_attn", {"flash_attn": True}), ("kv_f32", {"type_k": 0, "type_v": 0})):
        llm = art.llama(**kwargs) if kwargs else art.llama()
        llm.reset()
        llm.eval(context)
        s = torch.tensor(llm.scores[llm.n_tokens - 1])
        out[f"llama_cpp_{what}_choice"] = int(s.argmax())
        out[f"llama_cpp_{what}_margin_vs_reference_choice"] = (s[theirs] - s[ours]).item()
    art._llama = None   # the next prompt starts from the default settings
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", nargs="*", default=["gguf-q8_0", "gguf-q4_0"])
    ap.add_argument("--mixes", nargs="*", default=["q4_k_m"])
    ap.add_argument("--dir", default="out/gguf_parity")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out_dir = Path(args.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm = load_smollm2()
    tokens = text_tokens(lm.tokenizer, PerplexityProtocol())
    recipes = recipes_of(args.recipes, args.mixes, lm.model.config)
    cal = None
    for recipe in recipes:
        name = getattr(recipe, "name", recipe)
        if ("gptq" in name or "awq" in name) and cal is None:
            cal = calibration_windows(lm.tokenizer, n=8)
        t = time.perf_counter()
        q = qcompile.quantize(lm.model, recipe, (tokens[:512].unsqueeze(0),), calibration=cal,
                              example_kwargs={"use_cache": False}, report_samples=1)
        art = qcompile.lower(q, backend="gguf", config=lm.model.config, tokenizer=lm.tokenizer, tokenizer_pre="smollm")
        art.save(out_dir / f"{name}.gguf")
        tq = time.perf_counter() - t
        for text in PROMPTS:
            ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
            row = {"recipe": name, "prompt": text, **compare_logits(q, art, ids), **greedy(q, art, ids),
                   "quantize_s": tq}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
