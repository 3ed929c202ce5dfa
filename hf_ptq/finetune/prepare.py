"""`prepare_for_training`: peft's preparation of a quantized model for adapter training, for hf_ptq's models."""

from __future__ import annotations

from typing import Any


def prepare_for_training(
    model: Any, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> Any:
    """Freeze every parameter, cast the fp16 / bf16 float parameters (norms, biases, float embeddings) to fp32, and
    turn on gradient checkpointing: what peft's `prepare_model_for_kbit_training` does for the formats it knows
    (it runs here for the first two), which leaves checkpointing off for a quant_method it does not know. The
    quantized layers' buffers are left as they are. Returns the model."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}  # explicit: torch warns without
        if kwargs.get("use_reentrant", True):  # reentrant checkpoints need an input that requires grad
            model.enable_input_require_grads()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
