"""Named recipes. Each is a function returning a fresh :class:`~qcompile.recipe.Recipe`.

======================  ===============================================================================
preset                  what it does
======================  ===============================================================================
``float``               nothing quantized: the baseline, and mixed precision's keep-float candidate
``w8a8``                static int8: per-channel symmetric int8 weights, per-tensor asymmetric uint8
                        activations (min-max ranges), SmoothQuant-style outlier migration measured per tensor,
                        int8 weight-only embeddings
``w8a8-dynamic``        int8 weights, per-token dynamic uint8 activations, int8 weight-only embeddings
``w8``                  int8 per-channel weight-only (embeddings too)
``w4-g64``/``w4-g128``  4-bit group-wise weight-only (asymmetric, groups of 64/128), int8 embeddings
``w4-g32-a8`` ...        4-bit group-wise weights (as ``w4-g64``) with int8 activations quantized at run time, symmetric,
                        one scale per token and per block of K the size of the weight group (groups of
                        32/64/128): the numerics of onnxruntime's ``MatMulNBits`` at accuracy level 4, which
                        the onnx backend lowers it to (int8 dot products in the kernel); ``w4-a8`` is
                        ``w4-g128-a8``
``w8-g32-a8``/``-g64-a8`` int8 symmetric weights in groups of 32/64 with int8 activations quantized at run time in
                        blocks of the same size (llama.cpp's Q8_0 x Q8_0 numerics, float32 scales): the onnx
                        backend lowers it to 8-bit ``MatMulNBits`` at accuracy level 4
``w4a8``                int4 per-channel symmetric weights, static per-tensor uint8 activations (min-max),
                        int8 embeddings; for PTQ and QAT (``qcompile.prepare_qat``)
``w4a4``                int4 per-channel symmetric weights, static per-tensor uint4 activations
``w4a8-rot``            int4 per-channel symmetric weights solved by GPTQ, per-token dynamic uint8 activations,
                        the residual stream rotated first (QuaRot R1: :mod:`qcompile.passes.rotate`; Llama-style
                        RMSNorm decoders only), each head's V/O (R2) and down_proj's input online (R4, a graph
                        op: :mod:`qcompile.passes.rotate_inner`), int8 embeddings and tied head
``w4a4-rot``            the same with per-token dynamic uint4 activations, round-to-nearest weights
``w4-g128-rot-gptq``    ``w4-g128-gptq`` on the rotated model
``w2a8``                int2 per-channel symmetric weights, static per-tensor uint8 activations: too
                        coarse for PTQ on most models, meant as a QAT target
``w4-g64-gptq`` ...     the same 4-bit weights solved by GPTQ (``-gptq``) or AWQ (``-awq``) on the
                        ``calibration`` data; groups of 64 or 128
``w3-g64``/``w2-g64``   3-/2-bit group-wise weight-only (asymmetric, groups of 64), round-to-nearest
``w5-g64-gptq``         5-bit group-wise (asymmetric, groups of 64, float16 scales: 5.375 bits per weight)
                        solved by GPTQ: the counterpart of llama.cpp's Q5_0 (5.5 bits per weight)
``nf4``                 4-bit NormalFloat code book, absmax scale per group of 64, the scales double-quantized
                        (bitsandbytes' QLoRA scheme: int8 scales in blocks of 256, ~4.127 bits per weight)
``q4_k_m``              llama.cpp Q4_K_M-like mix: uint4 in groups of 32 with double-quantized (int8)
                        scales, v_proj and down_proj at uint6 (as Q4_K_M gives them Q6_K); no fallback
                        to legacy types when a row is not a multiple of 256 (the last super-block of
                        scales is padded)
``q4_k_m-gptq``         ``q4_k_m`` solved by GPTQ against its double-quantized scales (5.07 bits per weight)
``q4_k_m-gptq-min``     the same with double-quantized float zero points (``x = s q + min``, llama.cpp's
                        K-quant form) at the same bits: the best of the three on SmolLM2; reference
                        backend only (ONNX/TVM kernels take integer zero points)
``q6_k``                llama.cpp Q6_K-like: symmetric int6 in groups of 16, double-quantized (int8) scales,
                        solved by GPTQ (~6.51 bits per weight against Q6_K's 6.5625)
``w5-g64-dq-gptq``      uint5 in groups of 64, double-quantized (int8) scales, uint8 zero points, by GPTQ
                        (~5.25 bits per weight)
``fp8-e4m3``            FP8 E4M3 weights, one scale per output row
``gguf-q8_0`` ...       llama.cpp's legacy block types exactly (groups of 32, float16 scales), so the gguf
                        backend writes the codes bit for bit: ``gguf-q8_0`` (int8), ``gguf-q4_0`` (uint4,
                        symmetric: offset 8), ``gguf-q4_1`` (uint4, float16 minimum), ``gguf-q5_0``,
                        ``gguf-q5_1``; ``-gptq``: solved by GPTQ on that grid. The embedding / tied head
                        is Q8_0 (int8 in groups of 32, float16 scales), as llama.cpp keeps it;
                        ``gguf-q4_0``/``gguf-q5_0`` round to nearest with llama.cpp's own scale
                        (observer ``signed_max``)
``gguf-q4_k_m`` ...     llama.cpp's k-quants exactly (super-blocks of 256, two-level ``kquant6``/``kquant8``
                        scales): Q4_K everywhere, Q6_K for v_proj/down_proj (every layer), the tied
                        embedding Q8_0 (>= 8 bits, as in every preset); ``-gptq`` solved by GPTQ; ``gguf-q5_k_m`` (Q5_K), ``gguf-q6_k``. Rows must
                        be multiples of 256: :func:`llama_cpp_mix` gives each layer of a model llama.cpp's
                        own type, fallbacks included
======================  ===============================================================================

Every preset keeps a tied ``lm_head`` on the embedding's weight (``tied_head: embedding``, the
recipe default): one shared tensor, so the output projection, the layer small LLMs are most
sensitive to, stays at the embedding's 8 bits (llama.cpp keeps it at 6-8 bits too). Measured on
SmolLM2 and held-out text (float 16.44, issue 25): ``w4-g64`` with the head at 4 bits gave perplexity
26.10, with the shared 8-bit head 22.24. ``tied_head: default`` quantizes it like any Linear (untied).
"""
from __future__ import annotations

