"""QAT on the bundled real model: all-MiniLM-L6-v2 at ``w4a8``, trained by distillation against the
float model's sentence embeddings on calibration text (standard-library docstrings), measured on
held-out modules' text: PTQ vs QAT embedding cosine to float.

The objective is what a user would run: ``1 - cos(student(x), teacher(x))`` on unlabeled text,
with Adam; the token-embedding table (int8 weight-only in the recipe) is not trained. Dropout is
off while training (``qat.train(dropout=False)``: the teacher's target has no noise); the LSQ
log-scales may take their own learning rate (``--scale-lr``). After each epoch the held-out
quality is measured and, with ``--log-json``, written out, so a cut-off run still gives numbers.

Run (docs/qat.md has the measured table)::

    PYTHONPATH=. python examples/qat_minilm.py --scale-lr 1e-3 --log-json qat_minilm.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import torch.nn.functional as F

import qcompile
from qcompile.eval import docstring_pairs, docstring_sentences, embedding_quality
from qcompile.models import load_minilm
from qcompile.recipe import QATConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="w4a8")
    ap.add_argument("--train-sentences", type=int, default=512)
    ap.add_argument("--eval-sentences", type=int, default=400)
    ap.add_argument("--eval-pairs", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-5, help="weights (and everything but the LSQ scales)")
    ap.add_argument("--scale-lr", type=float, default=None,
                    help="the LSQ log-scales' own learning rate (default: --lr); they are log(s), so lr is "
                         "about the relative change of a scale per Adam step")
    ap.add_argument("--dropout", action="store_true",
                    help="keep BERT's dropout live while training (default: off, the target is deterministic)")
    ap.add_argument("--log-json", default=None,
                    help="write the PTQ baseline, per-epoch eval and the final table here, after every epoch")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = load_minilm()
    teacher = m.model.eval()
    train_text = docstring_sentences("calibration", limit=args.train_sentences)
    batches = [m.encode_batch(train_text[i:i + args.batch]) for i in range(0, len(train_text), args.batch)]
    calib = batches[: max(1, 256 // args.batch)]
    eval_text = docstring_sentences("evaluation", limit=args.eval_sentences)
    eval_pairs = docstring_pairs("evaluation", limit=args.eval_pairs)

    cache: dict = {}

    def float_encode(texts):  # the float side is the same for PTQ and QAT: compute it once
        key = tuple(texts)
        if key not in cache:
            cache[key] = teacher(*m.encode_batch(texts))
        return cache[key]

    def quality(model):
        with torch.no_grad():
            return embedding_quality(float_encode, lambda t: model(*m.encode_batch(t)), eval_text, eval_pairs)

    recipe = dataclasses.replace(qcompile.Recipe.preset(args.preset), calibration=qcompile.CalibrationConfig(progress=False))
    t0 = time.perf_counter()
    ptq = qcompile.quantize(teacher, recipe, batches[0], calibration=calib)
    q_ptq = quality(ptq)
    print(f"PTQ {args.preset}: mean cosine {q_ptq['mean_cosine']:.5f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    log = {"args": vars(args), "ptq": q_ptq, "epochs": [], "losses": []}

    def write_log():
        if args.log_json:
            with open(args.log_json, "w") as f:
                json.dump(log, f, indent=1, default=float)

    qat_recipe = dataclasses.replace(recipe, qat=QATConfig(learn_scale=True, observer_steps=0))
    t1 = time.perf_counter()
    qat = qcompile.prepare_qat(teacher, qat_recipe, batches[0], calibration=calib)
    for name, p in qat.named_parameters():
        if "embeddings" in name and "LayerNorm" not in name:
            p.requires_grad_(False)
    named = [(n, p) for n, p in qat.named_parameters() if p.requires_grad]
    scales = [p for n, p in named if n.endswith("log_scale")]
    groups = [{"params": [p for n, p in named if not n.endswith("log_scale")]}]
    if scales:
        groups.append({"params": scales, "lr": args.scale_lr or args.lr})
    opt = torch.optim.Adam(groups, lr=args.lr)
    steps = args.epochs * len(batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.no_grad():
        targets = [teacher(*b) for b in batches]
    qat.train(dropout=args.dropout)
    gen = torch.Generator().manual_seed(0)
    step = 0
    for epoch in range(args.epochs):
        for i in torch.randperm(len(batches), generator=gen).tolist():
            out = qat(*batches[i])
            loss = (1 - F.cosine_similarity(out, targets[i], dim=-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            log["losses"].append(loss.item())
            if step % 16 == 0:
                print(f"step {step}/{steps} loss {loss.item():.5f} ({time.perf_counter() - t1:.0f} s)", flush=True)
        # per-epoch check on the held-out text with the fake-quant model in eval mode (no convert)
        q = quality(qat.eval())
        qat.train(dropout=args.dropout)
        closed_e = (q["mean_cosine"] - q_ptq["mean_cosine"]) / (1 - q_ptq["mean_cosine"])
        log["epochs"].append({"epoch": epoch + 1, "step": step, "wall_s": time.perf_counter() - t1,
                              "gap_closed": closed_e, **q})
        write_log()
        print(f"epoch {epoch + 1}: fake-quant mean cosine {q['mean_cosine']:.5f}, {100 * closed_e:.1f} % of the "
              f"gap ({time.perf_counter() - t1:.0f} s)", flush=True)
    qm = qcompile.convert(qat.eval(), report_inputs=calib[:2])
    q_qat = quality(qm)
    gap_ptq = 1 - q_ptq["mean_cosine"]
    closed = (q_qat["mean_cosine"] - q_ptq["mean_cosine"]) / gap_ptq if gap_ptq > 0 else float("nan")
    print(f"QAT {args.preset}: mean cosine {q_qat['mean_cosine']:.5f} ({time.perf_counter() - t1:.0f} s)")
    log.update(qat=q_qat, gap_closed=closed, qat_wall_s=time.perf_counter() - t1, steps=steps)
    write_log()
    print()
    print("| model | recipe | mean cosine vs float | min cosine | neighbour agreement | recall@1 drop (points) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, q in (("PTQ", q_ptq), ("QAT (distilled)", q_qat)):
        print(f"| {name} | {args.preset} | {q['mean_cosine']:.5f} | {q['min_cosine']:.4f} | "
              f"{q['neighbour_agreement']:.3f} | {q['recall_at_1_drop_points']:.1f} |")
    print(f"\nQAT closes {100 * closed:.1f} % of the PTQ cosine gap "
          f"({args.train_sentences} training sentences, {args.epochs} epochs, {steps} steps)")
    return q_ptq, q_qat


if __name__ == "__main__":
    main()
