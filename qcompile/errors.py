"""The exceptions qcompile raises. Each names what is at fault: a recipe field, a node, a layer."""
from __future__ import annotations

import difflib
import re
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


class GenerationError(QCompileError, ValueError):
    """A generation request cannot run: an empty prompt, a prompt or ``max_new_tokens`` past the maximum
    context, a token id outside the vocabulary, a model without a causal-LM head or captured without
    a KV cache. Raised before anything runs: the artifact stays usable."""


class ArtifactError(QCompileError):
    """A saved artifact is missing, corrupted, truncated or of an unknown format version."""


class ParityError(ArtifactError):
    """``qcompile.check``: a reloaded artifact's outputs on its recorded smoke inputs are further from
    the recorded reference outputs than its recorded parity allows (wrong weights or metadata)."""


def closest(value: str, choices: Iterable[str]) -> str:
    """A ``did you mean 'x'?`` suffix, or a list of valid values when nothing is close."""
    choices = sorted(choices)
    match = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    if match:
        return f"did you mean '{match[0]}'?"
    return "valid values: " + ", ".join(repr(c) for c in choices)


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
_NOISE = re.compile(r"^(Traceback \(most recent call last\)|File \".*\", line \d+|[\W_]+$|"
                    r"(For (more|extended)|If you suspect|Set TORCH_LOGS|To execute this test|You can suppress|"
                    r"For C\+\+ stack trace|\(Refer to the full stack trace|consider using data-dependent friendly|"
                    r"Caused by: \(|Developer debug context)).*")


def summarize(message: str, max_lines: int = 6, max_chars: int = 800) -> str:
    """The first meaningful lines of an underlying error's message, to quote inside a qcompile error:
    terminal escape codes (``\\x1b[...m`` colours) removed, blank and separator lines, traceback
    frames and logging advice dropped, at most ``max_lines`` lines and ``max_chars`` characters
    (``...`` marks a cut). Lines after the first are indented by two spaces.

    Example::

        >>> summarize("\\x1b[31mFailed to decompose\\x1b[0m\\n\\n=====\\nCannot guard on s0 // 7")
        'Failed to decompose\\n  Cannot guard on s0 // 7'
    """
    lines = []
    for line in _ANSI.sub("", str(message)).replace("\r", "").splitlines():
        line = line.rstrip()
        if not line.strip() or _NOISE.match(line.strip()):
            continue
        lines.append(line.strip())
    cut = len(lines) > max_lines
    text = "\n  ".join(lines[:max_lines])
    if len(text) > max_chars:
        text, cut = text[:max_chars].rstrip(), True
    return (text + (" ..." if cut else "")) or "(no message)"


class RotationError(QCompileError, ValueError):
    """A graph cannot be rotated (:mod:`qcompile.passes.rotate`): names the node whose use of the
    residual stream the rotation cannot fold (a LayerNorm's mean subtraction, an op reading the
    stream that is neither an RMSNorm, a residual add nor a pass-through)."""
