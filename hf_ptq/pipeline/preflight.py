"""Checks of a config against the model it will quantize, run once the model's config is known and before any weight
is read (`from_pretrained` calls them from the quantizer's `_process_model_before_weight_loading`, on a model
whose parameters are still on the meta device; `hf_ptq.quantize` at its start).

What the config alone cannot tell: whether `seq_len` fits the model's positions, whether the calibration token ids
fit its vocabulary (a bad id otherwise ends a long load with a bare `IndexError` from the embedding), whether
the names in `modules_to_not_convert` name anything in this model, and whether an encoder-decoder model has the two
stacks of blocks and the decoder start token its calibration needs (`stacks.check_stacks`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from ..calibration.data import calibration_batches, is_pretokenized, resolve_tokenizer
from ..calibration.limits import check_batches, check_positions, check_tokenizer_vocabulary
from .stacks import check_stacks

logger = logging.getLogger("hf_ptq")

# Config attributes holding a model's position limit (GPT-2 and its relatives: n_positions).
_POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions")


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (what a token id must stay below), else `config.vocab_size`, else None."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    rows = getattr(embedding, "num_embeddings", None) or getattr(_text_config(model), "vocab_size", None)
    return int(rows) if isinstance(rows, int) else None


def position_limit(model: nn.Module) -> tuple[str, int] | None:
    """(config attribute, value) of the longest sequence the model takes, or None when its config has none."""
    config = _text_config(model)
    for name in _POSITION_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return getattr(config, "attribute_map", {}).get(name, name), value  # as the config spells it
    return None


def unmatched_modules(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """The entries of `patterns` (modules_to_not_convert) that match no module of `model`, matched as transformers'
    `should_convert_module` matches them (prefix up to a `.`, regex with that boundary, or suffix)."""
    names = [name for name, _ in model.named_modules() if name]
    return [p for p in patterns or [] if all(should_convert_module(name, [p]) for name in names)]


def warn_unmatched_modules(model: nn.Module, patterns: list[str] | None) -> None:
    """One warning listing the `modules_to_not_convert` entries that match no module of `model` (a typo keeps
    nothing in full precision)."""
    missing = unmatched_modules(model, patterns)
    if missing:
        logger.warning(
            "hf_ptq: modules_to_not_convert entries %s match no module of this %s, so they keep nothing in full "
            "precision. Entries match a module name from its start up to a '.', as a regex, or as a suffix: e.g. "
            "'lm_head', 'mlp.down_proj', 'model.layers.0' or r'model\\.layers\\.\\d+\\.mlp'.",
            missing,
            type(model).__name__,
        )


def prepare_calibration(model: nn.Module, config: Any, tokenizer: Any = None) -> list[torch.Tensor] | None:
    """Check `config` against `model` and build its calibration batches, before any weight is read.

    Warns about unmatched `modules_to_not_convert`; refuses an encoder-decoder model whose stacks cannot be walked, a
    `seq_len` beyond the model's positions (text and data-free calibration), a tokenizer larger than the model's
    vocabulary, and token ids or sample lengths the model cannot take. Returns the token batches, or None for
    data-free calibration (`dataset=None`, sampled later from the loaded model). `tokenizer` overrides
    `config.tokenizer`; the default is the model's own.
    """
    cls = type(config).__name__
    check_stacks(model)
    warn_unmatched_modules(model, config.modules_to_not_convert)
    positions = position_limit(model)
    vocab = vocabulary_size(model)
    if config.dataset is None:
        check_positions(cls, config.seq_len, positions)
        return None
    model_path = getattr(model, "name_or_path", None)
    field = "dataset"
    if not is_pretokenized(config.dataset):
        check_positions(cls, config.seq_len, positions)
        tokenizer = resolve_tokenizer(tokenizer if tokenizer is not None else config.tokenizer, model_path)
        if vocab is not None:
            check_tokenizer_vocabulary(cls, tokenizer, vocab)
        field = "tokenizer"
    batches = calibration_batches(config, tokenizer, model_path)
    check_batches(cls, batches, vocab, positions, field)
    return batches
