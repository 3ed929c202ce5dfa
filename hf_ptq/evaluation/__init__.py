"""Measuring quantized models: perplexity, divergence from a reference model, speed, memory, size, the
validation checklist (`evaluate`), and several configs side by side with a report and a plot (`compare`).

Nothing here imports the rest of hf_ptq but its public API, so the same code measures hf_ptq, bitsandbytes and
unquantized models alike (the benchmarks use the low-level helpers directly).
"""

from .compare import Comparison, compare
from .divergence import DivergenceMeter, kl_divergence, top1_agreement
from .memory import (
    PeakMemory,
    checkpoint_bytes,
    current_rss_bytes,
    linear_weight_bytes,
    model_bytes,
    peak_rss_bytes,
    safetensors_sizes,
    state_dict_bytes,
    tree_bytes,
)
from .perplexity import causal_lm_logits, nll_sum, perplexity, read_text, sliding_windows, token_windows
from .result import Check, EvalResult, ModelStats, Thresholds
from .run import EvalOptions, Evaluator, evaluate
from .speed import CpuMonitor, decode_tokens_per_s, prefill_tokens_per_s, wait_for_idle_cpu

__all__ = [
    "Check",
    "Comparison",
    "CpuMonitor",
    "DivergenceMeter",
    "EvalOptions",
    "EvalResult",
    "Evaluator",
    "ModelStats",
    "PeakMemory",
    "Thresholds",
    "causal_lm_logits",
    "checkpoint_bytes",
    "compare",
    "current_rss_bytes",
    "decode_tokens_per_s",
    "evaluate",
    "kl_divergence",
    "linear_weight_bytes",
    "model_bytes",
    "nll_sum",
    "peak_rss_bytes",
    "perplexity",
    "prefill_tokens_per_s",
    "read_text",
    "safetensors_sizes",
    "sliding_windows",
    "state_dict_bytes",
    "token_windows",
    "top1_agreement",
    "tree_bytes",
    "wait_for_idle_cpu",
]
