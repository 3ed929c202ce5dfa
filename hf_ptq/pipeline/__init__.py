"""The sequential calibration pipeline shared by calibrated methods (GPTQ; AWQ and SmoothQuant next)."""

from .blocks import find_blocks
from .capture import capture_inputs
from .run import calibrate_and_quantize
from .sequential import quantize_blocks

__all__ = ["calibrate_and_quantize", "capture_inputs", "find_blocks", "quantize_blocks"]
