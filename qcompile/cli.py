"""The ``qcompile`` command.

    qcompile quantize --model minilm --recipe w8a8 --out out/minilm-w8a8
    qcompile quantize --model minilm --recipe w8a8 --backend onnx --out out/minilm-w8a8   # + model.onnx
    qcompile recipes
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _minilm_job(recipe: str, calibration_sentences: int, eval_sentences: int, eval_pairs: int, batch: int,
                backend: str = None):
    """Quantize the bundled all-MiniLM-L6-v2 on standard-library docstrings and measure it on
    held-out modules (cosine vs float, neighbour agreement, retrieval recall@1)."""
    import torch

    import qcompile
    from qcompile.eval import docstring_pairs, docstring_sentences, embedding_quality
    from qcompile.models import load_minilm

    m = load_minilm()
    cal = docstring_sentences("calibration", limit=calibration_sentences)
    batches = [m.encode_batch(cal[i:i + batch]) for i in range(0, len(cal), batch)]
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


JOBS = {"minilm": _minilm_job}


def _quantize(args) -> int:
    if args.model not in JOBS:
        from .errors import closest

        print(f"qcompile: unknown bundled model '{args.model}'; {closest(args.model, JOBS)}", file=sys.stderr)
        return 2
    qmodel, elapsed, batches = JOBS[args.model](args.recipe, args.calibration_sentences, args.eval_sentences,
                                                args.eval_pairs, args.batch_size, args.backend)
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
        qmodel.save(out)
        (out / "report.json").write_text(qmodel.report.to_json())
        print(f"saved to {out}/ (load with qcompile.load('{out}'))")
        if artifact is not None:
            print(f"{args.backend} artifact: {artifact.save(out / f'model.{args.backend}')}")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qcompile", description="Quantization compiler for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a bundled model and print the report")
    q.add_argument("--model", default="minilm", help="bundled model (minilm)")
    q.add_argument("--recipe", default="w8a8", help="preset name or YAML/JSON recipe file")
    q.add_argument("--out", default=None, help="directory to save the quantized model and report.json")
    q.add_argument("--backend", default=None, help="place Q/DQ for this backend, lower to it, check parity and "
                                                  "save its artifact next to the model (e.g. onnx)")
    q.add_argument("--calibration-sentences", type=int, default=512)
    q.add_argument("--eval-sentences", type=int, default=600)
    q.add_argument("--eval-pairs", type=int, default=300)
    q.add_argument("--batch-size", type=int, default=16)
    q.set_defaults(func=_quantize)
    r = sub.add_parser("recipes", help="list the preset recipes")
    r.set_defaults(func=_recipes)
    args = parser.parse_args(argv)
    from .errors import QCompileError

    try:
        return args.func(args)
    except QCompileError as e:
        print(f"qcompile: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
