"""The stacks of blocks a calibrated walk goes through, in order, and how the inputs of each one are captured.

A decoder-only model (or an encoder) has one stack: its largest list of repeated blocks (`find_blocks`), captured by
the model's own forward on the calibration ids. An encoder-decoder model (`config.is_encoder_decoder`: T5, BART, ...)
has two, walked one after the other as llm-compressor's sequential pipeline does: the encoder's blocks on the
calibration ids, then the decoder's blocks on the decoder inputs (the ids shifted right behind
`decoder_start_token_id`, as in training) with the final hidden states of the already quantized encoder as their
cross-attention input, so the decoder's statistics see the encoder's quantization error. Both capture with their
blocks running (`capture_inputs(run_blocks=True)`): T5's block 0 computes the position bias the others receive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.devices import input_device
from ..methods import method_names, method_spec
from .blocks import find_blocks
from .capture import CapturedInputs, capture_inputs, no_cache_kwargs


@dataclass(frozen=True)
class Stack:
    """One list of blocks walked in order: its name in the model, the blocks, and `capture(batches)` giving block 0's
    inputs and every block's call arguments for calibration ids [b, seq] per batch (run when the walk reaches it)."""

    prefix: str
    blocks: nn.ModuleList
    capture: Callable[[list[torch.Tensor]], CapturedInputs]


def is_encoder_decoder(model: nn.Module) -> bool:
    """True for models whose config says `is_encoder_decoder` (T5, BART, Marian, ...)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def calibration_free_methods() -> list[str]:
    """The `PtqConfig` methods that quantize without calibration (rtn, int8, hqq, nf4, ...)."""
    return [n for n in method_names() if not method_spec(n).needs_calibration]


def decoder_start_token_id(model: nn.Module) -> int:
    """The token the decoder starts from, as `generate` picks it: `decoder_start_token_id` of the config or of the
    generation config, else their `bos_token_id`; ValueError naming the field when none is set."""
    configs = (model.config, getattr(model, "generation_config", None))
    for name in ("decoder_start_token_id", "bos_token_id"):
        for cfg in configs:
            value = getattr(cfg, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    raise ValueError(
        f"hf_ptq: {type(model).__name__} is an encoder-decoder model and its decoder blocks are calibrated on the "
        "calibration ids shifted right behind config.decoder_start_token_id, which is None (and so is "
        "bos_token_id): set model.config.decoder_start_token_id (T5: the pad id, 0), as generate() needs too."
    )


def decoder_input_ids(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids [b, seq] shifted right by one behind the decoder's start token: the decoder inputs of teacher forcing."""
    start = torch.full_like(ids[:, :1], decoder_start_token_id(model))
    return torch.cat([start, ids[:, :-1]], dim=1)


def model_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keyword arguments of one whole-model forward on calibration ids [b, seq], on the model's input device:
    `input_ids`, and `decoder_input_ids` for encoder-decoder models."""
    device = input_device(model)
    inputs = {"input_ids": ids.to(device)}
    if is_encoder_decoder(model):
        inputs["decoder_input_ids"] = decoder_input_ids(model, ids).to(device)
    return inputs


def input_embeddings(model: nn.Module) -> list[nn.Module]:
    """The modules turning ids into the first hidden states: the model's input embedding, and the encoder's and the
    decoder's own of encoder-decoder models (T5's `encoder.embed_tokens` shares `shared`'s weight, not the module)."""
    found = {id(m): m for m in [model.get_input_embeddings()]}
    if is_encoder_decoder(model):
        for part in encoder_and_decoder(model):
            embedding = part.get_input_embeddings()
            found.setdefault(id(embedding), embedding)
    return list(found.values())


def encoder_and_decoder(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) of an encoder-decoder model (`get_encoder()` / `get_decoder()`); ValueError naming the model
    class and the methods that need no calibration when it has no such pair holding Linear blocks."""
    try:
        encoder, decoder = model.get_encoder(), model.get_decoder()
        if encoder is model or decoder is model or encoder is None or decoder is None:
            raise AttributeError("no separate encoder and decoder")
        for part in (encoder, decoder):
            find_blocks(part)
    except (AttributeError, NotImplementedError, ValueError) as err:
        raise ValueError(
            f"hf_ptq: calibrated methods walk an encoder-decoder model's encoder and decoder blocks, and "
            f"{type(model).__name__} has no encoder / decoder pair holding Linear blocks ({err}). Quantize it with a "
            f"method that needs no calibration: PtqConfig(method=...) with one of {calibration_free_methods()}."
        ) from None
    return encoder, decoder


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def model_stacks(model: nn.Module) -> list[Stack]:
    """The stacks of `model` in walk order: one for decoder-only models and encoders, the encoder's then the
    decoder's for encoder-decoder models (ValueError as `encoder_and_decoder` says when they cannot be found)."""
    if not is_encoder_decoder(model):
        prefix, blocks = find_blocks(model)
        return [Stack(prefix, blocks, lambda batches: capture_inputs(model, blocks, batches))]
    encoder, decoder = encoder_and_decoder(model)
    names = _module_names(model)
    (_, enc_blocks), (_, dec_blocks) = find_blocks(encoder), find_blocks(decoder)
    device = input_device(model)

    def run_encoder(ids: torch.Tensor):
        return encoder(input_ids=ids.to(device))

    def capture_encoder(batches: list[torch.Tensor]) -> CapturedInputs:
        return capture_inputs(model, enc_blocks, batches, forward=run_encoder, run_blocks=True)

    def capture_decoder(batches: list[torch.Tensor]) -> CapturedInputs:
        extra = no_cache_kwargs(model)

        def run_decoder(ids: torch.Tensor):
            encoded = run_encoder(ids).last_hidden_state  # [b, seq, d]: the quantized encoder's output
            dec = decoder_input_ids(model, ids).to(device)
            return decoder(input_ids=dec, encoder_hidden_states=encoded, **extra)

        return capture_inputs(model, dec_blocks, batches, forward=run_decoder, run_blocks=True)

    return [
        Stack(names[id(enc_blocks)], enc_blocks, capture_encoder),
        Stack(names[id(dec_blocks)], dec_blocks, capture_decoder),
    ]


def check_stacks(model: nn.Module) -> None:
    """Before any weight is read (model on the meta device): an encoder-decoder model has the encoder and decoder
    blocks the walk needs and a decoder start token (ValueError naming the class and the fix otherwise)."""
    if is_encoder_decoder(model):
        model_stacks(model)
        decoder_start_token_id(model)