from typing import Callable, Optional

from .recipe import PRESETS, LayerConfig, Recipe, RotationConfig, SmoothingConfig, WeightAlgorithmConfig
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


def _w4_a8(group: int, name: Optional[str] = None) -> Callable[[], Recipe]:
    # symmetric int8, scale = amax / 127 per (token, K-block of the weight's group): what onnxruntime's
    # MLAS computes inside MatMulNBits at accuracy level 4 (QuantizeARow_CompInt8), so the reference
    # and the fused kernel compute the same model
    def make() -> Recipe:
        w = QuantSpec("uint4", "per_group", symmetric=False, group_size=group)
        act = QuantSpec("int8", "per_token_group", symmetric=True, group_size=group, dynamic=True)
        return Recipe(name=name or f"w4-g{group}-a8", default=LayerConfig(w, act), embedding=INT8_EMBEDDING)
    return make


def _w8_a8(group: int) -> Callable[[], Recipe]:
    # llama.cpp's Q8_0 x Q8_0 numerics (int8 weights and int8 activations in blocks of K, one float
    # scale each), in float32 scales: what onnxruntime's 8-bit MatMulNBits computes at accuracy level 4
    def make() -> Recipe:
        w = QuantSpec("int8", "per_group", symmetric=True, group_size=group)
        act = QuantSpec("int8", "per_token_group", symmetric=True, group_size=group, dynamic=True)
        return Recipe(name=f"w8-g{group}-a8", default=LayerConfig(w, act), embedding=INT8_EMBEDDING)
    return make


def _low_bit(name: str, weight_format: str, act_format: str) -> Callable[[], Recipe]:
    # No smoothing: these target QAT, which trains the ranges; a recipe with smoothing would need
    # calibration data before training. Static per-tensor asymmetric activations as in w8a8.
    def make() -> Recipe:
        w = QuantSpec(weight_format, "per_channel", symmetric=True)
        act = QuantSpec(act_format, "per_tensor", symmetric=False)
        return Recipe(name=name, default=LayerConfig(w, act), embedding=INT8_EMBEDDING)
    return make


