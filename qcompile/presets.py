"""Named recipes. Each is a function returning a fresh :class:`~qcompile.recipe.Recipe`.

======================  ===============================================================================
preset                  what it does
======================  ===============================================================================
``w8a8``                static int8: per-channel symmetric int8 weights, per-tensor asymmetric uint8
                        activations (min-max ranges), SmoothQuant-style outlier migration measured per tensor,
                        int8 weight-only embeddings
``w8a8-dynamic``        int8 weights, per-token dynamic uint8 activations, int8 weight-only embeddings
``w8``                  int8 per-channel weight-only (embeddings too)
``w4-g64``/``w4-g128``  4-bit group-wise weight-only (asymmetric, groups of 64/128), int8 embeddings
``w4a8``                int4 per-channel symmetric weights, static per-tensor uint8 activations (min-max),
                        int8 embeddings; for PTQ and QAT (``qcompile.prepare_qat``)
``w4a4``                int4 per-channel symmetric weights, static per-tensor uint4 activations
``w2a8``                int2 per-channel symmetric weights, static per-tensor uint8 activations: too
                        coarse for PTQ on most models, meant as a QAT target
======================  ===============================================================================
"""
from __future__ import annotations

from typing import Callable

from .recipe import LayerConfig, Recipe, SmoothingConfig
from .spec import QuantSpec

INT8_WEIGHT = QuantSpec("int8", "per_channel", symmetric=True)
INT8_EMBEDDING = LayerConfig(weight=INT8_WEIGHT)


def _w8a8() -> Recipe:
    # uint8 asymmetric: the fast x86 int8 kernels (VNNI/AMX, onnxruntime) take u8 activations, and
    # post-GELU inputs are mostly positive, so a zero point recovers a bit of range. Min-max
    # ranges: once smoothing has removed the channel outliers, clipping observers measured worse
    # on MiniLM (cosine 0.99862 min-max vs 0.99837 MSE, 256 calibration sentences).
    act = QuantSpec("uint8", "per_tensor", symmetric=False)
    return Recipe(name="w8a8", default=LayerConfig(INT8_WEIGHT, act), embedding=INT8_EMBEDDING,
                  smoothing=SmoothingConfig())


def _w8a8_dynamic() -> Recipe:
    act = QuantSpec("uint8", "per_token", symmetric=False, dynamic=True)
    return Recipe(name="w8a8-dynamic", default=LayerConfig(INT8_WEIGHT, act), embedding=INT8_EMBEDDING)


def _w8() -> Recipe:
    return Recipe(name="w8", default=LayerConfig(INT8_WEIGHT), embedding=INT8_EMBEDDING)


def _w4(group: int) -> Callable[[], Recipe]:
    def make() -> Recipe:
        w = QuantSpec("uint4", "per_group", symmetric=False, group_size=group)
        return Recipe(name=f"w4-g{group}", default=LayerConfig(w), embedding=INT8_EMBEDDING)
    return make


def _low_bit(name: str, weight_format: str, act_format: str) -> Callable[[], Recipe]:
    # No smoothing: these target QAT, which trains the ranges; a recipe with smoothing would need
    # calibration data before training. Static per-tensor asymmetric activations as in w8a8.
    def make() -> Recipe:
        w = QuantSpec(weight_format, "per_channel", symmetric=True)
        act = QuantSpec(act_format, "per_tensor", symmetric=False)
        return Recipe(name=name, default=LayerConfig(w, act), embedding=INT8_EMBEDDING)
    return make


PRESETS: dict[str, Callable[[], Recipe]] = {
    "w8a8": _w8a8,
    "w8a8-dynamic": _w8a8_dynamic,
    "w8": _w8,
    "w4-g64": _w4(64),
    "w4-g128": _w4(128),
    "w4a8": _low_bit("w4a8", "int4", "uint8"),
    "w4a4": _low_bit("w4a4", "int4", "uint4"),
    "w2a8": _low_bit("w2a8", "int2", "uint8"),
}


def recipes() -> list[str]:
    """Names of the built-in presets."""
    return list(PRESETS)
