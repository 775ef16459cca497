"""What the online Hadamard of ``recipe.rotation.online`` (R4, :mod:`qcompile.passes.rotate_inner`)
costs in latency, side by side in one process, one thread, on the reference backend (the torch
graph itself):

* the whole SmolLM2-135M float graph on one 512-token window, rotated R1 + R2 (no inserted op)
  against R1 + R2 + R4 (30 online Hadamards of size 1536);
* one ``down_proj`` (512 × 1536 → 576) alone, plain, with the factored online Hadamard
  ``((X B)ᵀ A)ᵀ`` (A: 48 × 48, B: 32 × 32) in front, and with a dense 1536 × 1536 matmul in front.

    PYTHONPATH=. python benchmarks/online_hadamard_latency.py [--repeats 20]

Medians of ``--repeats`` runs after two warm-ups, milliseconds (the ``down_proj`` variants timed in
alternation)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from qcompile.capture import capture
from qcompile.passes import NormalizeLinearPass, OnlineHadamardPass, RotateHeadsPass, RotateResidualPass
from qcompile.passes.hadamard import hadamard_factors, orthogonal_hadamard
from qcompile.recipe import RotationConfig


def median_ms(fn, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median milliseconds of each function, timed in alternation (a shared host's load drifts)."""
    times = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(2):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def rotated_graph(model, ids):
    """SmolLM2's captured graph rotated R1 + R2 (only folded weights, no inserted op)."""
    gm = capture(model, (ids,), {"use_cache": False}).graph_module
    NormalizeLinearPass()(gm)
    RotateResidualPass(RotationConfig())(gm)
    RotateHeadsPass()(gm)
    gm.recompile()
    return gm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-model", action="store_true", help="only the down_proj micro-benchmark (no SmolLM2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.no_model:
        model_level(args.repeats)
    down_proj_level(args.repeats)


def model_level(repeats: int):
    from qcompile.eval.perplexity import calibration_windows
    from qcompile.models.smollm2 import load_smollm2
    smol = load_smollm2()
    model = smol.model.eval()
    (ids,) = calibration_windows(smol.tokenizer, n=1, length=512)[0]
    # one graph, timed before and after R4 is added (memory: the host is shared)
    gm = rotated_graph(model, ids)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    times = {}
    for name in ("R1+R2", "R1+R2+R4"):
        if name == "R1+R2+R4":
            OnlineHadamardPass()(gm)
            gm.recompile()
        with torch.no_grad():
            out = gm(ids, use_cache=False).logits
        print(f"{name}: max |logits - float| / max |float| = {float((out - ref).abs().max() / ref.abs().max()):.2e}")
        times[name] = median_ms(lambda: gm(ids, use_cache=False), repeats)
    t_without, t_with = times["R1+R2"], times["R1+R2+R4"]
    print(f"SmolLM2 float graph, 512 tokens: R1+R2 {t_without:.1f} ms, R1+R2+R4 {t_with:.1f} ms "
          f"({t_with / t_without:.3f}x)")


def down_proj_level(repeats: int):
    x = torch.randn(512, 1536)
    w = torch.randn(576, 1536) / 40
    a, b = hadamard_factors(1536)[:2]
    a, b, dense = a.float(), b.float(), orthogonal_hadamard(1536).float()

    def factored():
        y = torch.matmul(x.unflatten(1, (a.shape[0], b.shape[0])), b).transpose(1, 2)
        return torch.nn.functional.linear(torch.matmul(y, a).transpose(1, 2).flatten(1, 2), w)

    t = interleaved_ms({"plain": lambda: torch.nn.functional.linear(x, w), "factored": factored,
                        "dense": lambda: torch.nn.functional.linear(x @ dense, w)}, repeats)
    print(f"down_proj 512x1536->576: plain {t['plain']:.2f} ms, + factored Hadamard {t['factored']:.2f} ms "
          f"({t['factored'] / t['plain']:.2f}x), + dense 1536x1536 {t['dense']:.2f} ms ({t['dense'] / t['plain']:.2f}x)")


if __name__ == "__main__":
    main()
