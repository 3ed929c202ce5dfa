"""hf_ptq: post-training quantization as a plugin for Hugging Face transformers.

`import hf_ptq` registers `PtqConfig` (quant_method "hf_ptq", weight-only) and `SmoothQuantConfig` (quant_method
"hf_ptq_smoothquant", W8A8) and their quantizers with transformers, so
`from_pretrained(model_id, quantization_config=hf_ptq.PtqConfig(...))` quantizes on load and
`from_pretrained(saved_dir)` reloads the packed checkpoint.
"""

# ruff: noqa: E402  (the imports below follow answer_early on purpose)
from .cli import answer_early

answer_early()  # in an `hf-ptq` process only: help and usage errors answered before transformers loads (8 s)

from .api import quantize
from .config import QUANT_METHOD, PtqConfig
from .evaluation import Comparison, EvalResult, Thresholds, compare, evaluate
from .finetune import install_peft_dispatch, prepare_for_training
from .formats.export import export, format_names
from .formats.gguf_schemes import gguf_layer_schemes
from .formats.hub import push_to_hub
from .formats.safetensors_file import CheckpointError
from .formats.verify import VerifyReport, verify
from .methods import method_names
from .nn import QuantLinear, W8A8Linear
from .quantizer import PtqHfQuantizer, SmoothQuantHfQuantizer
from .quantizer.backends import use_backend
from .registration import register, take_over
from .smoothquant_config import QUANT_METHOD as SMOOTHQUANT_METHOD
from .smoothquant_config import SmoothQuantConfig
from .version import __version__

register(QUANT_METHOD, PtqConfig, PtqHfQuantizer)
register(SMOOTHQUANT_METHOD, SmoothQuantConfig, SmoothQuantHfQuantizer)
take_over()  # GPTQ, AWQ and compressed-tensors checkpoints load on hf_ptq's kernels (docs/loading.md)
install_peft_dispatch()  # peft LoRA wraps hf_ptq's layers (docs/finetuning.md); peft is not imported here

__all__ = [
    "CheckpointError",
    "Comparison",
    "EvalResult",
    "PtqConfig",
    "PtqHfQuantizer",
    "QuantLinear",
    "SmoothQuantConfig",
    "SmoothQuantHfQuantizer",
    "Thresholds",
    "VerifyReport",
    "W8A8Linear",
    "compare",
    "evaluate",
    "export",
    "format_names",
    "gguf_layer_schemes",
    "method_names",
    "prepare_for_training",
    "push_to_hub",
    "quantize",
    "use_backend",
    "verify",
    "__version__",
]