def _rotated(name: str, act_format: str, algorithm: Optional[str] = None) -> Callable[[], Recipe]:
    # QuaRot's setting: the residual stream rotated (outliers spread over all channels), int4
    # per-channel symmetric weights, activations quantized per token at run time (asymmetric, as
    # w8a8-dynamic); the tied head stays on the int8 embedding spec (the rotation unties the tensors).
    # w4a8-rot solves its weights by GPTQ, as QuaRot does: on SmolLM2 round-to-nearest int4 weights
    # measured worse rotated (136.6) than not (58.7); GPTQ with R1 37.6, with R1 + R2 + R4 35.3 against
    # 40.8 unrotated (float 30.8; docs/llm.md, "Rotations")
    def make() -> Recipe:
        w = QuantSpec("int4", "per_channel", symmetric=True)
        act = QuantSpec(act_format, "per_token", symmetric=False, dynamic=True)
        algo = None if algorithm is None else WeightAlgorithmConfig(algorithm)
        return Recipe(name=name, default=LayerConfig(w, act), embedding=INT8_EMBEDDING, tied_head="embedding",
                      rotation=RotationConfig(), weight_algorithm=algo)
    return make


def _weight_only(name: str, weight: QuantSpec, algorithm: Optional[str] = None,
                 rotation: Optional[RotationConfig] = None) -> Callable[[], Recipe]:
    def make() -> Recipe:
        algo = None if algorithm is None else WeightAlgorithmConfig(algorithm)
        return Recipe(name=name, default=LayerConfig(weight), embedding=INT8_EMBEDDING,
                      weight_algorithm=algo, rotation=rotation)
    return make


def _uint_group(bits: int, group: int) -> QuantSpec:
    return QuantSpec(f"uint{bits}", "per_group", symmetric=False, group_size=group)


def _q4_k_m(algorithm: Optional[str] = None, zero_point_dtype: str = "code") -> Callable[[], Recipe]:
    # llama.cpp's Q4_K: 4-bit codes in sub-blocks of 32 whose scales are quantized inside a
    # 256-weight super-block; Q4_K_M gives attn_v and ffn_down more bits (Q6_K). Here: uint4 g32
    # with int8 double-quantized scales, and uint6 g32 for those layers. Overrides are patterns
    # that must match: this preset is for Llama-style module names. zero_point_dtype "int8": a
    # double-quantized float zero point (scale + minimum, as K-quants store their mins) at the
    # bits of a uint8 code zero point.
    def k(bits):
        return LayerConfig(QuantSpec(f"uint{bits}", "per_group", symmetric=False, group_size=32, scale_dtype="int8",
                                     zero_point_dtype=zero_point_dtype))

    def make() -> Recipe:
        algo = None if algorithm is None else WeightAlgorithmConfig(algorithm)
        name = "q4_k_m" + ("" if algorithm is None else f"-{algorithm}") + ("" if zero_point_dtype == "code" else "-min")
        return Recipe(name=name, default=k(4),
                      embedding=INT8_EMBEDDING, weight_algorithm=algo,
                      overrides={r"re:.*\.(v_proj|down_proj)$": k(6)})
    return make


def _gguf_block(bits: int, minimum: bool = False, observer: str = "minmax") -> QuantSpec:
    # llama.cpp's Q{bits}_0 (x = d (u - 2^(bits-1)): symmetric unsigned codes, whose zero point is
    # that middle code) or Q{bits}_1 (x = d u + m: a float16 minimum), blocks of 32, float16 d.
    # observer "signed_max": llama.cpp's own Q4_0/Q5_0 scale, d = signed max / -2^(bits-1)
    fmt = "int8" if bits == 8 else f"uint{bits}"
    return QuantSpec(fmt, "per_group", symmetric=not minimum, group_size=32, observer=observer, scale_dtype="float16",
                     zero_point_dtype="float16" if minimum else "code")


