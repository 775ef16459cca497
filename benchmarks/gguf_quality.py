"""SmolLM2-135M through the gguf backend, measured by llama.cpp itself (docs/gguf.md).

For each ``gguf-*`` preset: qcompile's reference perplexity (the docs/llm.md protocol), then the
exported GGUF run by llama.cpp (llama-cpp-python, one thread) on the same windows; with
``--llamacpp``, llama.cpp's own quantizer (``llama_model_quantize``) on qcompile's F32 export of the
float model, run the same way. Rows are JSON lines in ``--out``.

    PYTHONPATH=. python benchmarks/gguf_quality.py --out out/gguf_quality.json \\
        --recipes gguf-q8_0 gguf-q4_0 gguf-q4_1 --mixes q4_k_m-gptq --llamacpp Q8_0 Q4_0 Q4_1 Q4_K_M

``--recipes`` also takes :func:`qcompile.presets.gguf_recipe` recipes by name (``gguf-q5_0-awq``,
``gguf-q4_0-gptq-a8``: GPTQ's Hessian of llama.cpp's int8 activation blocks).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import torch

import qcompile
from qcompile.backends.gguf import GgufArtifact, read_types
from qcompile.eval.perplexity import PerplexityProtocol, calibration_windows, perplexity, text_tokens
from qcompile.models.smollm2 import load_smollm2
from qcompile.presets import PRESETS, gguf_recipe, llama_cpp_mix


def _algorithm_and_activations(parts):
    return next((p for p in parts if p in ("gptq", "awq")), None), "a8" in parts


def resolve(name: str):
    """A preset name, or a legacy-type recipe of presets.gguf_recipe spelled like one
    (``gguf-q5_0-awq``, ``gguf-q4_0-gptq-a8``: not registered presets)."""
    if name in PRESETS:
        return name
    _, gtype, *rest = name.split("-")
    algo, activations = _algorithm_and_activations(rest)
    return gguf_recipe(gtype.upper(), algo, activations=activations)


def recipes_of(names, mixes, config) -> list:
    """The recipes ``--recipes`` and ``--mixes`` name: presets or gguf_recipe names (:func:`resolve`),
    then llama.cpp's per-layer mixes via presets.llama_cpp_mix (``q4_k_m``, ``q4_k_m-gptq``,
    ``q4_k_m-gptq-a8``: llama.cpp's int8 activations in the reference)."""
    recipes = [resolve(r) for r in names]
    for mix in mixes:
        ftype, *rest = mix.split("-")
        algo, activations = _algorithm_and_activations(rest)
        recipes.append(llama_cpp_mix(config, ftype, algo, activations=activations)[0])
    return recipes


class _Runner(torch.nn.Module):
    """A GGUF artifact called like the model (perplexity() reads parameters() for the size)."""

    def __init__(self, art):
        super().__init__()
        self.art = art

    def forward(self, ids, use_cache=False):
        return self.art(ids)


def linear_bpw(path: Path) -> tuple[float, dict]:
    import gguf

    bits = n = 0
    types: dict = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and not t.name.endswith("norm.weight"):
            bits += int(t.n_bytes) * 8
            n += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return bits / n, types


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", nargs="*", default=["gguf-q8_0", "gguf-q4_0", "gguf-q4_1"])
    ap.add_argument("--mixes", nargs="*", default=[],
                    help="llama.cpp's per-layer mixes via qcompile.presets.llama_cpp_mix: q4_k_m, q4_k_m-gptq, "
                         "q4_k_m-gptq-a8 (activations=True), ...")
    ap.add_argument("--llamacpp", nargs="*", default=[])
    ap.add_argument("--dir", default="out/gguf")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out_dir = Path(args.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm = load_smollm2()
    protocol = PerplexityProtocol()
    tokens = text_tokens(lm.tokenizer, protocol)
    cal = None

    def emit(row):
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    def llama_ppl(path):
        t = time.perf_counter()
        res = perplexity(_Runner(GgufArtifact.load(path)), lm.tokenizer, protocol, tokens=tokens)
        return res.perplexity, time.perf_counter() - t

    recipes = recipes_of(args.recipes, args.mixes, lm.model.config)
    for recipe in recipes:
        if ("gptq" in getattr(recipe, "name", recipe) or "awq" in getattr(recipe, "name", recipe)) and cal is None:
            cal = calibration_windows(lm.tokenizer, n=8)
        t = time.perf_counter()
        q = qcompile.quantize(lm.model, recipe, (tokens[:512].unsqueeze(0),), calibration=cal,
                              example_kwargs={"use_cache": False}, report_samples=1)
        tq = time.perf_counter() - t
        ref = perplexity(q, lm.tokenizer, protocol, tokens=tokens).perplexity
        art = qcompile.lower(q, backend="gguf", config=lm.model.config, tokenizer=lm.tokenizer, tokenizer_pre="smollm")
        recipe = getattr(recipe, "name", recipe)
        path = art.save(out_dir / f"{recipe}.gguf")
        ppl, tl = llama_ppl(path)
        bpw, types = linear_bpw(path)
        emit({"recipe": recipe, "reference_ppl": ref, "llama_cpp_ppl": ppl, "rel_diff": ppl / ref - 1,
              "bpw": bpw, "types": types, "embedding": read_types(path)["token_embd.weight"],
              "mb": path.stat().st_size / 1e6, "quantize_s": tq, "llama_cpp_eval_s": tl})
    if args.llamacpp:
        import llama_cpp

        f32 = out_dir / "float-f32.gguf"
        if not f32.exists():
            q = qcompile.quantize(lm.model, "float", (tokens[:512].unsqueeze(0),), example_kwargs={"use_cache": False},
                                  report_samples=1)
            qcompile.lower(q, backend="gguf", config=lm.model.config, tokenizer=lm.tokenizer,
                           tokenizer_pre="smollm").save(f32)
        for type_name in args.llamacpp:
            dst = out_dir / f"llama.cpp-{type_name}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
            params.nthread = 1
            t = time.perf_counter()
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize({type_name}) returned {rc}")
            tq = time.perf_counter() - t
            ppl, tl = llama_ppl(dst)
            bpw, types = linear_bpw(dst)
            emit({"recipe": f"llama.cpp {type_name} (from qcompile's F32 export)", "llama_cpp_ppl": ppl, "bpw": bpw,
                  "types": types, "embedding": read_types(dst)["token_embd.weight"], "mb": dst.stat().st_size / 1e6,
                  "quantize_s": tq, "llama_cpp_eval_s": tl})


if __name__ == "__main__":
    main()
