"""Layer-by-layer quantization of a transformers decoder-only model stored as a directory of
safetensors shards, never holding the float model in memory.

The model's skeleton is built on the ``meta`` device (no memory); the token embedding is loaded,
and the calibration ids are run through the model up to a forward pre-hook on the first decoder
layer, which records that layer's inputs as transformers computes them (hidden states, rotary
``position_embeddings``, causal mask). Then, one step at a time::

    embed            the embedding, captured alone
    layers/000 ...   each decoder block: weights read from the memory-mapped shards, captured with
                     torch.export on the recorded inputs, quantized by the SAME stage list as the
                     whole-model path (:func:`qcompile.pipeline.ptq_stages`: smoothing, GPTQ/AWQ,
                     observers, calibration, convert), saved, freed
    head             the final norm and the LM head, on the last block's outputs

Each block's outputs (its graph after the weight algorithm, before observers: what the next block
sees in the whole-model path, where GPTQ runs the model sequentially) are the next block's inputs.
Each step computes in float32 (as the whole-model path does); the hidden states between blocks
are kept in the checkpoint's dtype (bf16 for a bf16 checkpoint). Each finished step is a program
artifact written atomically; the hidden states after it go to ``.resume.safetensors`` (atomic),
so a killed run restarts at the first unfinished step with the same inputs, and produces the same
bytes. The layout and the loader are in :mod:`qcompile.blockwise_artifact`.

Example::

    >>> quantize_directory("models/llama", Recipe.preset("w4-g64-gptq"), ids_list, "out/llama-w4")
    >>> qm = qcompile.load("out/llama-w4"); logits = qm(ids)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .atomic import MANIFEST, atomic_file
from .backends.base import placement
from .blockwise_spill import SpilledHidden, nbytes, parse_bytes, write_hidden
from .blockwise_artifact import CONFIG, EMBED, HEAD, is_blockwise, layer_dir, write_blockwise_manifest
from .blockwise_tables import QuantizedEmbedding, QuantizedHead, RowCodes, gather_rows, row_separable, table_step
from .calibration import iterate
from .capture import capture
from .errors import ArtifactError, InputError
from .memory import peak_rss_mb, release_freed_memory, reset_peak_rss, return_large_frees_to_os
from .model import PreparedModel
from .passes.infra import PassManager, PassResult
from .pipeline import CAPTURE, OBSERVE, convert, ptq_stages
from .recipe import Recipe
from .scope import check_patterns_used, match_pattern, resolve_layer_config

# transformers model types whose causal LM is model.{embed_tokens, rotary_emb, layers, norm} + lm_head
SUPPORTED_TYPES = ("llama", "qwen2", "mistral")
RESUME, MARKER, NEXT = ".resume.safetensors", ".qcompile-blockwise", ".hidden-next.safetensors"


def is_model_directory(path) -> bool:
    """Whether ``path`` is a directory holding a transformers ``config.json`` (the path
    :func:`qcompile.quantize` streams block by block)."""
    return isinstance(path, (str, Path)) and Path(path).is_dir() and (Path(path) / CONFIG).is_file()


class ShardReader:
    """Reads named tensors from a model directory's safetensors shards. Each read opens the shard
    memory-mapped and closes it after the step, so pages of the file do not stay resident."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (model_dir / "model.safetensors").is_file():
            from safetensors import safe_open
            with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise InputError(f"'{model_dir}' has neither model.safetensors nor model.safetensors.index.json: "
                             f"layer-by-layer quantization reads a model saved as safetensors shards "
                             f"(save_pretrained)")

    def shard_of(self, key: str) -> Path:
        """The shard file holding tensor ``key``."""
        if key not in self.weight_map:
            raise InputError(f"'{self.dir}': tensor '{key}' is missing from the safetensors shards")
        return self.dir / self.weight_map[key]

    def load(self, module: nn.Module, prefix: str, dtype: torch.dtype, aliases: Optional[dict] = None) -> nn.Module:
        """Materialize ``module`` (on ``meta``) from the tensors ``prefix + name``. ``aliases``:
        stored name for a missing one (a tied head reads the embedding)."""
        from safetensors import safe_open

        state = {}
        with ExitStack() as stack:
            handles = {}
            for name in module.state_dict():
                key = prefix + name
                if key not in self.weight_map and aliases and key in aliases:
                    key = aliases[key]
                shard = self.weight_map.get(key)
                if shard is None:
                    raise InputError(f"'{self.dir}': tensor '{key}' is missing from the safetensors shards")
                if shard not in handles:
                    handles[shard] = stack.enter_context(safe_open(str(self.dir / shard), framework="pt"))
                state[name] = handles[shard].get_tensor(key).to(dtype)
        module.load_state_dict(state, assign=True, strict=True)
        return module


