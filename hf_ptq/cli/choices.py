"""The values the `hf-ptq` parsers offer, without importing torch or transformers (`hf-ptq --help`): read from
the torch-free modules that define them, or, where that module needs torch, mirrored here as plain data
(tests/test_cli_user.py checks that the mirrors match)."""

from __future__ import annotations

from ..auto_method import DEPLOY_TARGETS, PREFERENCES  # noqa: F401  (offered by the parser)
from ..methods.options import ACTIVATIONS, WEIGHT_METHODS  # noqa: F401

# hf_ptq.methods.method_names()
METHODS = ("awq", "fp4", "gptq", "hqq", "int8", "llm_int8", "nf4", "rtn")
AUTO = "auto"  # PtqConfig(method="auto"): the decision tree of hf_ptq.auto_method
SMOOTHQUANT = "smoothquant"  # hf_ptq.SmoothQuantConfig: W8A8
QUANTIZE_METHODS = (*METHODS, AUTO, SMOOTHQUANT)
# hf_ptq.core.embeddings.EMBEDDING_FORMATS
EMBEDDING_FORMATS = ("int8", "int4")
# hf_ptq.formats.export.format_names()
EXPORT_FORMATS = ("compressed-tensors", "gguf", "gptq")
# hf_ptq.formats.gguf_types: GGUF_TYPES, EMBEDDING_TYPES
GGUF_TYPES = ("auto", "q8_0", "q4_0", "q4_1", "q4_k", "q4_k_s", "q4_k_m", "q5_k", "q5_k_s", "q5_k_m", "q6_k")
GGUF_EMBEDDINGS = ("preset", "f16")
# hf_ptq.evaluation.Thresholds() field defaults, in its field order
THRESHOLDS = {
    "max_ppl_increase": 0.10,
    "max_downstream_drop": 0.02,
    "min_speedup": 1.5,
    "max_memory_ratio": 1 / 3,
}