def _gguf(name: str, bits: int, minimum: bool = False, algorithm: Optional[str] = None,
          observer: str = "minmax", activations: bool = False) -> Callable[[], Recipe]:
    # activations: see gguf_recipe
    def make() -> Recipe:
        # AWQ folds 1/s into norms only: a GGUF file has no tensor for an inserted mul, and its
        # float16 block scales cannot absorb it into the previous layer's rows exactly
        algo = None if algorithm is None else WeightAlgorithmConfig(
            algorithm, fold_only=algorithm == "awq")
        act = gguf_activation("Q8_0") if activations else None
        overrides = {"lm_head": LayerConfig(_gguf_block(8), act)} if activations else {}
        return Recipe(name=name, default=LayerConfig(_gguf_block(bits, minimum, observer), act),
                      embedding=LayerConfig(_gguf_block(8)), weight_algorithm=algo, overrides=overrides)
    return make


def _gguf_k(bits: int) -> QuantSpec:
    # llama.cpp's k-quants (qcompile.backends.gguf.kquants): Q4_K / Q5_K are uint4 / uint5 in groups
    # of 32 with a minimum, scales and minima as 6-bit codes against a float16 d / dmin per 256 weights;
    # Q6_K is int6 symmetric in groups of 16 with 8-bit scale codes against a float16 d per 256
    if bits == 6:
        return QuantSpec("int6", "per_group", symmetric=True, group_size=16, scale_dtype="kquant8")
    if bits == 3:   # Q3_K: int3 symmetric in groups of 16, signed 6-bit scale codes
        return QuantSpec("int3", "per_group", symmetric=True, group_size=16, scale_dtype="kquant6s")
    if bits == 2:   # Q2_K: uint2 in groups of 16, 4-bit scale and minimum codes
        return QuantSpec("uint2", "per_group", symmetric=False, group_size=16, scale_dtype="kquant4",
                         zero_point_dtype="kquant4")
    return QuantSpec(f"uint{bits}", "per_group", symmetric=False, group_size=32, scale_dtype="kquant6",
                     zero_point_dtype="kquant6")


# a GGUF type name -> the weight spec of qcompile's that equals it bit for bit
# (rtn: round to nearest, so Q4_0/Q5_0 take llama.cpp's own signed-max scale, as gguf-q4_0 does)
def gguf_spec(gguf_type: str, rtn: bool = True) -> QuantSpec:
    """The weight spec of qcompile's that equals the GGUF block type ``gguf_type`` bit for bit."""
    specs = {"Q8_0": lambda: _gguf_block(8), "Q4_1": lambda: _gguf_block(4, True), "Q5_1": lambda: _gguf_block(5, True),
             "Q4_0": lambda: _gguf_block(4, observer="signed_max" if rtn else "minmax"),
             "Q5_0": lambda: _gguf_block(5, observer="signed_max" if rtn else "minmax"),
             "Q2_K": lambda: _gguf_k(2), "Q3_K": lambda: _gguf_k(3), "Q4_K": lambda: _gguf_k(4), "Q5_K": lambda: _gguf_k(5),
             "Q6_K": lambda: _gguf_k(6)}
    return specs[gguf_type]()


def gguf_activation(gguf_type: str) -> QuantSpec:
    """The activation spec of what llama.cpp's CPU dot products compute for a weight of ``gguf_type``:
    before each quantized matmul llama.cpp quantizes the input row to its ``vec_dot_type`` (Q8_0 /
    Q8_1 for the legacy types: int8, ``amax / 127`` per block of 32 of the reduction axis; Q8_K for
    the k-quants: the same per block of 256; ``quantize_row_q8_0`` / ``quantize_row_q8_K`` in
    ggml-quants.c, both rounding half to even). As a recipe's activation, the reference backend
    computes the same model as llama.cpp, so GPTQ solves against it."""
    block = 256 if gguf_type.endswith("_K") else 32
    return QuantSpec("int8", "per_token_group", symmetric=True, group_size=block, dynamic=True)


_LEGACY = {"Q8_0": (8, False), "Q4_0": (4, False), "Q4_1": (4, True), "Q5_0": (5, False), "Q5_1": (5, True)}


