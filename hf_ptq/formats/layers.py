"""Finding what an exporter writes: the quantized layers of a model (weight-only `QuantLinear`s, or W8A8 layers),
the Linears left in full precision, and the model's tensors with quantized embeddings / heads (`embeddings=`) as
the float matrices the export formats hold (`float_state_dict`)."""

from __future__ import annotations

import torch
from torch import nn

from ..methods import method_names, method_spec
from ..nn import EMBEDDING_MODULES, QuantLinear, QuantOutputHead, TiedQuantHead, W8A8Linear
from ..nn.quant_embedding import PackedRows


def weight_only_methods() -> list[str]:
    """The `PtqConfig.method`s whose layers are hf_ptq's packed `QuantLinear`s (the ones the exports read)."""
    return [n for n in method_names() if method_spec(n).backend is None]


def quantized_layers(model: nn.Module, format_name: str) -> list[tuple[str, QuantLinear]]:
    """(name, layer) of every `QuantLinear` of `model`, in module order.

    Raises ValueError when there are none (the model was not quantized by hf_ptq, or its layers are held by another
    package) or when a layer replaced a transposed GPT-2 `Conv1D` (`refuse_transposed`).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    method = getattr(getattr(model.config, "quantization_config", None), "method", None)
    backend = method_spec(method).backend if method in method_names() else None
    if backend is not None:
        raise ValueError(
            f"export(format={format_name!r}): method={method!r} keeps its weights in the {backend} package's "
            "modules, which the exports do not read. Supported: hf_ptq's packed layers (methods "
            f"{', '.join(weight_only_methods())})."
        )
    if not layers:
        raise ValueError(
            f"export(format={format_name!r}) takes a model quantized by hf_ptq (with hf_ptq.PtqConfig); this model "
            "has no hf_ptq quantized layers. Quantize it first: from_pretrained(..., "
            "quantization_config=PtqConfig(...)) or hf_ptq.quantize(model, config)."
        )
    refuse_transposed(layers, format_name)
    return layers


def w8a8_layers(model: nn.Module) -> list[tuple[str, W8A8Linear]]:
    """(name, layer) of every `W8A8Linear` of `model` (SmoothQuantConfig), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, W8A8Linear)]


def refuse_transposed(layers: list[tuple[str, nn.Module]], format_name: str) -> None:
    """ValueError when a quantized layer replaced a transposed GPT-2 `Conv1D`, which the foreign readers do not
    build (they quantize `nn.Linear` only)."""
    transposed = [n for n, m in layers if m.transposed_source]
    if transposed:
        raise ValueError(
            f"export(format={format_name!r}) supports models built of nn.Linear layers; {transposed[0]!r} (and "
            f"{len(transposed) - 1} more) replaced a GPT-2 style Conv1D, which {format_name} readers do not load. "
            "Keep the hf_ptq checkpoint (save_pretrained) for this model."
        )


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
    """Names of the Linears the exports write in full precision: the `nn.Linear`s left so (the output embedding,
    `modules_to_not_convert`) and a quantized output head (`embeddings=`), which they write dequantized."""
    heads = (nn.Linear, QuantOutputHead, TiedQuantHead)
    return [n for n, m in model.named_modules() if isinstance(m, heads) and not isinstance(m, QuantLinear)]


def tied_output_embedding(model: nn.Module) -> bool:
    """True when the output embedding shares the input embedding's weight (it is then written once)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(out, TiedQuantHead):
        return out.embedding is inp
    if isinstance(out, EMBEDDING_MODULES) or isinstance(inp, EMBEDDING_MODULES):
        return False
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def vocab_rows(model: nn.Module) -> int:
    """Rows of the input embedding (the vocabulary size the model was built with)."""
    inp = model.get_input_embeddings()
    return inp.num_embeddings if hasattr(inp, "num_embeddings") else inp.weight.shape[0]


def quantized_embeddings(model: nn.Module) -> list[str]:
    """Names of the modules holding a quantized embedding or head (`embeddings="int8" | "int4"`)."""
    return [n for n, m in model.named_modules() if isinstance(m, EMBEDDING_MODULES)]


@torch.no_grad()
def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every quantized embedding / untied head (`embeddings=`) as the float `weight` the
    formats without a place for them hold: its dequantized matrix in the model's dtype, where its first tensor was
    (a tied head has none: the input embedding's weight stands for both, as in a float checkpoint)."""
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedRows)}
    state = model.state_dict()
    if not packed:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module_name, _, leaf = key.rpartition(".")
        module = packed.get(module_name)
        if module is None or not leaf.startswith("weight_"):
            out[key] = value
        elif f"{module_name}.weight" not in out:
            out[f"{module_name}.weight"] = module.dequantized_weight(module.weight_scale.dtype)
    return out
