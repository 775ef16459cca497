"""Recurrent layers quantized, measured on a real sequence task: an LSTM and a GRU sentence
classifier trained in seconds on real English (standard-library docstring sentences, labelled by
the module family they document), then quantized with weight-only, dynamic and static int8 and
evaluated through the reference backend and onnxruntime.

    PYTHONPATH=. python benchmarks/rnn_quality.py --out benchmarks/results/rnn_quality.json

One thread (shared/README: 2-core hosts under load lose whole scheduler slices with more).
Accuracy is on a held-out 25 % of the sentences (stratified, seeded); the families are disjoint
sets of modules, so the task is "which part of the library is this sentence about"."""
from __future__ import annotations

import argparse
import json
import random
import re
import time
import zlib

import torch
from torch import nn

import qcompile
from qcompile.eval.text import module_sentences

FAMILIES = {
    "numbers": ["decimal", "statistics", "random", "fractions", "datetime"],
    "network": ["email.message", "smtplib", "imaplib", "ftplib", "mailbox", "http.client", "socket", "ssl"],
    "concurrency": ["threading", "subprocess", "asyncio.events"],
    "files": ["tarfile", "zipfile", "pathlib", "shutil", "io", "os", "codecs"],
    "code": ["typing", "inspect", "doctest", "pydoc", "unittest.case"],
    "config": ["logging", "configparser", "argparse", "optparse"],
}
VOCAB, PAD = 4096, 0
_WORD = re.compile(r"[a-z]+")


def encode(sentence: str, steps: int) -> list[int]:
    """Hashed word ids (1..VOCAB-1), left-padded with PAD to ``steps`` (the classifier reads the last step)."""
    ids = [1 + zlib.crc32(w.encode()) % (VOCAB - 1) for w in _WORD.findall(sentence.lower())][:steps]
    return [PAD] * (steps - len(ids)) + ids


def dataset(steps: int, families: dict = FAMILIES, seed: int = 0):
    """(train ids, train labels, test ids, test labels): a stratified 75/25 split of every family."""
    rng = random.Random(seed)
    train, test = [], []
    for label, modules in enumerate(families.values()):
        sents = sorted({s for m in modules for s in module_sentences(m)})
        rng.shuffle(sents)
        cut = len(sents) * 3 // 4
        train += [(encode(s, steps), label) for s in sents[:cut]]
        test += [(encode(s, steps), label) for s in sents[cut:]]
    rng.shuffle(train)

    def tensors(rows):
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    return (*tensors(train), *tensors(test))


class SentenceClassifier(nn.Module):
    """Embedding → one-layer LSTM or GRU → Linear on the last step's hidden state."""

    def __init__(self, kind: str = "lstm", classes: int = len(FAMILIES), emb: int = 32, hidden: int = 64):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, emb, padding_idx=PAD)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(emb, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, ids):
        out, _ = self.rnn(self.emb(ids))
        return self.fc(out[:, -1])


def train(kind: str, x, y, epochs: int = 12, seed: int = 0, **sizes) -> SentenceClassifier:
    torch.manual_seed(seed)
    model = SentenceClassifier(kind, classes=int(y.max()) + 1, **sizes)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(fn, x, y, batch: int = 64) -> float:
    with torch.no_grad():
        pred = torch.cat([torch.as_tensor(fn(x[i:i + batch])).argmax(-1) for i in range(0, len(x), batch)])
    return 100.0 * float((pred == y).float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--kinds", nargs="+", default=["lstm", "gru"])
    ap.add_argument("--recipes", nargs="+", default=["w8", "w8a8-dynamic", "w8a8"])
    ap.add_argument("--backends", nargs="+", default=["reference", "onnx"])
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y, xt, yt = dataset(args.steps)
    rows = []
    print(f"{len(x)} training and {len(xt)} test sentences, {len(FAMILIES)} families, {args.steps} steps")
    for kind in args.kinds:
        t0 = time.perf_counter()
        model = train(kind, x, y)
        float_acc = accuracy(model, xt, yt)
        print(f"{kind}: trained in {time.perf_counter() - t0:.1f} s, float accuracy {float_acc:.2f} %")
        calib = [(x[i:i + 32],) for i in range(0, 256, 32)]
        for recipe in args.recipes:
            q = qcompile.quantize(model, recipe, (x[:8],), calibration=calib)
            row = {"kind": kind, "recipe": recipe, "float": float_acc, "kept_float": q.report.kept_float}
            for backend in args.backends:
                t1 = time.perf_counter()
                run = q if backend == "reference" else qcompile.lower(q, backend)
                row[backend] = accuracy(run, xt, yt)
                row[f"{backend}_s"] = round(time.perf_counter() - t1, 1)
            rows.append(row)
            print("  " + recipe.ljust(14) + "  ".join(f"{b} {row[b]:.2f} % ({row[b] - float_acc:+.2f})"
                                                    for b in args.backends) + f"  kept float: {row['kept_float']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"steps": args.steps, "train": len(x), "test": len(xt), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