def gguf_recipe(gguf_type: str, algorithm: Optional[str] = None, activations: bool = False) -> Recipe:
    """The recipe writing every Linear as the legacy GGUF block type ``gguf_type`` (``"Q4_0"``,
    ``"Q4_1"``, ``"Q5_0"``, ``"Q5_1"``, ``"Q8_0"``; the embedding and tied head Q8_0), as the
    ``gguf-*`` presets do, named ``gguf-q5_0[-awq][-a8]``. ``algorithm``: ``"gptq"`` or ``"awq"``
    solves the weights on that grid (else round to nearest with llama.cpp's own scale).
    ``activations``: every Linear (the tied head too) also quantizes its input as llama.cpp's CPU
    dot products do (:func:`gguf_activation`: int8 per block of 32), so the reference computes
    what llama.cpp computes. GPTQ keeps the float input's Hessian: solving against the int8 input
    (``WeightAlgorithmConfig.quantized_inputs``, an opt-in) gave a worse file under llama.cpp
    (SmolLM2 Q4_0: 33.75 against 33.24, docs/llm.md).

    Example::

        >>> qcompile.presets.gguf_recipe("Q5_0", "awq").name
        'gguf-q5_0-awq'
    """
    if gguf_type not in _LEGACY:
        from .errors import RecipeError, closest

        raise RecipeError("gguf_type", f"'{gguf_type}' is not a legacy GGUF block type; {closest(gguf_type, _LEGACY)}")
    bits, minimum = _LEGACY[gguf_type]
    name = f"gguf-{gguf_type.lower()}" + (f"-{algorithm}" if algorithm else "") + ("-a8" if activations else "")
    observer = "signed_max" if algorithm is None and not minimum and bits < 8 else "minmax"
    return _gguf(name, bits, minimum, algorithm, observer, activations)().validate()


def _gguf_k_mix(name: str, base: int, more: Optional[int], algorithm: Optional[str] = None) -> Callable[[], Recipe]:
    # model-independent: attn_v / ffn_down at Q{more}_K in every layer (llama.cpp: in about half,
    # llama_cpp_mix); the tied head / embedding at Q8_0, as in every preset at >= 8 bits (llama.cpp's
    # output type is Q6_K, or Q8_0 when rows are not whole super-blocks: llama_cpp_mix gives that)
    def make() -> Recipe:
        algo = None if algorithm is None else WeightAlgorithmConfig(algorithm)
        overrides = {} if more is None else {r"re:.*\.(v_proj|down_proj)$": LayerConfig(_gguf_k(more))}
        return Recipe(name=name, default=LayerConfig(_gguf_k(base)), embedding=LayerConfig(_gguf_block(8)),
                      weight_algorithm=algo, overrides=overrides)
    return make


