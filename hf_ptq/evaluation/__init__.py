"""Measurement helpers for benchmarks: perplexity, divergence from a reference model, speed, memory and size.

Pure functions over a model and tensors; nothing here imports the rest of hf_ptq, so the same code measures
hf_ptq, bitsandbytes and unquantized models alike.
"""

from .divergence import DivergenceMeter, kl_divergence, top1_agreement
from .memory import (
    current_rss_bytes,
    linear_weight_bytes,
    model_bytes,
    peak_rss_bytes,
    safetensors_sizes,
    tree_bytes,
)
from .perplexity import causal_lm_logits, nll_sum, perplexity, read_text, token_windows
from .speed import CpuMonitor, decode_tokens_per_s, prefill_tokens_per_s, wait_for_idle_cpu

__all__ = [
    "CpuMonitor",
    "DivergenceMeter",
    "causal_lm_logits",
    "current_rss_bytes",
    "decode_tokens_per_s",
    "kl_divergence",
    "linear_weight_bytes",
    "model_bytes",
    "nll_sum",
    "peak_rss_bytes",
    "perplexity",
    "prefill_tokens_per_s",
    "read_text",
    "safetensors_sizes",
    "token_windows",
    "top1_agreement",
    "tree_bytes",
    "wait_for_idle_cpu",
]
