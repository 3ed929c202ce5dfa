"""Evaluation text → token ids: a text file, a string, texts, a `datasets.Dataset`, token ids, or (no data) text
the reference model writes itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers.utils.logging import tqdm

from ..core.progress import TokenProgress

SELF_WRITTEN_PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works to a ten-year-old.",
    "Describe a busy market on a Saturday morning.",
    "What should I pack for a week of hiking in the mountains?",
)

_BAD_DATA = (
    "evaluate(data=...) got {}: pass a text file path, a string, a list of strings, a datasets.Dataset, a "
    "LongTensor of token ids, or None (text written by the reference model)."
)


def describe_data(data: Any, text_column: str = "text") -> str:
    """One line naming the evaluation data, for reports."""
    if data is None:
        return "text written by the reference model itself (no data needed)"
    if isinstance(data, torch.Tensor):
        return f"{data.numel()} given token ids"
    if isinstance(data, os.PathLike) or (isinstance(data, str) and _is_file(data)):
        return f"file {Path(data).name}"
    if isinstance(data, str):
        return f"a string of {len(data)} characters"
    if isinstance(data, (list, tuple)):
        return f"{len(data)} texts"
    if hasattr(data, "column_names"):
        return f"datasets.Dataset column {text_column!r} ({len(data)} rows)"
    raise TypeError(_BAD_DATA.format(type(data).__name__))


def _is_file(text: str) -> bool:
    return "\n" not in text and len(text) < 4096 and os.path.isfile(text)


def data_text(data: Any, text_column: str = "text") -> str:
    """The text of `data`: a file (a path, or a string naming an existing file), the string itself, texts joined
    by blank lines, or a `datasets.Dataset`'s `text_column` joined by blank lines (transformers' recipe)."""
    if isinstance(data, os.PathLike) or (isinstance(data, str) and _is_file(data)):
        return Path(data).read_text(encoding="utf-8")
    if isinstance(data, str):
        return data
    if isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        return "\n\n".join(data)
    if hasattr(data, "column_names"):  # datasets.Dataset
        if text_column not in data.column_names:
            raise ValueError(
                f"evaluate(data=...): the dataset has no column {text_column!r} (columns: {data.column_names}); "
                "pass text_column=... naming its text column."
            )
        return "\n\n".join(data[text_column])
    raise TypeError(_BAD_DATA.format(type(data).__name__))


def data_ids(data: Any, tokenizer: Any, text_column: str = "text") -> torch.Tensor:
    """1-D LongTensor of the evaluation tokens (`data` not None); token ids are used as given."""
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"evaluate(data=...): token ids must be an integer tensor, got {data.dtype}")
        return data.reshape(-1).long().cpu()
    text = data_text(data, text_column)
    if tokenizer is None:
        raise ValueError("evaluate(data=...) holds text, which needs a tokenizer: pass tokenizer=...")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids.reshape(-1)


@torch.no_grad()
def self_written_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    tokens_per_prompt: int = 96,
    prompts: tuple[str, ...] = SELF_WRITTEN_PROMPTS,
    seed: int = 0,
) -> torch.Tensor:
    """1-D LongTensor: `tokens_per_prompt` tokens that `model` samples (top-p 0.95, temperature 0.8, seeded) after
    each prompt (as a chat turn when the tokenizer has a chat template), concatenated. Data-free evaluation text;
    the prompts themselves are not part of it."""
    device = next(model.parameters()).device
    rows = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            chat = [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = ids["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        rows.append(ids.reshape(-1))
    width = max(r.numel() for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):  # left padding: every prompt ends where generation starts
        batch[i, width - r.numel() :], mask[i, width - r.numel() :] = r, 1
    total = len(rows) * tokens_per_prompt
    bar = tqdm(total=total, desc="hf_ptq eval text: sampling it from the model", unit="token")
    with bar, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            batch.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=tokens_per_prompt,
            min_new_tokens=tokens_per_prompt,
            do_sample=True,
            top_p=0.95,
            temperature=0.8,
            pad_token_id=pad,
            stopping_criteria=[TokenProgress(bar)],
        )
    return out[:, width:].reshape(-1).cpu()
