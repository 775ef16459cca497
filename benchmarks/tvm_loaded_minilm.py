"""MiniLM w8a8 quantized once, saved, loaded back and lowered to tvm, side by side with lowering the
model quantize() returned, in one process, one thread: the time each lowering takes, whether the
two libraries give the same outputs (on real text at each batch, plus a padded batch of another
shape), their input bounds, and their call times (medians, called in alternation: test_tvm_minilm's
``_interleaved``). Run::

    TVM_NUM_THREADS=1 python benchmarks/tvm_loaded_minilm.py [--batch 1 32] [--rounds 30 5] [--out FILE.json]
"""
import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, nargs="+", default=[30, 5])
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from test_minilm import _calibration_batches, _fixed_inputs, _quantize
    from test_tvm_minilm import _interleaved

    import qcompile
    from qcompile.models import load_minilm
    from qcompile.report import cosine

    results = {"load_average": os.getloadavg()}
    minilm = load_minilm()
    qmodel = _quantize(minilm, _calibration_batches(minilm))
    with tempfile.TemporaryDirectory(prefix="qcompile-loaded-") as tmp:
        loaded = qcompile.load(qmodel.save(f"{tmp}/minilm-w8a8"))
        record = json.loads(open(f"{tmp}/minilm-w8a8/qcompile.json").read())["example"]
    arts, lower_s = {}, {}
    for name, model in (("original", qmodel), ("loaded", loaded)):
        t0 = time.perf_counter()
        arts[name] = qcompile.lower(model, backend="tvm")
        lower_s[name] = time.perf_counter() - t0
    results.update(record=record, lower_seconds=lower_s,
                   same_input_bounds=arts["original"].meta["input_bounds"] == arts["loaded"].meta["input_bounds"],
                   input_bounds=arts["loaded"].meta["input_bounds"], batches={})
    print(f"lowering: original {lower_s['original']:.1f} s, loaded {lower_s['loaded']:.1f} s; input bounds "
          f"{'the same' if results['same_input_bounds'] else 'DIFFER'}: {results['input_bounds']}")
    padded = minilm.encode_batch(["A short one.", "Two sentences of text here. And a second one, longer."] * 3)
    with torch.inference_mode():
        a, b = arts["original"](*padded), arts["loaded"](*padded)
        results["padded_shape"], results["padded_identical"] = list(padded[0].shape), bool(torch.equal(a, b))
        print(f"padded batch {list(padded[0].shape)}: outputs identical {results['padded_identical']}")
    for batch, rounds in zip(args.batch, args.rounds + args.rounds[-1:] * len(args.batch)):
        ids, mask = _fixed_inputs(minilm, batch)
        with torch.inference_mode():
            ref = qmodel(ids, mask)
            outs = {k: art(ids, mask) for k, art in arts.items()}   # also the warm-up
        # _interleaved reports each model's ratio to the one keyed "tvm": here the loaded model's library
        timing = _interleaved({"tvm": arts["loaded"], "original": arts["original"]}, ids, mask, rounds)
        res = {"original_ms": timing["original_ms"], "loaded_ms": timing["tvm_ms"],
               "original_over_loaded": timing["ratio_vs_original"],
               "identical": bool(torch.equal(outs["original"], outs["loaded"])),
               "cosine_vs_reference": {k: cosine(ref, o) for k, o in outs.items()}}
        results["batches"][batch] = res
        print(f"batch {batch} x 128: original {res['original_ms']:.2f} ms, loaded {res['loaded_ms']:.2f} ms "
              f"(original/loaded {res['original_over_loaded']:.3f}); outputs identical {res['identical']}; "
              f"cosine vs reference {res['cosine_vs_reference']}")
    results["load_average_end"] = os.getloadavg()
    print("load average", results["load_average"], "→", results["load_average_end"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
