"""transformers' HfQuantizer glue: validate, swap modules, quantize while loading, reload packed checkpoints."""

from .hf_quantizer import PtqHfQuantizer

__all__ = ["PtqHfQuantizer"]
