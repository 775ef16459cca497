"""qcompile: a quantization compiler for PyTorch.

Capture a model with ``torch.export``, quantize it from a recipe (PTQ now; QAT, weight algorithms
and mixed precision build on the same graph), run it on the PyTorch reference backend or lower it
to a real low-precision backend, and measure what was lost.

Example::

    >>> import qcompile
    >>> qmodel = qcompile.quantize(model, "w8a8", example_inputs=(ids, mask), calibration=batches)
    >>> print(qmodel.report)
    >>> qmodel.save("out/model-w8a8"); same = qcompile.load("out/model-w8a8")
"""
from . import ops  # noqa: F401  - registers torch.ops.qcompile.*
from .analyze import SensitivityTable, analyze
from .api import convert, prepare, quantize
from .doctor import CalibrationCheck, check_calibration
from .auto_recipe import Quality
from .backends import lower
from .check import CheckResult, check
from .errors import (ArtifactError, BackendError, CalibrationError, CaptureError, GenerationError, ParityError,
                     PassError, QCompileError, InputError, QuantizationError, RecipeError)
from .formats import FORMATS, Format, get_format
from .llm import CausalLMWithCache, GenerationStats, causal_lm, generate
from .model import PreparedModel, QuantizedModel, load
from .presets import recipes
from .qat import QATModel, prepare_qat
from .recipe import CalibrationConfig, KVCacheConfig, LayerConfig, QATConfig, Recipe, SmoothingConfig, resolve_recipe
from .report import Report
from .spec import QuantSpec
from .verify import ParityReport, verify

__version__ = "0.1.0"

__all__ = [
    "quantize", "prepare", "prepare_qat", "convert", "load", "lower", "verify", "ParityReport", "check",
    "CheckResult", "analyze",
    "SensitivityTable", "check_calibration", "CalibrationCheck", "Quality", "recipes",
    "resolve_recipe", "Recipe", "LayerConfig", "QuantSpec", "SmoothingConfig", "CalibrationConfig", "QATConfig",
    "KVCacheConfig",
    "PreparedModel", "QATModel", "QuantizedModel", "Report", "Format", "FORMATS", "get_format",
    "QCompileError", "RecipeError", "CaptureError", "CalibrationError", "PassError", "BackendError",
    "ArtifactError", "ParityError", "QuantizationError", "InputError", "GenerationError",
    "causal_lm", "CausalLMWithCache", "generate", "GenerationStats",
]
