"""QAT on a real task: a small CNN on scikit-learn's bundled digits (1,797 8x8 images).

Trains the float model, quantizes it with PTQ (``qcompile.quantize``) and with QAT
(``qcompile.prepare_qat`` -> fine-tune -> ``qcompile.convert``) for each low-bit preset, and prints
test accuracy as a markdown table (the one in docs/qat.md). Two QAT variants per preset:

* ``ste``: the plain baseline — straight-through estimator, min-max ranges observed throughout;
* ``lsq``: qcompile's recipe — scales initialised from calibration, then learned (LSQ), batch-norm
  frozen for the last part of training.

Run::

    PYTHONPATH=. python examples/qat_digits.py            # ~1-2 min on one core
    PYTHONPATH=. python examples/qat_digits.py --presets w8a8,w4a8 --onnx   # + onnxruntime accuracy
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.recipe import QATConfig


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x2, max-pool, linear."""

    def __init__(self, c1: int = 16, c2: int = 32):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2 * 16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


def load_data(seed: int = 0):
    """The fixed split: 25 % test, stratified, ``random_state=0``; pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed,
                                      stratify=y.numpy())
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


def batches(x, y, size, gen):
    perm = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), size):
        j = perm[i:i + size]
        yield x[j], y[j]


def train(model, x, y, epochs, lr, seed=0, weight_decay=0.0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(y) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(x, y, 64, gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean()) * 100


def base_recipe(preset: str):
    # QAT trains the ranges itself and does not take smoothing (w8a8's): drop it for PTQ and QAT alike
    return dataclasses.replace(qcompile.Recipe.preset(preset), smoothing=None)


def qat_recipe(preset: str, variant: str, epochs: int, steps_per_epoch: int):
    base = base_recipe(preset)
    if variant == "ste":  # the plain baseline: min-max ranges observed all along, batch-norm never frozen
        cfg = QATConfig(learn_scale=False, observer_steps=None, freeze_bn_steps=None)
    else:
        cfg = QATConfig(learn_scale=True, observer_steps=0, freeze_bn_steps=int(epochs * 0.7) * steps_per_epoch)
    return dataclasses.replace(base, name=f"{preset}-qat-{variant}", qat=cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="w4a8,w4a4,w2a8")
    ap.add_argument("--float-epochs", type=int, default=30)
    ap.add_argument("--qat-epochs", type=int, default=30)
    ap.add_argument("--qat-lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=1, help="QAT runs per preset and variant (data orders)")
    ap.add_argument("--variants", default="ste,lsq", help="QAT variants: ste (plain baseline), lsq (qcompile's)")
    ap.add_argument("--onnx", action="store_true", help="also lower each QAT model to onnx and compare accuracy")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_data()
    calib = [(x_tr[i:i + 256],) for i in range(0, len(x_tr), 256)]
    t0 = time.perf_counter()
    model = train(DigitsCNN(), x_tr, y_tr, args.float_epochs, 3e-3)
    acc_float = accuracy(model, x_te, y_te)
    print(f"float: {acc_float:.2f} % ({time.perf_counter() - t0:.1f} s)", flush=True)
    steps_per_epoch = -(-len(y_tr) // 64)
    rows = []
    for preset in args.presets.split(","):
        q = qcompile.quantize(model, base_recipe(preset), (x_tr[:2],), calibration=calib)
        acc_ptq = accuracy(q, x_te, y_te)
        row = {"preset": preset, "float": acc_float, "ptq": acc_ptq}
        for variant in args.variants.split(","):
            accs = []
            for seed in range(1, args.seeds + 1):  # the QAT run's data order; the float model is fixed
                t1 = time.perf_counter()
                torch.manual_seed(seed)
                recipe = qat_recipe(preset, variant, args.qat_epochs, steps_per_epoch)
                qat = qcompile.prepare_qat(model, recipe, (x_tr[:2],), calibration=calib)
                train(qat, x_tr, y_tr, args.qat_epochs, args.qat_lr, seed=seed)
                qm = qcompile.convert(qat.eval())
                accs.append(accuracy(qm, x_te, y_te))
                if args.onnx and variant == "lsq" and seed == 1:
                    try:
                        art = qcompile.lower(qm, "onnx")
                        row["onnx"] = f"{accuracy(lambda t: torch.as_tensor(art(t)), x_te, y_te):.2f}"
                    except qcompile.BackendError as e:  # a format the onnx backend has no type for
                        row["onnx"] = "n/a: " + str(e).split("(")[0].strip()
                print(f"{preset} {variant} seed {seed}: {accs[-1]:.2f} % ({time.perf_counter() - t1:.1f} s)",
                      flush=True)
            row[variant] = accs
        gap = acc_float - acc_ptq
        lsq = row["lsq"]
        row["recovered"] = [100 * (a - acc_ptq) / gap if gap > 0 else float("nan") for a in lsq]
        rows.append(row)
    print()
    print(table(rows, args.onnx))
    return rows


def _cell(values, unit=""):
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}{unit}"
    return f"{mean:.2f}{unit} ({min(values):.2f}–{max(values):.2f})"


def table(rows, onnx=False) -> str:
    """The markdown table: mean over QAT seeds, (min–max) when there are several."""
    cols = "| preset | float | PTQ | QAT plain STE | QAT qcompile (LSQ) | PTQ gap recovered (LSQ) |"
    if onnx:
        cols += " QAT onnxruntime (seed 1) |"
    lines = [cols, "|" + " --- |" * (cols.count("|") - 1)]
    for r in rows:
        line = (f"| {r['preset']} | {r['float']:.2f} | {r['ptq']:.2f} | {_cell(r.get('ste', [math.nan]))} | "
                f"{_cell(r['lsq'])} | {_cell(r['recovered'], ' %')} |")
        if onnx:
            line += f" {r.get('onnx', '')} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
