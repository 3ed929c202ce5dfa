"""Quantized modules and the surgery that swaps them into a model."""

from .quant_linear import QuantLinear
from .replace import quantizable_linears, replace_linears

__all__ = ["QuantLinear", "quantizable_linears", "replace_linears"]
