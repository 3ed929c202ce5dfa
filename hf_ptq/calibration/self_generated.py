"""Data-free calibration (`dataset=None`): text sampled from the model itself, no data and no network needed.

Pieces of `piece_len` tokens are sampled from the BOS token with top-k sampling, many in parallel, seeded (the
global RNG is left untouched), then concatenated and cut into samples of `seq_len`. Sampling costs about one
forward per token, so the total is capped at `max_tokens` (fewer samples, with a log line); a single sample longer
than the cap is refused (`PtqConfig` checks this at construction). Models that cannot generate (encoders) get
uniformly random token ids instead.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..core.devices import input_device
from ..core.progress import TokenProgress

logger = logging.getLogger("hf_ptq")

DEFAULT_MAX_TOKENS = 16384


def _bos_id(model: nn.Module) -> int:
    for cfg in (getattr(model, "generation_config", None), model.config):
        for name in ("bos_token_id", "decoder_start_token_id", "eos_token_id"):
            value = getattr(cfg, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


@torch.no_grad()
def sample_from_model(
    model: nn.Module,
    num_samples: int,
    seq_len: int,
    *,
    piece_len: int = 128,
    parallel: int = 64,
    top_k: int = 50,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> list[torch.Tensor]:
    """`min(num_samples, max_tokens // seq_len)` samples, LongTensors [seq_len]; ValueError when even one sample
    (`seq_len`) is longer than `max_tokens`."""
    if seq_len > max_tokens:
        raise ValueError(
            f"seq_len={seq_len}: data-free calibration samples at most {max_tokens} tokens from the model (about one "
            f"forward per token), fewer than one sample: lower seq_len to at most {max_tokens}, or pass a dataset."
        )
    count = min(num_samples, max_tokens // seq_len)
    if count < num_samples:
        logger.warning(
            "hf_ptq: data-free calibration samples %d x %d tokens from the model (capped at %d tokens), not the "
            "requested num_samples=%d; pass a dataset for more.",
            count,
            seq_len,
            max_tokens,
            num_samples,
        )
    total = count * seq_len
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    if not (hasattr(model, "can_generate") and model.can_generate()):
        logger.info("hf_ptq: %s cannot generate; calibrating on random token ids.", type(model).__name__)
        return list(torch.randint(0, vocab, (count, seq_len), generator=generator))
    piece_len = min(piece_len, seq_len)
    batches, produced = [], 0  # rows of each generate call
    while produced < total:
        batches.append(min(parallel, -(-(total - produced) // piece_len)))
        produced += batches[-1] * piece_len
    pieces = []
    bos, device = _bos_id(model), input_device(model)
    bar = tqdm(total=produced, desc="hf_ptq calibration: sampling text from the model", unit="token")
    with bar, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for n in batches:
            bar.update(n)  # the BOS token of each row
            start = torch.full((n, 1), bos, dtype=torch.long, device=device)
            out = model.generate(
                start,
                attention_mask=torch.ones_like(start),
                do_sample=True,
                top_k=top_k,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=piece_len - 1,
                min_new_tokens=piece_len - 1,
                pad_token_id=bos,
                stopping_criteria=[TokenProgress(bar)],
            )
            pieces.append(out.cpu().reshape(-1))
    flat = torch.cat(pieces)[:total]
    return list(flat.reshape(count, seq_len))
