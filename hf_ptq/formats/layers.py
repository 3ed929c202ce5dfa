"""Finding what an exporter writes: the quantized layers of a model, and the Linears left in full precision."""

from __future__ import annotations

from torch import nn

from ..methods import method_names, method_spec
from ..nn import QuantLinear


def quantized_layers(model: nn.Module, format_name: str) -> list[tuple[str, QuantLinear]]:
    """(name, layer) of every `QuantLinear` of `model`, in module order.

    Raises ValueError when there are none (the model was not quantized by hf_ptq) or when a layer replaced a
    transposed GPT-2 `Conv1D`, which the foreign readers do not build (they quantize `nn.Linear` only).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    method = getattr(getattr(model.config, "quantization_config", None), "method", None)
    backend = method_spec(method).backend if method in method_names() else None
    if backend is not None:
        raise ValueError(
            f"export(format={format_name!r}): method={method!r} keeps its weights in the {backend} package's "
            "modules, which the exports do not read. Supported: hf_ptq's packed layers (methods rtn, int8, gptq, "
            "awq, hqq)."
        )
    if not layers:
        raise ValueError(
            f"export(format={format_name!r}) takes a model quantized by hf_ptq (with hf_ptq.PtqConfig); this model "
            "has no hf_ptq quantized layers. Quantize it first: from_pretrained(..., "
            "quantization_config=PtqConfig(...)) or hf_ptq.quantize(model, config)."
        )
    transposed = [n for n, m in layers if m.transposed_source]
    if transposed:
        raise ValueError(
            f"export(format={format_name!r}) supports models built of nn.Linear layers; {transposed[0]!r} (and "
            f"{len(transposed) - 1} more) replaced a GPT-2 style Conv1D, which {format_name} readers do not load. "
            "Keep the hf_ptq checkpoint (save_pretrained) for this model."
        )
    return layers


def refuse_float_zero_points(layers: list[tuple[str, QuantLinear]], format_name: str) -> None:
    """ValueError when layers carry float zero points (HQQ), which `format_name` stores as integers only."""
    floats = [n for n, m in layers if m.float_zero_point]
    if floats:
        raise ValueError(
            f"export(format={format_name!r}): {floats[0]!r} (and {len(floats) - 1} more) has float zero points "
            f"(HQQ), and {format_name} stores integer zero points only. Supported for HQQ: format='gguf' (Q4_1 holds "
            "a float offset per block of 32); or quantize with method='rtn' / 'gptq' / 'awq'."
        )


def float_linears(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear`s left in full precision (the output embedding, `modules_to_not_convert`)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)]


def tied_output_embedding(model: nn.Module) -> bool:
    """True when the output embedding shares the input embedding's weight (it is then written once)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()
