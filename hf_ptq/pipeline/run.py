"""Entry point for calibrated methods: calibration batches (or samples from the model), then the block walk, then
the embeddings (`embeddings=`: quantized last, so calibration runs with the float embedding and head)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..calibration.data import make_batches
from ..calibration.self_generated import sample_from_model
from ..methods import method_spec
from ..nn.replace_embeddings import quantize_embeddings
from .sensitivity import search_layer_schemes
from .sequential import quantize_blocks, quantize_without_statistics

logger = logging.getLogger("hf_ptq")


@torch.no_grad()
def calibrate_and_quantize(
    model: nn.Module, config, targets: list[str], batches: list[torch.Tensor] | None
) -> list[str]:
    """Quantize the Linears `targets` of `model` in place with the calibrated `config.method`, then the embeddings
    (`embeddings=`); `batches=None`: calibrate on model samples."""
    was_training = model.training
    model.eval()
    try:
        if batches is None:
            samples = sample_from_model(model, config.num_samples, config.seq_len)
            batches = make_batches(samples, config.batch_size)
        if config.target_bits is not None:
            search_layer_schemes(model, config, targets, batches)
        if method_spec(config.method).needs_calibration:
            names = quantize_blocks(model, config, batches, targets)
        else:  # a method without statistics calibrated only to choose the layers' schemes (`target_bits`)
            names = quantize_without_statistics(model, config, targets)
        if getattr(config, "embeddings", None):
            names += quantize_embeddings(model, config)
    finally:
        model.train(was_training)
    logger.info("hf_ptq: quantized %d layers with %s", len(names), config.describe())
    return names
