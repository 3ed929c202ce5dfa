"""Quantized modules and the surgery that swaps them into a model."""

from .quant_embedding import EMBEDDING_MODULES, QuantEmbedding, QuantOutputHead, TiedQuantHead
from .quant_linear import QuantLinear
from .replace import QUANTIZED_MODULES, quantizable_linears, replace_linears
from .w8a8_linear import W8A8Linear

__all__ = [
    "EMBEDDING_MODULES",
    "QUANTIZED_MODULES",
    "QuantEmbedding",
    "QuantLinear",
    "QuantOutputHead",
    "TiedQuantHead",
    "W8A8Linear",
    "quantizable_linears",
    "replace_linears",
]