# llama.cpp's k-quant mixes (llama_tensor_get_type_impl in src/llama-quant.cpp, Llama architecture,
# no experts): ftype -> (default type, the type of attn_v / ffn_down in use_more_bits layers)
_MIXES = {"q4_k_m": ("Q4_K", "Q6_K"), "q5_k_m": ("Q5_K", "Q6_K"), "q6_k": ("Q6_K", None)}
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}   # llama.cpp's tensor_type_fallback


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_cpp_mix(config, ftype: str = "q4_k_m", algorithm: Optional[str] = None,
                  activations: bool = False) -> tuple[Recipe, dict]:
    """The recipe that gives each layer of a Llama model (``config``: its transformers config) the
    GGUF type llama.cpp's own quantizer gives it for ``ftype`` (``"q4_k_m"``, ``"q5_k_m"``,
    ``"q6_k"``), as exact per-layer overrides, so the gguf backend writes every code bit for bit:
    attn_v and ffn_down get Q6_K in llama.cpp's ``use_more_bits`` layers (Q4_K_M/Q5_K_M), the output
    (the token embedding when tied) Q6_K, and a row that is not a multiple of 256 llama.cpp's fallback
    (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0; the tied output Q8_0). ``algorithm``: ``"gptq"`` or
    ``"awq"`` solves every layer on its grid. ``activations``: every Linear (the tied head too) also
    quantizes its input as llama.cpp's CPU dot products do (:func:`gguf_activation`: int8 per block
    of 32, or 256 for a k-quant weight), so qcompile's reference is the model llama.cpp runs (the
    recipe's name ends in ``-a8``; GPTQ then solves on the quantized inputs). Returns ``(recipe, {layer: (type, why)})``.

    Example::

        >>> recipe, types = qcompile.presets.llama_cpp_mix(model.config, "q4_k_m", "gptq")
        >>> types["model.layers.0.self_attn.v_proj"]
        ('Q8_0', 'Q6_K (use_more_bits layer 0 of 30); rows of 576 are not a multiple of 256: llama.cpp falls back to Q8_0')
    """
    if ftype not in _MIXES:
        from .errors import RecipeError, closest

        raise RecipeError("ftype", f"unknown llama.cpp mix '{ftype}'; {closest(ftype, _MIXES)}")
    base, more = _MIXES[ftype]
    n, hidden = config.num_hidden_layers, config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    rows = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": heads * head_dim,
            "gate_proj": hidden, "up_proj": hidden, "down_proj": config.intermediate_size}
    types: dict = {}

    def pick(layer, want, why, k, output=False):
        if k % 256:
            fallback = "Q8_0" if output else _K_FALLBACK[want]
            why += f"; rows of {k} are not a multiple of 256: llama.cpp falls back to {fallback}"
            want = fallback
        types[layer] = (want, why)

    for i in range(n):
        for proj, k in rows.items():
            part = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            layer = f"model.layers.{i}.{part}.{proj}"
            if more and proj in ("v_proj", "down_proj") and _use_more_bits(i, n):
                pick(layer, more, f"{more} (use_more_bits layer {i} of {n})", k)
            else:
                pick(layer, base, base, k)
    tied = getattr(config, "tie_word_embeddings", True)
    if tied:   # llama.cpp quantizes a tied token embedding as the output
        pick("model.embed_tokens", "Q6_K", "Q6_K (the output, tied to the embedding)", hidden, output=True)
    else:
        pick("model.embed_tokens", base, base, hidden)
        pick("lm_head", "Q6_K", "Q6_K (the output)", hidden, output=True)
    rtn = algorithm is None

    def config_of(t):
        return LayerConfig(gguf_spec(t, rtn), gguf_activation(t) if activations else None)

    overrides = {layer: config_of(t) for layer, (t, _) in types.items() if layer != "model.embed_tokens"}
    if activations and tied:   # the head reads the embedding's tensor (one spec: still tied) and its input is quantized
        overrides["lm_head"] = config_of(types["model.embed_tokens"][0])
    algo = None if algorithm is None else WeightAlgorithmConfig(
        algorithm, fold_only=algorithm == "awq")
    name = f"gguf-{ftype}" + (f"-{algorithm}" if algorithm else "") + ("-a8" if activations else "")
    recipe = Recipe(name=name, default=LayerConfig(_gguf_k(int(base[1]))),
                    embedding=LayerConfig(gguf_spec(types["model.embed_tokens"][0], rtn)), weight_algorithm=algo,
                    overrides=overrides)
    return recipe.validate(), types