class _Stop(Exception):
    pass


class _Embed(nn.Module):
    def __init__(self, embed):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = embed

    def forward(self, input_ids):
        return self.model.embed_tokens(input_ids)


class _Block(nn.Module):
    """Decoder block ``index`` under its whole-model path (``model.layers.<index>``), so recipe
    patterns and report names are the same as in the whole-model path."""

    def __init__(self, index: int, layer):
        super().__init__()
        self.index = str(index)
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({self.index: layer})

    def forward(self, hidden_states, cos, sin):
        return _first(self.model.layers[self.index](hidden_states, attention_mask=None, position_embeddings=(cos, sin)))


class _MaskedBlock(_Block):
    def forward(self, hidden_states, cos, sin, attention_mask):
        return _first(self.model.layers[self.index](hidden_states, attention_mask=attention_mask,
                                                    position_embeddings=(cos, sin)))


class _Head(nn.Module):
    def __init__(self, norm, lm_head):
        super().__init__()
        self.model = nn.Module()
        self.model.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden_states):
        return self.lm_head(self.model.norm(hidden_states))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def load_skeleton(model_dir: Path):
    """(causal LM on ``meta``, config). Raises :class:`InputError` naming what is missing when the
    directory is not a supported decoder-only model."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise ImportError(f"layer-by-layer quantization needs transformers (pip install qcompile[llm]): {exc}") from exc
    if not (model_dir / CONFIG).is_file():
        raise InputError(f"'{model_dir}' has no {CONFIG}: not a transformers model directory")
    config = AutoConfig.from_pretrained(str(model_dir))
    if config.model_type not in SUPPORTED_TYPES:
        raise InputError(f"'{model_dir}': model_type '{config.model_type}' is not a supported decoder-only family for "
                         f"layer-by-layer quantization ({', '.join(SUPPORTED_TYPES)})")
    config.use_cache = False
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    base = getattr(lm, "model", None)
    for owner, names in ((base, ("embed_tokens", "rotary_emb", "layers", "norm")), (lm, ("lm_head",))):
        for name in names:
            if owner is None or not hasattr(owner, name):
                raise InputError(f"'{model_dir}': the {config.model_type} model has no '{name}' module "
                                 f"(layer-by-layer quantization needs model.embed_tokens, rotary_emb, layers, norm "
                                 f"and lm_head)")
    base.rotary_emb = type(base.rotary_emb)(config=config)   # no stored weights: built on the CPU
    return lm, config


def _calibration_ids(calibration: Iterable, max_samples: Optional[int]) -> list[torch.Tensor]:
    ids = []
    for item in iterate(calibration, max_samples):
        t = item.get("input_ids") if isinstance(item, dict) else item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.is_floating_point():
            raise InputError("layer-by-layer calibration items must be token ids [batch, seq] (a tensor, a tuple "
                             "starting with one, or a dict with 'input_ids')")
        ids.append(t)
    if not ids:
        raise InputError("layer-by-layer quantization needs calibration token ids: calibration is empty")
    return ids


def _layer_inputs(lm, ids: list[torch.Tensor], embeds: list[torch.Tensor]) -> list[dict]:
    """The first decoder layer's inputs per calibration item, as the model computes them from the
    embedded ids ``embeds`` (the embedding itself is never loaded whole)."""
    seen = {}

    def hook(_module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = kwargs
        raise _Stop

    handle = lm.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    out = []
    try:
        with torch.no_grad():
            for e in embeds:
                try:
                    lm.model(inputs_embeds=e, use_cache=False)
                except _Stop:
                    pass
                cos, sin = seen["kwargs"]["position_embeddings"]
                out.append({"hidden": seen["hidden"], "cos": cos, "sin": sin,
                            "mask": seen["kwargs"].get("attention_mask")})
    finally:
        handle.remove()
    return out


def _check_recipe(recipe: Recipe, lm) -> None:
    """Whole-model checks the per-step captures cannot make: every recipe pattern matches some
    layer of the whole model; keep_first/keep_last (which need the order of all layers) refused."""
    if recipe.keep_first or recipe.keep_last:
        raise NotImplementedError("layer-by-layer quantization does not take keep_first/keep_last yet (they need the "
                                  "whole model's layer order): name the layers in keep_float instead")
    used, layers = set(), []
    for name, m in lm.named_modules():
        kind = "embedding" if isinstance(m, nn.Embedding) else "linear" if isinstance(m, nn.Linear) else None
        if kind:
            layers.append(name)
            resolve_layer_config(recipe, name, type(m).__name__, kind, used=used)
    check_patterns_used(recipe, used, layers)


def _scoped(recipe: Recipe, module: nn.Module) -> Recipe:
    """``recipe`` with only the patterns that match a layer of ``module`` (checked once on the
    whole model by :func:`_check_recipe`)."""
    mods = [(n, type(m).__name__) for n, m in module.named_modules()]

    def used(p):
        return any(match_pattern(p, n, t) for n, t in mods)

    return dataclasses.replace(recipe, overrides={p: c for p, c in recipe.overrides.items() if used(p)},
                               keep_float=tuple(p for p in recipe.keep_float if used(p)))


def _quantize_step(module: nn.Module, recipe: Recipe, items: list, outputs=None, dynamic_shapes="auto"):
    """The whole-model pipeline on one step's module: (QuantizedModel, ``outputs(produce)`` or None),
    ``produce(k)`` computing item ``k``'s output of the graph after the weight algorithm, before
    observers (``outputs`` keeps them where it wants, one at a time)."""
    t0 = time.perf_counter()
    cap = capture(module, items[0], dynamic_shapes=dynamic_shapes)
    run = PassManager(ptq_stages(recipe, placement(recipe.backend), cap, items, calibrate=True))
    run.record("capture", CAPTURE, time.perf_counter() - t0, PassResult(cap.graph_module, False))
    run.run(cap.graph_module, until=OBSERVE)
    outs = None
    if outputs is not None:
        with torch.no_grad():
            outs = outputs(lambda k: cap.graph_module(*items[k]))
    qmodel = convert(PreparedModel(cap.graph_module, cap, recipe, module, run), report_inputs=items[:1])
    return qmodel, outs


def _block_dims(masked: bool) -> dict:
    """The sequence free in every block input, one shared dim (``"auto"`` would let torch.export
    merge it with a head dim of the same size in the example and specialise both)."""
    seq = torch.export.Dim("seq", min=2)
    dims = {"hidden_states": {1: seq}, "cos": {1: seq}, "sin": {1: seq}}
    return {**dims, "attention_mask": {2: seq, 3: seq}} if masked else dims


def _fingerprint(model_dir: Path, recipe: Recipe, ids: list, dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode())
    h.update((model_dir / CONFIG).read_bytes())
    h.update(str(dtype).encode())
    for p in sorted(model_dir.glob("*.safetensors*")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    for t in ids:
        h.update(str(tuple(t.shape)).encode() + t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _open_run(out: Path, fingerprint: str) -> tuple[int, Optional[SpilledHidden]]:
    """(first step to run, hidden states after the previous step, read from the resume file item by
    item, or None). A run directory holds
    :data:`MARKER` (the run's fingerprint); another run's directory is refused, never mixed."""
    from safetensors import safe_open

    marker, resume = out / MARKER, out / RESUME
    if marker.is_file():
        if marker.read_text() != fingerprint:
            raise ArtifactError(f"'{out}' holds an unfinished layer-by-layer run of another model, recipe or "
                                f"calibration set: remove it or choose another output directory")
        if resume.is_file():
            with safe_open(str(resume), framework="pt") as f:
                meta = f.metadata()
                if meta.get("fingerprint") == fingerprint:
                    count = sum(1 for k in f.keys() if k.startswith("hidden."))
                    return int(meta["next_step"]), SpilledHidden(resume, count)
        return 0, None
    if out.exists() and any(out.iterdir()):
        if not is_blockwise(out):
            raise ArtifactError(f"'{out}' exists and is neither a layer-by-layer run nor its artifact; refusing to "
                                f"write into it")
        (out / MANIFEST).unlink()    # a finished artifact is rewritten step by step (each step atomic)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(marker) as tmp:
        tmp.write_text(fingerprint)
    return 0, None


def _save_resume(out: Path, next_step: int, hidden: list, fingerprint: str) -> None:
    from safetensors.torch import save_file

    with atomic_file(out / RESUME) as tmp:
        save_file({f"hidden.{i}": h.contiguous() for i, h in enumerate(hidden)}, str(tmp),
                  metadata={"next_step": str(next_step), "fingerprint": fingerprint})


def quantize_directory(model_dir: Union[str, Path], recipe: Recipe, calibration: Iterable,
                       out: Union[str, Path], *, activation_dtype: Optional[torch.dtype] = None,
                       max_memory: Union[int, str, None] = None, progress: Optional[bool] = None) -> Path:
    """Quantize the transformers decoder-only model in ``model_dir`` (safetensors shards) with a
    resolved ``recipe``, one decoder block at a time, into the directory ``out`` (see the module
    docstring); returns ``out``. ``calibration``: token ids ``[batch, seq]`` per item. Weights
    are computed on in float32; ``activation_dtype``: the dtype the hidden states are kept in
    between blocks (default: the checkpoint's; a lower precision than the checkpoint's changes the
    codes, so it is never chosen for you). ``max_memory`` (bytes, or ``"8GB"``, ``"512MiB"``): when
    a block's input and output hidden states together (in ``activation_dtype``) exceed it, they are
    kept on disk in ``out`` and read one item at a time (:mod:`qcompile.blockwise_spill`: same
    codes; the block's float32 working copies stay in memory). A killed run given the same arguments resumes
    at its first unfinished step; ``qcompile.load(out)`` reads the result.

    Example::

        >>> quantize_directory("models/llama", Recipe.preset("w4-g64-gptq"), ids_list, "out/llama-w4")
    """
    from tqdm.auto import tqdm

    model_dir, out = Path(model_dir), Path(out)
    budget = None if max_memory is None else parse_bytes(max_memory, "max_memory")
    return_large_frees_to_os()
    lm, config = load_skeleton(model_dir)
    reader = ShardReader(model_dir)
    _check_recipe(recipe, lm)
    act = activation_dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    act = getattr(torch, act) if isinstance(act, str) else act
    dtype = torch.float32
    ids = _calibration_ids(calibration, recipe.calibration.max_samples)
    fingerprint = _fingerprint(model_dir, recipe, ids, act)
    start, hidden = _open_run(out, fingerprint)
    with atomic_file(out / CONFIG) as tmp:
        shutil.copyfile(model_dir / CONFIG, tmp)
    base, n = lm.model, config.num_hidden_layers
    steps = [EMBED] + [layer_dir(i) for i in range(n)] + [HEAD]
    show = recipe.calibration.progress if progress is None else progress
    bar = tqdm(total=len(steps), initial=start, desc="layer-by-layer", unit="block", disable=not show)
    report = []
    t_run = time.perf_counter()

    run_peak = [peak_rss_mb()]

    def record(name: str, t0: float, qmodel=None) -> None:
        """The step's time and its own peak RSS (everything resident during it, the hidden states
        between blocks included; :func:`begin` started the peak)."""
        peak = peak_rss_mb()
        run_peak[0] = max(run_peak[0], peak)
        report.append({"step": name, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak,
                       "loadavg_1m": os.getloadavg()[0],   # the host may be shared: times read beside it
                       **({"timings_s": qmodel.report.timings_s} if qmodel is not None else {})})
        bar.set_postfix_str(f"{name} peak RSS {peak:.0f} MiB (run {run_peak[0]:.0f})")

    def begin() -> float:
        """A step starts: what the last one freed goes back to the OS, and a new peak starts."""
        release_freed_memory()
        reset_peak_rss()
        return time.perf_counter()

    def finish(step: int, name: str, qmodel, t0: float, next_hidden):
        """Save the step, then make its outputs the resume point; returns them."""
        qmodel.save(out / name)
        if isinstance(next_hidden, SpilledHidden):   # already on disk, with this step's metadata
            os.replace(next_hidden.path, out / RESUME)
            next_hidden = next_hidden.moved(out / RESUME)
        else:
            _save_resume(out, step + 1, next_hidden, fingerprint)
        record(name, t0, qmodel)
        bar.update(1)
        return next_hidden

    t0 = begin()
    embed_key = "model.embed_tokens.weight"
    inputs = _layer_inputs(lm, ids, gather_rows(reader.shard_of(embed_key), embed_key, ids))
    first = [x.pop("hidden") for x in inputs]   # float32: not kept beside the stored copy
    spill = budget is not None and 2 * nbytes(first, act) > budget
    shapes = [tuple(h.shape) for h in first]

    def keep(produce, next_step: int):
        """Where a step's outputs go: a list in memory, or the spill file (same bytes)."""
        if spill:
            return write_hidden(out / NEXT, shapes, act, produce, {"next_step": next_step, "fingerprint": fingerprint})
        return [produce(k).to(act) for k in range(len(shapes))]

    if hidden is None:
        hidden = keep(lambda k: first[k], 1)
    elif not spill:
        hidden = list(hidden)
    del first
    record("record block inputs", t0)
    if start == 0:
        t0 = begin()
        cfg, _ = resolve_layer_config(recipe, "model.embed_tokens", "Embedding", "embedding")
        if row_separable(cfg):   # row chunk by row chunk: never the whole table in float32
            rc = RowCodes(reader.shard_of(embed_key), embed_key, cfg.weight)
            qmodel = table_step(QuantizedEmbedding(rc), rc, "model.embed_tokens", "embedding", recipe,
                                (ids[0],), time.perf_counter() - t0)
            del rc   # the codes live in qmodel until it is saved and dropped
        else:
            reader.load(base.embed_tokens, "model.embed_tokens.", dtype)
            qmodel, _ = _quantize_step(_Embed(base.embed_tokens), _scoped(recipe, _Embed(base.embed_tokens)),
                                       [(t,) for t in ids], )
            base.embed_tokens.to("meta")
        hidden = finish(0, EMBED, qmodel, t0, hidden)
        del qmodel
    masked = inputs[0]["mask"] is not None
    for i in range(max(start - 1, 0), n):
        t0 = begin()
        layer = reader.load(base.layers[i], f"model.layers.{i}.", dtype)
        block = (_MaskedBlock if masked else _Block)(i, layer)
        items = [(h.to(dtype), x["cos"], x["sin"]) + ((x["mask"],) if masked else ()) for h, x in zip(hidden, inputs)]
        qmodel, outs = _quantize_step(block, _scoped(recipe, block), items,
                                      outputs=lambda produce, step=i + 2: keep(produce, step),
                                      dynamic_shapes=_block_dims(masked))
        del items, hidden
        hidden = finish(i + 1, layer_dir(i), qmodel, t0, outs)
        del outs
        del qmodel, block
        base.layers[i].to("meta")
    t0 = begin()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_key = "model.embed_tokens.weight" if tied and "lm_head.weight" not in reader.weight_map else "lm_head.weight"
    cfg, source = resolve_layer_config(recipe, "lm_head", "Linear", "linear",
                                       tied_to="model.embed_tokens" if tied else None)
    norm = reader.load(base.norm, "model.norm.", dtype)
    if row_separable(cfg) and (tied or recipe.weight_algorithm is None):
        # a tied head is round-to-nearest in the whole-model path too (its tensor is the
        # embedding's, which GPTQ/AWQ do not solve)
        rc = RowCodes(reader.shard_of(head_key), head_key, cfg.weight)
        emb = recipe.embedding.weight if recipe.embedding is not None else None
        note = {"lm_head": "weight tied to model.embed_tokens: one shared quantized tensor" if emb == cfg.weight
                else f"weight tied to model.embed_tokens but its spec differs ({source}): untied, each "
                     f"quantized separately"} if tied else None
        qmodel = table_step(QuantizedHead(norm, rc), rc, "lm_head", "linear", recipe, (hidden[0].to(dtype),),
                            time.perf_counter() - t0, tied=note)
        del rc
    else:
        aliases = {"lm_head.weight": "model.embed_tokens.weight"} if tied else None
        head = _Head(norm, reader.load(lm.lm_head, "lm_head.", dtype, aliases))
        head_recipe = _scoped(recipe, head)
        if tied:
            # the whole-model path shares one tensor between a tied head and the embedding, so its
            # GPTQ/AWQ pass leaves the head round-to-nearest with the config a tied head gets
            head_recipe = dataclasses.replace(head_recipe, weight_algorithm=None,
                                              overrides={**head_recipe.overrides, "lm_head": cfg})
        qmodel, _ = _quantize_step(head, head_recipe, [(h.to(dtype),) for h in hidden], )
        del head
    qmodel.save(out / HEAD)
    record(HEAD, t0, qmodel)
    bar.update(1)
    bar.close()
    del qmodel
    meta = {"recipe": recipe.to_dict(), "source": str(model_dir), "activation_dtype": str(act),
            "activation_storage": {"where": "disk" if spill else "memory", "max_memory": budget,
                                   "bytes_per_copy": nbytes([torch.empty(s, device="meta") for s in shapes], act)},
            "calibration_items": len(ids), "report": {"steps": report, "seconds": time.perf_counter() - t_run,
                                                      "peak_rss_mb": run_peak[0]}}
    write_blockwise_manifest(out, meta, steps)
    del hidden
    (out / RESUME).unlink(missing_ok=True)
    (out / NEXT).unlink(missing_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    return out
