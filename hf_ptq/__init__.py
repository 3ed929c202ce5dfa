"""hf_ptq: post-training quantization as a plugin for Hugging Face transformers.

`import hf_ptq` registers `PtqConfig` (quant_method "hf_ptq") and its quantizer with transformers, so
`from_pretrained(model_id, quantization_config=hf_ptq.PtqConfig(...))` quantizes on load and
`from_pretrained(saved_dir)` reloads the packed checkpoint.
"""

from .api import quantize
from .config import QUANT_METHOD, PtqConfig
from .evaluation import Comparison, EvalResult, Thresholds, compare, evaluate
from .formats.export import export, format_names
from .formats.hub import push_to_hub
from .methods import method_names
from .nn import QuantLinear
from .quantizer import PtqHfQuantizer
from .registration import register

__version__ = "0.1.0"

register(QUANT_METHOD, PtqConfig, PtqHfQuantizer)

__all__ = [
    "Comparison",
    "EvalResult",
    "PtqConfig",
    "PtqHfQuantizer",
    "QuantLinear",
    "Thresholds",
    "compare",
    "evaluate",
    "export",
    "format_names",
    "method_names",
    "push_to_hub",
    "quantize",
    "__version__",
]
