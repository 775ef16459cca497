"""The saved form of a model quantized block by block (:mod:`qcompile.blockwise`), and the loader
that assembles it into a model that runs.

Layout of a saved directory::

    embed/           a program artifact (qcompile.artifact): the token embedding
    layers/000/ ...  one program artifact per decoder block, ``forward(hidden, cos, sin[, mask])``
    head/            a program artifact: the final norm and the LM head, ``forward(hidden) -> logits``
    config.json      the source model's transformers config (the skeleton the loader builds)
    qcompile.json    the manifest, written last: ``blockwise_version``, the recipe, the source, the
                     per-step report (seconds, peak RSS) and the size and sha256 of config.json and
                     of every program's own manifest (which checksums that program's files)

Why one program per block and not one whole-model program: the runner never holds the model, so
it never has a whole-model graph to export; each block's program is exactly what
:class:`~qcompile.model.QuantizedModel.save` writes (atomic, checksummed, no pickle), so a finished
block is a finished checkpoint, and a killed run resumes at the first block without one. The
rotary embedding and the causal mask are recomputed by transformers' own model code from
``config.json`` at load time (they hold no weights).

Imports :mod:`qcompile.artifact` and :mod:`qcompile.atomic`; transformers only inside the loader.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .artifact import load_program
from .atomic import MANIFEST, atomic_file, read_manifest, write_manifest
from .errors import ArtifactError

BLOCKWISE_VERSION = 1
KIND = "qcompile blockwise artifact"
CONFIG = "config.json"
EMBED, HEAD = "embed", "head"


def layer_dir(index: int) -> str:
    """The program directory of decoder block ``index``, relative to the artifact."""
    return f"layers/{index:03d}"


def is_blockwise(path: Union[str, Path]) -> bool:
    """Whether ``path`` holds a finished blockwise artifact (its manifest says so)."""
    mf = Path(path) / MANIFEST
    try:
        return mf.is_file() and "blockwise_version" in json.loads(mf.read_bytes())
    except (OSError, ValueError):
        return False


def write_blockwise_manifest(out: Union[str, Path], meta: dict, programs: list[str]) -> dict:
    """Write the manifest of a finished run, atomically and last: it lists ``config.json`` and
    each program's manifest (each checksums its own files), so its presence marks the artifact
    complete."""
    out = Path(out)
    files = [CONFIG] + [f"{p}/{MANIFEST}" for p in programs]
    body = dict(meta, blockwise_version=BLOCKWISE_VERSION, programs=programs)
    with atomic_file(out / MANIFEST) as tmp:
        return write_manifest(out, body, files, name=tmp.name)


class ProgramModule(nn.Module):
    """A loaded program called with plain tensors (``ExportedProgram.module()``)."""

    def __init__(self, path: Path):
        super().__init__()
        ep, self.meta = load_program(path)
        self.program = ep.module()

    def forward(self, *args):
        return self.program(*args)


class LoadedBlock(nn.Module):
    """Stands in for a transformers decoder layer: takes its call (hidden states, the mask and the
    rotary ``position_embeddings`` the model computes) and runs the block's program."""

    def __init__(self, path: Path):
        super().__init__()
        self.block = ProgramModule(path)
        self.has_mask = "attention_mask" in self.block.meta["binder"]["positional"]

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **_):
        cos, sin = position_embeddings
        args = (hidden_states, cos, sin) + ((attention_mask,) if self.has_mask else ())
        return self.block(*args)


class BlockwiseModel(nn.Module):
    """A blockwise artifact assembled into the transformers causal LM it came from: ``model(ids)``
    returns the logits ``[batch, seq, vocab]``. ``manifest``: the saved manifest (recipe, source,
    per-step report)."""

    def __init__(self, lm: nn.Module, manifest: dict):
        super().__init__()
        self.lm = lm
        self.manifest = manifest
        self.recipe_name = manifest.get("recipe", {}).get("name")

    @property
    def report(self) -> dict:
        """Per step (embed, each block, head): seconds, peak RSS and the pipeline's phase timings."""
        return self.manifest.get("report", {})

    def forward(self, input_ids: torch.Tensor, **kwargs):
        with torch.no_grad():
            return self.lm(input_ids=input_ids, use_cache=False, **kwargs).logits


def load_blockwise(path: Union[str, Path]) -> BlockwiseModel:
    """Load what :func:`qcompile.blockwise.quantize_directory` wrote (checks the manifest, then
    every program's sizes and checksums) and assemble it on transformers' model code.

    Example::

        >>> qm = load_blockwise("out/llama-w4")      # or qcompile.load("out/llama-w4")
        >>> logits = qm(ids)
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise ImportError(f"loading a blockwise artifact needs transformers (pip install qcompile[llm]): {exc}") \
            from exc
    path = Path(path)
    meta = read_manifest(path, version_key="blockwise_version", version=BLOCKWISE_VERSION, kind=KIND,
                         required=[CONFIG])
    config = AutoConfig.from_pretrained(str(path))
    config.use_cache = False
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    base = lm.model
    base.rotary_emb = type(base.rotary_emb)(config=config)      # no weights: recomputed on the CPU
    base.embed_tokens = ProgramModule(path / EMBED)
    base.layers = nn.ModuleList(LoadedBlock(path / layer_dir(i)) for i in range(config.num_hidden_layers))
    base.norm = nn.Identity()                                    # the head program holds the final norm
    lm.lm_head = ProgramModule(path / HEAD)
    missing = [p for p in meta.get("programs", []) if not (path / p).is_dir()]
    if missing:
        raise ArtifactError(f"'{path}': programs {missing} are listed in {MANIFEST} but missing")
    return BlockwiseModel(lm, meta)

