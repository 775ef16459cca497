"""Is this calibration data enough? ``qcompile.check_calibration`` on the bundled MiniLM with 8 and
512 standard-library docstring sentences (batches of 16), recipe ``w8a8``.

Run::

    python examples/calibration_doctor_minilm.py      # ~1.5 min on one core
"""
import dataclasses
import time

import torch

import qcompile
from qcompile.eval import docstring_sentences
from qcompile.models import load_minilm


def main():
    torch.set_num_threads(1)
    m = load_minilm()
    recipe = dataclasses.replace(qcompile.Recipe.preset("w8a8"), calibration=qcompile.CalibrationConfig(progress=False))
    for n in (8, 512):
        cal = docstring_sentences("calibration", limit=n)
        batches = [m.encode_batch(cal[i:i + 16]) for i in range(0, len(cal), 16)]
        t0 = time.perf_counter()
        check = qcompile.check_calibration(m.model, recipe, batches)
        print(f"{n} sentences ({len(batches)} batches), {time.perf_counter() - t0:.0f} s:\n{check}\n")


if __name__ == "__main__":
    main()
