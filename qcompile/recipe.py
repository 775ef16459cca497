"""Recipes: what to quantize and how, as data (dataclasses ↔ dict ↔ YAML/JSON).

A recipe has a ``default`` :class:`LayerConfig` for quantizable layers (Linear, Conv, matmuls with a
weight), an ``embedding`` config (weight-only: embeddings are never activation-quantized), and
``overrides`` keyed by a pattern: an exact module path, a glob (``encoder.layer.*.output.dense``), a
regex (``re:.*\\.(query|key)$``) or a module type (``type:Conv2d``). ``None`` keeps a layer float.
An override that matches nothing is an error, not a silent no-op.

Example::

    >>> import qcompile
    >>> r = qcompile.Recipe.preset("w8a8")
    >>> r = r.with_overrides({"re:.*output\\.dense$": None})      # keep those float
    >>> qcompile.Recipe.from_dict(r.to_dict()) == r
    True
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .atomic import atomic_file
from .auto_recipe import AutoRecipe
from .backends.base import ALIASES, BACKENDS
from .errors import RecipeError, closest
from .spec import WEIGHT_OBSERVERS, QuantSpec

RECIPE_VERSION = 1

# How a Linear whose weight is an embedding's weight (a tied lm_head) is configured:
# "default": like any Linear (default/overrides); when its spec differs from the embedding's the
#            weight is untied: each gets its own quantized copy (the report lists it under "untied").
# "embedding" (the default): it takes the embedding's config, so both read one shared quantized
#            tensor; presets keep embeddings at 8 bits, so the head (the layer small LLMs are most
#            sensitive to) stays high unless a recipe asks otherwise.
TIED_HEAD = ("default", "embedding")


@dataclass(frozen=True)
class LayerConfig:
    """Weight and activation specs for one layer; ``None`` leaves that tensor float."""

    weight: Optional[QuantSpec] = None
    activation: Optional[QuantSpec] = None


@dataclass(frozen=True)
class SmoothingConfig:
    """SmoothQuant-style outlier migration: per input channel ``s = max|x|^alpha / max|w|^(1-alpha)``;
    activations are divided by ``s`` (folded into a preceding LayerNorm where possible) and weights
    multiplied by it. Higher ``alpha`` moves more of the activations' range into the weights.

    ``alpha: null`` (the default) measures, for every smoothed tensor, each of ``alphas``,
    outlier-only migration (channels whose range exceeds the ``q``-quantile of channel ranges
    brought down to it, for each ``q`` in ``outlier_quantiles``) and no smoothing at all, on
    sampled calibration rows with the recipe's real quantizers, and keeps the one with the
    smallest output error: each layer gets the treatment its own data favours."""

    alpha: Optional[float] = None
    alphas: tuple = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    outlier_quantiles: tuple = (0.25, 0.5, 0.75, 0.9)
    fold_only: bool = False  # True: only smooth layers whose 1/s folds into a LayerNorm (no extra op)


@dataclass(frozen=True)
class RotationConfig:
    """QuaRot-style rotation of the residual stream of a pre-norm decoder (Llama-style, RMSNorm),
    folded into the weights before any quantization (:mod:`qcompile.passes.rotate`): every RMSNorm's
    scale is absorbed into the Linears it feeds, then the stream is multiplied by one orthogonal
    ``Q`` (a randomized Hadamard of the hidden size's largest power-of-two factor, Kronecker a
    seeded random orthogonal block for the odd rest): readers get ``W Q``, writers ``Qᵀ W``, the
    embedding ``E Q``. The float model is unchanged; the channel outliers of the Linear inputs and
    weights are spread over all channels, so 4-bit weights and activations lose less.
    ``seed``: the random signs and the odd block. ``per_head`` (QuaRot's R2): each attention head's
    value rotated by a ``d × d`` Hadamard, folded into ``v_proj`` and ``o_proj``
    (:class:`~qcompile.passes.rotate_inner.RotateHeadsPass`). ``online`` (R4): the MLP output
    projection's input (``down_proj``) rotated at run time by a Hadamard inserted in the graph,
    its weight offline (:class:`~qcompile.passes.rotate_inner.OnlineHadamardPass`; weights-only
    formats such as GGUF refuse it)."""

    seed: int = 0
    per_head: bool = True
    online: bool = True


# formats a quantized KV cache may take: codes of one byte with a float32 scale per head and token
KV_CACHE_FORMATS = ("int8", "fp8_e4m3")


@dataclass(frozen=True)
class KVCacheConfig:
    """A quantized KV cache (``Recipe.kv_cache``) for a model captured through
    :func:`qcompile.causal_lm`: every new key/value vector (one head, one token: ``head_dim``
    values) is quantized as it is written, with one float32 scale, symmetric; attention reads the
    dequantized cache. The cache the graph takes and returns between steps is the codes plus the
    scales (``int8``: ``head_dim + 4`` bytes per head and token instead of ``4 * head_dim``). Symmetric, because one head's key or value vector at one token is near zero-centred (RoPE
    rotates key pairs through both signs; values are projections without a bias in Llama-style
    models), so a zero point would buy little resolution at 8 bits and cost a second stored number
    per vector and an integer subtraction in every read. ``format``: ``int8`` (127 steps of
    ``max|x| / 127``) or ``fp8_e4m3`` (``max|x|`` mapped to 448, 3 mantissa bits: relative error
    per value rather than absolute)."""

    format: str = "int8"


WEIGHT_METHODS = ("gptq", "awq")


@dataclass(frozen=True)
class WeightAlgorithmConfig:
    """How quantized weights are chosen when round-to-nearest is not enough (``Recipe.weight_algorithm``;
    ``None`` there means round-to-nearest). Both methods run layer by layer over the calibration data
    in graph order, so each layer sees the inputs produced by the layers already quantized.

    ``gptq`` (Frantar et al., 2022): quantizes one input column at a time and spreads its error over
    the columns not yet quantized using the inverse Hessian ``H = XᵀX`` of the layer's inputs.
    ``damping`` (fraction of mean diag(H)) is added to H; it is multiplied by 10 until H is positive
    definite. ``act_order`` goes through columns by decreasing diag(H); group scales are fixed from
    the weight before the error feedback ("static groups"), so groups stay contiguous.

    ``awq`` (Lin et al., 2023): per input channel scales ``s = mean|x|^alpha`` (``grid`` values of
    alpha in [0, 1], chosen per input tensor by the output error of all its consumers), weights
    multiplied by ``s`` and ``1/s`` folded into a preceding RMSNorm/LayerNorm weight (else a ``mul``
    before the consumers), then a per-group clipping search (``clip_grid`` ratios down to
    ``max_shrink``) minimising each group's output error. ``sample_rows`` bounds the rows AWQ's
    statistics read (an evenly strided subset of every item; GPTQ's Hessian reads all rows)."""

    method: str = "gptq"
    damping: float = 0.01
    act_order: bool = True
    block_size: int = 128
    grid: int = 20
    clip_grid: int = 20
    max_shrink: float = 0.5
    sample_rows: int = 2048
    quantized_inputs: bool = False   # GPTQ: H of the input as its dynamic activation quantizer gives the matmul
    fold_only: bool = False   # AWQ: scale only inputs whose 1/s folds into a norm (no inserted mul: GGUF)


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration data is consumed."""

    max_samples: Optional[int] = None   # stop after this many calibration items
    progress: bool = True               # a progress bar on stderr


@dataclass(frozen=True)
class QATConfig:
    """How :func:`qcompile.prepare_qat` trains the quantizers (PTQ ignores it).

    ``learn_scale: false`` is the straight-through estimator with observed ranges (min-max or
    moving average, as each spec's ``observer`` says); ``true`` makes every static scale a trained
    parameter (LSQ: gradient through the rounding, scaled by ``1/sqrt(n * qmax)``), initialised by
    observation. ``learn_zero_point`` also trains asymmetric zero points (LSQ+). Observers update
    for the first ``observer_steps`` training steps, then freeze (``null``: never; learned scales
    need a finite warm-up). ``fold_bn`` simulates conv + batch-norm folding during training so the
    fake-quantized weight is the folded one; batch statistics are used until ``freeze_bn_steps``,
    then the running statistics (``null``: never frozen). ``sync_observers`` reduces observed
    ranges over all ranks under ``torch.distributed``."""

    learn_scale: bool = False
    learn_zero_point: bool = False
    observer_steps: Optional[int] = None
    fold_bn: bool = True
    freeze_bn_steps: Optional[int] = None
    sync_observers: bool = True


@dataclass(frozen=True)
class Recipe:
    """A complete quantization recipe. See the module docstring."""

    name: str = "custom"
    default: Optional[LayerConfig] = None
    embedding: Optional[LayerConfig] = None
    overrides: dict = field(default_factory=dict)       # pattern -> LayerConfig | None
    keep_float: tuple = ()                               # patterns of sensitive layers kept float
    keep_first: bool = False                             # keep the first quantizable layer float
    keep_last: bool = False                              # keep the last quantizable layer float
    smoothing: Optional[SmoothingConfig] = None
    weight_algorithm: Optional[WeightAlgorithmConfig] = None   # None: round-to-nearest
    rotation: Optional[RotationConfig] = None            # None: no rotation (omitted from to_dict)
    tied_head: str = "embedding"                         # see TIED_HEAD
    calibration: CalibrationConfig = CalibrationConfig()
    backend: Optional[str] = None                        # follow this backend's native placement (onnx: conv outputs too)
    qat: Optional[QATConfig] = None                      # QAT settings (None: QATConfig() defaults)
    kv_cache: Optional[KVCacheConfig] = None             # None: float KV cache (omitted from to_dict)
    version: int = RECIPE_VERSION

    # -- constructors --------------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> "Recipe":
        """A named preset (``qcompile.recipes()`` lists them)."""
        if name not in PRESETS:
            raise RecipeError("name", f"unknown preset '{name}'; {closest(name, PRESETS)}")
        return PRESETS[name]()

    @staticmethod
    def auto(candidates, budget: Optional[dict] = None, max_samples: int = 8, quality=None, cost: str = "auto"):
        """Mixed precision chosen by measurement (see :mod:`qcompile.mixed`): pass the result to
        :func:`qcompile.quantize` like any recipe. Give a ``budget`` (bits per weight, bytes, or
        ``{"latency_ms": ms, "backend": "onnx"}`` measured on that backend: :mod:`qcompile.latency`),
        or a ``quality`` contract (:class:`qcompile.auto_recipe.Quality`) to get the smallest model meeting it.
        ``cost``: ``"auto"`` (default), ``"output"``, ``"hessian"`` or ``"gptq"`` (:class:`~qcompile.auto_recipe.AutoRecipe`)."""

        if budget is None and quality is None:
            raise RecipeError("budget", "Recipe.auto needs a budget or a quality contract")
        return AutoRecipe(tuple(candidates), dict(budget or {}), max_samples, quality=quality, cost=cost)

    @staticmethod
    def load(path: Union[str, Path]) -> "Recipe":
        """Read a recipe from a ``.yaml``/``.yml`` or ``.json`` file."""
        path = Path(path)
        if path.suffix not in (".yaml", ".yml", ".json"):
            raise RecipeError("path", f"'{path}': use a .yaml, .yml or .json file")
        if not path.exists():
            raise RecipeError("path", f"'{path}' does not exist")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # noqa: BLE001 - any parser error becomes a RecipeError naming the file
            raise RecipeError("path", f"'{path}' is not valid {path.suffix[1:].upper()}: {e}") from None
        return Recipe.from_dict(data)

    def save(self, path: Union[str, Path]) -> None:
        """Write the recipe as YAML or JSON (by suffix), atomically (a temporary file renamed
        into place: an interrupted save leaves the previous file)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2)
        with atomic_file(path) as tmp:
            tmp.write_text(text)

    def with_overrides(self, overrides: dict) -> "Recipe":
        """A copy with more overrides (later entries win over earlier ones for the same pattern)."""
        merged = dict(self.overrides)
        merged.update({k: _layer_from_dict(v, f"overrides['{k}']") for k, v in overrides.items()})
        return dataclasses.replace(self, overrides=merged).validate()

    # -- dict form -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The recipe as plain data (``from_dict`` reads it back). ``rotation`` is written only when set,
        so recipes written before it existed keep their exact form."""
        data = {
            "version": self.version,
            "name": self.name,
            "default": _layer_to_dict(self.default),
            "embedding": _layer_to_dict(self.embedding),
            "overrides": {k: _layer_to_dict(v) for k, v in self.overrides.items()},
            "keep_float": list(self.keep_float),
            "keep_first": self.keep_first,
            "keep_last": self.keep_last,
            "smoothing": None if self.smoothing is None else
            dict(dataclasses.asdict(self.smoothing), alphas=list(self.smoothing.alphas),
                 outlier_quantiles=list(self.smoothing.outlier_quantiles)),
            "weight_algorithm": None if self.weight_algorithm is None else {k: v for k, v in dataclasses.asdict(
                self.weight_algorithm).items() if k not in ("quantized_inputs", "fold_only") or v},   # older records unchanged
            "tied_head": self.tied_head,
            "calibration": dataclasses.asdict(self.calibration),
            "backend": self.backend,
            "qat": None if self.qat is None else dataclasses.asdict(self.qat),
        }
        if self.rotation is not None:
            data["rotation"] = dataclasses.asdict(self.rotation)
        if self.kv_cache is not None:
            data["kv_cache"] = dataclasses.asdict(self.kv_cache)
        return data

    @staticmethod
    def from_dict(data: Any) -> "Recipe":
        """Build and validate a recipe; errors name the field and suggest the closest valid one."""
        if not isinstance(data, dict):
            raise RecipeError("<root>", f"expected a mapping, got {type(data).__name__}")
        _check_keys(data, [f.name for f in fields(Recipe)], "")
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise RecipeError("version", f"recipe version {version!r} is not supported (this qcompile reads {RECIPE_VERSION})")
        overrides = data.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise RecipeError("overrides", "expected a mapping of pattern -> layer config or null")
        keep_float = data.get("keep_float") or ()
        if not isinstance(keep_float, (list, tuple)) or not all(isinstance(p, str) for p in keep_float):
            raise RecipeError("keep_float", "expected a list of module patterns")
        recipe = Recipe(
            name=_typed(data.get("name", "custom"), str, "name"),
            default=_layer_from_dict(data.get("default"), "default"),
            embedding=_layer_from_dict(data.get("embedding"), "embedding"),
            overrides={_typed(k, str, "overrides"): _layer_from_dict(v, f"overrides['{k}']") for k, v in overrides.items()},
            keep_float=tuple(keep_float),
            keep_first=_typed(data.get("keep_first", False), bool, "keep_first"),
            keep_last=_typed(data.get("keep_last", False), bool, "keep_last"),
            smoothing=_small_from_dict(SmoothingConfig, data.get("smoothing"), "smoothing"),
            weight_algorithm=_small_from_dict(WeightAlgorithmConfig, data.get("weight_algorithm"), "weight_algorithm"),
            rotation=_small_from_dict(RotationConfig, data.get("rotation"), "rotation"),
            tied_head=_typed(data.get("tied_head", "embedding"), str, "tied_head"),
            calibration=_small_from_dict(CalibrationConfig, data.get("calibration"), "calibration") or CalibrationConfig(),
            backend=data.get("backend"),
            qat=_small_from_dict(QATConfig, data.get("qat"), "qat"),
            kv_cache=_small_from_dict(KVCacheConfig, data.get("kv_cache"), "kv_cache"),
            version=version,
        )
        return recipe.validate()

    def validate(self) -> "Recipe":
        """Check every field; returns ``self`` so it chains."""
        for where, cfg in [("default", self.default), ("embedding", self.embedding),
                           *((f"overrides['{k}']", v) for k, v in self.overrides.items())]:
            if cfg is None:
                continue
            if not isinstance(cfg, LayerConfig):
                raise RecipeError(where, f"expected a LayerConfig or None, got {type(cfg).__name__}")
            if cfg.weight is not None:
                cfg.weight.validate(f"{where}.weight")
                if cfg.weight.dynamic or cfg.weight.per_token:
                    raise RecipeError(f"{where}.weight", "weights are constant: use static per_tensor/per_channel/per_group")
            if cfg.activation is not None:
                cfg.activation.validate(f"{where}.activation")
                if cfg.activation.observer in WEIGHT_OBSERVERS:
                    raise RecipeError(f"{where}.activation.observer", "signed_max is a weight scale rule; activations "
                                      "take minmax, moving_average, percentile, mse or histogram")
                if cfg.activation.granularity in ("per_channel", "per_group"):
                    raise RecipeError(f"{where}.activation.granularity",
                                      "activations take per_tensor or per_token (dynamic) scales")
        if self.embedding is not None and self.embedding.activation is not None:
            raise RecipeError("embedding.activation", "embeddings are weight-only: their input is token ids")
        if self.smoothing is not None:
            values = [("smoothing.alpha", self.smoothing.alpha)]
            values += [(f"smoothing.alphas[{i}]", a) for i, a in enumerate(self.smoothing.alphas)]
            values += [(f"smoothing.outlier_quantiles[{i}]", q) for i, q in enumerate(self.smoothing.outlier_quantiles)]
            for where, a in values:
                if a is not None and (not isinstance(a, (int, float)) or isinstance(a, bool) or not 0.0 <= a <= 1.0):
                    raise RecipeError(where, f"must be a number in [0, 1], got {a!r}")
        if self.rotation is not None:
            if not isinstance(self.rotation, RotationConfig):
                raise RecipeError("rotation", f"expected a RotationConfig or None, got {type(self.rotation).__name__}")
            seed = self.rotation.seed
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise RecipeError("rotation.seed", f"must be a non-negative integer, got {seed!r}")
            for flag in ("per_head", "online"):
                _typed(getattr(self.rotation, flag), bool, f"rotation.{flag}")
        if self.kv_cache is not None:
            if not isinstance(self.kv_cache, KVCacheConfig):
                raise RecipeError("kv_cache", f"expected a KVCacheConfig or None, got {type(self.kv_cache).__name__}")
            fmt = self.kv_cache.format
            _typed(fmt, str, "kv_cache.format")
            if fmt not in KV_CACHE_FORMATS:
                raise RecipeError("kv_cache.format", f"unknown KV cache format '{fmt}' (a quantized cache takes "
                                  f"{', '.join(KV_CACHE_FORMATS)}); {closest(fmt, KV_CACHE_FORMATS)}")
        if self.backend is not None:
            _typed(self.backend, str, "backend")
            if ALIASES.get(self.backend, self.backend) not in BACKENDS:
                raise RecipeError("backend", f"unknown backend '{self.backend}'; {closest(self.backend, BACKENDS)}")
        if self.qat is not None:
            _validate_qat(self.qat)
        wa = self.weight_algorithm
        if wa is not None:
            if not isinstance(wa, WeightAlgorithmConfig):
                raise RecipeError("weight_algorithm", f"expected a WeightAlgorithmConfig or None, got {type(wa).__name__}")
            if wa.method not in WEIGHT_METHODS:
                raise RecipeError("weight_algorithm.method",
                                  f"unknown method '{wa.method}'; {closest(wa.method, WEIGHT_METHODS)}")
            for name in ("block_size", "grid", "clip_grid", "sample_rows"):
                v = getattr(wa, name)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise RecipeError(f"weight_algorithm.{name}", f"must be a positive integer, got {v!r}")
            for name, lo, hi in (("damping", 0.0, 1.0), ("max_shrink", 0.0, 1.0)):
                v = getattr(wa, name)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo < v <= hi:
                    raise RecipeError(f"weight_algorithm.{name}", f"must be a number in ({lo}, {hi}], got {v!r}")
        if self.tied_head not in TIED_HEAD:
            raise RecipeError("tied_head", f"unknown value '{self.tied_head}'; {closest(self.tied_head, TIED_HEAD)}")
        ms = self.calibration.max_samples
        if ms is not None and (not isinstance(ms, int) or isinstance(ms, bool) or ms <= 0):
            raise RecipeError("calibration.max_samples", f"must be a positive integer or null, got {ms!r}")
        return self


# name -> a function returning a fresh preset Recipe; filled by :mod:`qcompile.presets` (which the
# package imports), so that this module does not import the presets built from it.
PRESETS: dict[str, Callable[[], Recipe]] = {}

RecipeLike = Union[Recipe, str, Path, dict]


def resolve_recipe(recipe: RecipeLike) -> Recipe:
    """A :class:`Recipe` from a Recipe, a preset name, a path to a YAML/JSON file, or a dict.

    Example::

        >>> qcompile.resolve_recipe("w8a8").default.activation.format
        'uint8'
    """
    if isinstance(recipe, Recipe):
        return recipe.validate()
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        s = str(recipe)
        if s in PRESETS:
            return Recipe.preset(s)
        if s.endswith((".yaml", ".yml", ".json")) or Path(s).exists():
            if not Path(s).exists():
                raise RecipeError("recipe", f"file '{s}' does not exist")
            return Recipe.load(s)
        raise RecipeError("recipe", f"'{s}' is neither a preset nor a recipe file; {closest(s, PRESETS)}")
    raise RecipeError("recipe", f"expected a Recipe, preset name, path or dict, got {type(recipe).__name__}")


def _validate_qat(q: QATConfig) -> None:
    for name in ("learn_scale", "learn_zero_point", "fold_bn", "sync_observers"):
        _typed(getattr(q, name), bool, f"qat.{name}")
    for name in ("observer_steps", "freeze_bn_steps"):
        v = getattr(q, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise RecipeError(f"qat.{name}", f"must be a non-negative integer or null, got {v!r}")
    if q.learn_scale and q.observer_steps is None:
        raise RecipeError("qat.observer_steps", "learned scales need a finite observer warm-up (e.g. 0 after "
                                                "calibration, or a few hundred steps); got null (observe forever)")
    if q.learn_zero_point and not q.learn_scale:
        raise RecipeError("qat.learn_zero_point", "a learned zero point needs learn_scale: true")


def _typed(value, kind, where):
    if not isinstance(value, kind):
        raise RecipeError(where, f"expected {kind.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _check_keys(data: dict, valid, prefix: str):
    for key in data:
        if key not in valid:
            # an empty or non-string key (YAML allows both) is shown quoted, so the field is never blank
            name = key if isinstance(key, str) and key.strip() else repr(key)
            raise RecipeError(f"{prefix}{name}", f"unknown field; {closest(key, valid)}")


def _layer_to_dict(cfg: Optional[LayerConfig]):
    return None if cfg is None else {"weight": None if cfg.weight is None else cfg.weight.to_dict(),
                                     "activation": None if cfg.activation is None else cfg.activation.to_dict()}


def _spec_from_dict(data, where: str) -> Optional[QuantSpec]:
    if data is None:
        return None
    if isinstance(data, str):  # shorthand: just a format name
        data = {"format": data}
    if not isinstance(data, dict):
        raise RecipeError(where, f"expected a mapping or a format name, got {type(data).__name__}")
    _check_keys(data, [f.name for f in fields(QuantSpec)], f"{where}.")
    if "format" not in data:
        raise RecipeError(f"{where}.format", "missing")
    try:
        spec = QuantSpec(**data)
    except TypeError as e:
        raise RecipeError(where, str(e)) from None
    for name, kind in (("symmetric", bool), ("dynamic", bool), ("format", str), ("granularity", str), ("observer", str)):
        _typed(getattr(spec, name), kind, f"{where}.{name}")
    return spec.validate(where)


def _layer_from_dict(data, where: str) -> Optional[LayerConfig]:
    if data is None:
        return None
    if isinstance(data, LayerConfig):
        return data
    if not isinstance(data, dict):
        raise RecipeError(where, f"expected a mapping with 'weight'/'activation' or null, got {type(data).__name__}")
    _check_keys(data, ["weight", "activation"], f"{where}.")
    return LayerConfig(weight=_spec_from_dict(data.get("weight"), f"{where}.weight"),
                       activation=_spec_from_dict(data.get("activation"), f"{where}.activation"))


def _small_from_dict(cls, data, where: str):
    if data is None:
        return None
    if not isinstance(data, dict):
        raise RecipeError(where, f"expected a mapping or null, got {type(data).__name__}")
    names = {f.name: f for f in fields(cls)}
    _check_keys(data, list(names), f"{where}.")
    for name, value in data.items():
        if names[name].type in ("bool", bool):
            _typed(value, bool, f"{where}.{name}")
        elif names[name].type in ("tuple", tuple) and not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}.{name}", f"expected a list, got {type(value).__name__} ({value!r})")
    obj = cls(**data)
    lists = {k: tuple(v) for k, v in dataclasses.asdict(obj).items() if isinstance(v, list)}
    return dataclasses.replace(obj, **lists) if lists else obj
