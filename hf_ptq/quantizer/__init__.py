"""transformers' HfQuantizer glue: validate, swap modules, quantize while loading, reload packed checkpoints."""

from . import bnb  # noqa: F401  (registers the bitsandbytes methods' quantizer)
from .hf_quantizer import PtqHfQuantizer
from .smoothquant_quantizer import SmoothQuantHfQuantizer

__all__ = ["PtqHfQuantizer", "SmoothQuantHfQuantizer"]
