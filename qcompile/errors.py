"""The exceptions qcompile raises. Each names what is at fault: a recipe field, a node, a layer."""
from __future__ import annotations

import difflib
from typing import Iterable


class QCompileError(Exception):
    """Base class of every error qcompile raises on purpose."""


class RecipeError(QCompileError, ValueError):
    """A recipe is invalid. The message names the field (``overrides['re:.*fc'].weight.format``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"recipe field '{field}': {message}")


class CaptureError(QCompileError):
    """``torch.export`` could not capture the model; names the module and gives a hint."""


class CalibrationError(QCompileError):
    """Calibration data is unusable (empty, NaN/Inf at a named layer, wrong structure)."""


class InputError(QCompileError, ValueError):
    """A call to a captured/quantized model got inputs it was not captured for: wrong count, dtype,
    rank or size. Names the input (calibration items raise :class:`CalibrationError` instead)."""


class PassError(QCompileError):
    """A graph pass failed; names the pass and the passes that ran before it."""


class BackendError(QCompileError):
    """A backend cannot lower or run something; names the node and module."""


class QuantizationError(QCompileError, ValueError):
    """A tensor cannot be quantized to a format: NaN/Inf or a magnitude above ``formats.MAX_ABS`` in the
    range a scale is chosen from, or NaN quantized to a format with no code for it. Names the format,
    and the layer where one is known."""


class ArtifactError(QCompileError):
    """A saved artifact is missing, corrupted, truncated or of an unknown format version."""


def closest(value: str, choices: Iterable[str]) -> str:
    """A ``did you mean 'x'?`` suffix, or a list of valid values when nothing is close."""
    choices = sorted(choices)
    match = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    if match:
        return f"did you mean '{match[0]}'?"
    return "valid values: " + ", ".join(repr(c) for c in choices)