PRESETS.update({
    "float": lambda: Recipe(name="float"),
    "w8a8": _w8a8,
    "w8a8-dynamic": _w8a8_dynamic,
    "w8": _w8,
    "w4-g64": _w4(64),
    "w4-g128": _w4(128),
    "w4-g32-a8": _w4_a8(32),
    "w4-g64-a8": _w4_a8(64),
    "w4-g128-a8": _w4_a8(128),
    # the default group: the one >= 2x float ONNX at M = 1 (768 x 3072) alone and interleaved with a
    # margin in every run (g32/g64 came within 1% of 2x alone in one run each; benchmarks/test_onnx_int4.py)
    "w4-a8": _w4_a8(128, "w4-a8"),
    "w8-g32-a8": _w8_a8(32),
    "w8-g64-a8": _w8_a8(64),
    "w4a8": _low_bit("w4a8", "int4", "uint8"),
    "w4a4": _low_bit("w4a4", "int4", "uint4"),
    "w2a8": _low_bit("w2a8", "int2", "uint8"),
    "w4a8-rot": _rotated("w4a8-rot", "uint8", "gptq"),
    "w4a4-rot": _rotated("w4a4-rot", "uint4"),
    "w4-g64-gptq": _weight_only("w4-g64-gptq", _uint_group(4, 64), "gptq"),
    "w4-g64-awq": _weight_only("w4-g64-awq", _uint_group(4, 64), "awq"),
    "w4-g128-gptq": _weight_only("w4-g128-gptq", _uint_group(4, 128), "gptq"),
    "w4-g128-rot-gptq": _weight_only("w4-g128-rot-gptq", _uint_group(4, 128), "gptq", RotationConfig()),
    "w4-g128-awq": _weight_only("w4-g128-awq", _uint_group(4, 128), "awq"),
    "w3-g64": _weight_only("w3-g64", _uint_group(3, 64)),
    "w5-g64-gptq": _weight_only("w5-g64-gptq", QuantSpec("uint5", "per_group", symmetric=False, group_size=64,
                                                         scale_dtype="float16"), "gptq"),
    "w2-g64": _weight_only("w2-g64", _uint_group(2, 64)),
    "nf4": _weight_only("nf4", QuantSpec("nf4", "per_group", symmetric=True, group_size=64, scale_dtype="int8")),
    "q4_k_m": _q4_k_m(),
    "q4_k_m-gptq": _q4_k_m("gptq"),
    "q4_k_m-gptq-min": _q4_k_m("gptq", "int8"),
    # llama.cpp's Q6_K: symmetric 6-bit codes in sub-blocks of 16 with 8-bit sub-block scales
    # (6.5625 bpw); here int6 g16, int8 double-quantized scales (~6.51 bpw), solved by GPTQ
    "q6_k": _weight_only("q6_k", QuantSpec("int6", "per_group", symmetric=True, group_size=16,
                                           scale_dtype="int8"), "gptq"),
    # uint5 g64 with int8 double-quantized scales and uint8 zero points (~5.25 bpw), by GPTQ
    "w5-g64-dq-gptq": _weight_only("w5-g64-dq-gptq", QuantSpec("uint5", "per_group", symmetric=False, group_size=64,
                                                               scale_dtype="int8"), "gptq"),
    "fp8-e4m3": _weight_only("fp8-e4m3", QuantSpec("fp8_e4m3", "per_channel", symmetric=True)),
    # llama.cpp's legacy block types, bit for bit (qcompile.backends.gguf.blocks)
    "gguf-q8_0": _gguf("gguf-q8_0", 8),
    # round to nearest with llama.cpp's own scale choice (the signed max maps to the lowest code)
    "gguf-q4_0": _gguf("gguf-q4_0", 4, observer="signed_max"),
    "gguf-q4_1": _gguf("gguf-q4_1", 4, minimum=True),
    "gguf-q5_0": _gguf("gguf-q5_0", 5, observer="signed_max"),
    "gguf-q5_1": _gguf("gguf-q5_1", 5, minimum=True),
    "gguf-q4_0-gptq": _gguf("gguf-q4_0-gptq", 4, algorithm="gptq"),
    "gguf-q4_1-gptq": _gguf("gguf-q4_1-gptq", 4, minimum=True, algorithm="gptq"),
    "gguf-q5_0-gptq": _gguf("gguf-q5_0-gptq", 5, algorithm="gptq"),
    # llama.cpp's k-quants bit for bit, model-independent (exact per-layer mix: llama_cpp_mix)
    "gguf-q4_k_m": _gguf_k_mix("gguf-q4_k_m", 4, 6),
    "gguf-q4_k_m-gptq": _gguf_k_mix("gguf-q4_k_m-gptq", 4, 6, "gptq"),
    "gguf-q5_k_m": _gguf_k_mix("gguf-q5_k_m", 5, 6),
    "gguf-q6_k": _gguf_k_mix("gguf-q6_k", 6, None),
})


def recipes() -> list[str]:
    """Names of the built-in presets."""
    return list(PRESETS)
