"""How much calibration work a config may ask for, and checks of token batches against the model they feed.

Every check here runs before any weight is read: the bounds at config construction, the others once the model's
config (vocabulary, positions) and the tokenizer are known. Without them a bad token id surfaces as a bare
`IndexError: index out of range in self` from the embedding, after the whole model has been loaded.
"""

from __future__ import annotations

from typing import Any

import torch

from .self_generated import DEFAULT_MAX_TOKENS

# Calibration tokens (num_samples × seq_len) one config may ask for: 2**20 = 512 samples of 2048 tokens, 4x the usual
# GPTQ recipe (128 × 2048). The pipeline holds the hidden states of all of them at once (tokens × hidden × 2 bytes
# in bf16: 8 GiB at hidden 4096) and runs every block over all of them once per stage, so far larger totals only
# exhaust memory or run for days; quality stops improving long before.
MAX_CALIBRATION_TOKENS = 1 << 20
# Tokens data-free calibration samples from the model (one forward per token): see `self_generated.py`.
DATA_FREE_MAX_TOKENS = DEFAULT_MAX_TOKENS


def token_budget_error(cls: str, num_samples: int, seq_len: int) -> ValueError | None:
    """The error for `num_samples × seq_len` above `MAX_CALIBRATION_TOKENS`, else None."""
    total = num_samples * seq_len
    if total <= MAX_CALIBRATION_TOKENS:
        return None
    return ValueError(
        f"{cls}.num_samples={num_samples} with seq_len={seq_len} asks for {total} calibration tokens, more than the "
        f"{MAX_CALIBRATION_TOKENS} hf_ptq accepts (their hidden states are all held in memory and every block runs "
        f"over them): lower num_samples or seq_len so that num_samples × seq_len ≤ {MAX_CALIBRATION_TOKENS}."
    )


def data_free_error(cls: str, seq_len: int) -> ValueError | None:
    """The error for a data-free `seq_len` longer than the tokens data-free calibration samples, else None."""
    if seq_len <= DATA_FREE_MAX_TOKENS:
        return None
    return ValueError(
        f"{cls}.seq_len={seq_len} is invalid with dataset=None: data-free calibration samples at most "
        f"{DATA_FREE_MAX_TOKENS} tokens from the model (about one forward per token), fewer than one sample: lower "
        f"seq_len to at most {DATA_FREE_MAX_TOKENS}, or pass a dataset."
    )


def check_tokenizer_vocabulary(cls: str, tokenizer: Any, vocab_size: int) -> None:
    """Refuse a tokenizer with more tokens than the model's embedding has rows (its ids could index past it)."""
    try:
        size = len(tokenizer)
    except TypeError:  # a plain callable: its ids are checked after tokenization
        return
    if size > vocab_size:
        raise ValueError(
            f"{cls}.tokenizer has {size} tokens but the model's embedding has {vocab_size} (config.vocab_size): its "
            "ids would index past the embedding, so it is not this model's tokenizer. Pass the model's own tokenizer "
            f"({cls}(tokenizer=None) loads the one saved with the model), or resize the embedding first "
            "(model.resize_token_embeddings(len(tokenizer)))."
        )


def check_positions(cls: str, seq_len: int, positions: tuple[str, int] | None) -> None:
    """Refuse a `seq_len` beyond the model's position limit `positions` = (config attribute, value)."""
    if positions is not None and seq_len > positions[1]:
        raise ValueError(
            f"{cls}.seq_len={seq_len} is longer than the model's {positions[0]}={positions[1]}: calibration samples "
            f"must fit its positions. Lower seq_len to at most {positions[1]}."
        )


def check_batches(
    cls: str, batches: list[torch.Tensor], vocab_size: int | None, positions: tuple[str, int] | None, field: str
) -> None:
    """Token ids in [0, vocab_size) (only >= 0 when the size is unknown), samples no longer than `positions`, at
    most `MAX_CALIBRATION_TOKENS` in all. `field` is the config field the ids came from ("dataset" for
    pre-tokenized ids, "tokenizer" for text)."""
    fix = (
        "pass ids made by the model's own tokenizer"
        if field == "dataset"
        else "pass the model's own tokenizer (tokenizer=None loads the one saved with the model)"
    )
    for i, batch in enumerate(batches):
        low, high = int(batch.min()), int(batch.max())
        if low < 0:
            raise ValueError(f"{cls}.{field}: calibration batch {i} holds the negative token id {low}: {fix}.")
        if vocab_size is not None and high >= vocab_size:
            raise ValueError(
                f"{cls}.{field}: calibration batch {i} holds token id {high}, outside the model's vocabulary "
                f"[0, {vocab_size}) (the rows of its embedding, config.vocab_size): {fix}."
            )
        if positions is not None and batch.shape[-1] > positions[1]:
            raise ValueError(
                f"{cls}.{field}: calibration batch {i} has samples of {batch.shape[-1]} tokens, more than the model's "
                f"{positions[0]}={positions[1]}: cut the samples to at most {positions[1]} tokens."
            )
    total = sum(b.numel() for b in batches)
    if total > MAX_CALIBRATION_TOKENS:
        raise ValueError(
            f"{cls}.{field}: the calibration samples hold {total} tokens, more than the {MAX_CALIBRATION_TOKENS} "
            "hf_ptq accepts (their hidden states are all held in memory): pass fewer or shorter samples, or lower "
            "num_samples."
        )
