"""Writing a transformers checkpoint folder whose tensors and `quantization_config` belong to another format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn

from .checksums import checksum_metadata
from .layers import tied_output_embedding
from .safetensors_file import sort_metadata


def output_embedding_key(model: nn.Module) -> str | None:
    """State-dict key of the output embedding's weight (e.g. `lm_head.weight`), None when there is none."""
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    return None if name is None else f"{name}.weight"


def write_checkpoint(
    model: nn.Module, folder: Path, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any]
) -> None:
    """Write `tensors` as (sharded) safetensors, and `config.json` = the model's config with `quantization_config`
    replaced, plus `generation_config.json` when the model has one. A tied output embedding is written once, under
    the input embedding's name, as `save_pretrained` does. The safetensors metadata records every tensor's SHA-256
    (`checksums.py`), so `hf_ptq.verify` checks exports too."""
    discard = []
    if tied_output_embedding(model) and (key := output_embedding_key(model)) in tensors:
        discard.append(key)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if k not in discard}
    save_torch_state_dict(tensors, folder, metadata={"format": "pt", **checksum_metadata(tensors)})
    for file in folder.glob("*.safetensors"):
        sort_metadata(file)  # reproducible bytes
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
