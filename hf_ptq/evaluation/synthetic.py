"""Synthetic checkpoints with the shapes of real models, for measuring cost and speed at real sizes offline.

`write_synthetic_checkpoint(folder, config)` writes a safetensors checkpoint (sharded as `save_pretrained` shards,
with its index) whose tensors have the names, shapes and dtype the model class of `config` expects, filled with
random values: Linear and embedding weights ~ N(0, initializer_range), biases 0, norm weights 1 with a few
large-magnitude channels per norm (the activation outliers AWQ and SmoothQuant exist to move). Each tensor is made
from its own seed (the checkpoint does not depend on the shard size) and each shard is written before the next is
made, so an 8B checkpoint is written while holding one shard. The folder appears whole or not at all
(`hf_ptq.folders.staged_folder`).

Quality figures of such a model mean nothing: its logits are noise. What it measures is what does not depend on
the values: time, memory, bytes, and that a quantized model stays close to its own float model.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

# Configs of real models (as their config.json on the Hub states them), by short name.
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
REAL_CONFIGS: dict[str, dict] = {
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE | {"factor": 32.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "smollm2-1.7b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 130000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen2.5-3b": {
        "model_type": "qwen2",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "llama-3.1-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE | {"factor": 8.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
}

OUTLIER_CHANNELS = 4  # large-magnitude channels per norm weight
OUTLIER_GAIN = 20.0  # their norm weight (the others are 1)


def real_config(name: str, **overrides):
    """The transformers config of `REAL_CONFIGS[name]`, with `overrides` (e.g. `num_hidden_layers=2`)."""
    from transformers import AutoConfig

    if name not in REAL_CONFIGS:
        raise ValueError(f"unknown synthetic model {name!r}: choose one of {', '.join(map(repr, REAL_CONFIGS))}")
    fields = REAL_CONFIGS[name] | {"torch_dtype": "bfloat16"} | overrides
    return AutoConfig.for_model(**fields)


def checkpoint_plan(config, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Size]:
    """Names and shapes of the tensors a checkpoint of `config` holds, in the model's order (tied copies left out);
    built on the meta device, so it costs no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    seen: set[int] = set()
    plan = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # tied (lm_head.weight is embed_tokens.weight)
            continue
        seen.add(id(tensor))
        plan[name] = tensor.shape
    return plan


def checkpoint_size(plan: dict[str, torch.Size], dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the tensors of `plan` in `dtype`."""
    return sum(shape.numel() for shape in plan.values()) * dtype.itemsize


def _shards(plan: dict[str, torch.Size], max_shard_bytes: int, itemsize: int) -> list[list[str]]:
    """Tensor names grouped into consecutive shards of at most `max_shard_bytes` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in plan.items():
        nbytes = shape.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def synthetic_tensor(name: str, shape: torch.Size, config, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The value of tensor `name`: a pure function of (name, shape, config, seed)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        out = torch.ones(shape, dtype=torch.float32)
        channels = torch.randperm(shape[0], generator=generator)[:OUTLIER_CHANNELS]
        out[channels] = OUTLIER_GAIN
        return out.to(dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    std = float(getattr(config, "initializer_range", 0.02))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(dtype)


def _shard_tensors(names: list[str], plan, config, seed: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, synthetic_tensor(name, plan[name], config, seed, dtype)


def write_synthetic_checkpoint(
    folder: str | Path,
    config,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int = 2 * 2**30,
    disk_margin: int = 2**30,
) -> Path:
    """Write a random checkpoint of `config` into `folder` (see the module docstring) and return the folder.

    Refuses (OSError naming the sizes) before writing anything when the disk holding `folder` has less free space
    than the checkpoint plus `disk_margin`. An existing folder with a `config.json` is returned as it is.
    """
    from ..folders import staged_folder

    folder = Path(folder).expanduser()
    if (folder / "config.json").exists():
        return folder
    plan = checkpoint_plan(config, dtype)
    total = checkpoint_size(plan, dtype)
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if free < total + disk_margin:
        raise OSError(
            f"a synthetic checkpoint of {total / 2**30:.1f} GiB needs {(total + disk_margin) / 2**30:.1f} GiB free "
            f"at {folder.parent}, which has {free / 2**30:.1f} GiB: free some space or choose another folder."
        )
    shards = _shards(plan, max_shard_size, dtype.itemsize)
    with staged_folder(folder, field="folder") as staging:
        weight_map = {}
        for index, names in enumerate(shards, 1):
            file = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            tensors = dict(_shard_tensors(names, plan, config, seed, dtype))
            save_file(tensors, str(staging / file), metadata={"format": "pt"})
            del tensors
            weight_map.update(dict.fromkeys(names, file))
        if len(shards) > 1:
            index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
        config.save_pretrained(staging)
    return folder
