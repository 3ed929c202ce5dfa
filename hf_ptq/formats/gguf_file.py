"""Export to GGUF, the file llama.cpp runs (transformers reads it too: `from_pretrained(folder, gguf_file=...)`).

`gguf_type` picks the tensor types as llama.cpp's presets do (`gguf_types.PRESETS`: Q8_0, Q4_0, Q4_1, the K-quant
mixes Q4_K_S / Q4_K_M / Q5_K_S / Q5_K_M and Q6_K; the output layer Q6_K, more bits for some attn_v / ffn_down
layers in *_M mixes, llama.cpp's fallback types for rows that are not whole 256-input super-blocks), or "auto": the
smallest 32-block type that holds the model's integers exactly, with F16 embeddings. How each tensor's bytes are made
(the integers unchanged, a K grid fitted to the model's, or quantized from float) is in `gguf_types`; the file says
which under `hf_ptq.*` keys. Exporting to fewer bits than a layer has, act-order layers (their groups are not runs
of inputs), architectures, rotary scalings and tokenizers llama.cpp would read differently are refused before
anything is written. Norms and biases are F32.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..core.install import extra_install
from ..nn import QuantLinear
from . import gguf_kquants, gguf_types
from .export_formats import export_format
from .gguf_tokenizer import check_vocabulary, vocabulary_kind, write_tokenizer
from .gguf_types import EMBEDDING_TYPES, GGUF_TYPES, PRESETS, TYPE_BITS
from .layers import float_state_dict, quantized_layers, tied_output_embedding, vocab_rows

logger = logging.get_logger(__name__)

FORMAT = "gguf"
# model_type -> (llama.cpp architecture, whether q/k rows are permuted to llama.cpp's rotary layout)
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "phi3": ("phi3", False),  # fused qkv_proj / gate_up_proj are llama.cpp's attn_qkv / ffn_up as they are
}
ROPE_TYPES = ("default", "llama3")


def gguf_module():
    try:
        import gguf
    except ImportError as err:
        raise ImportError(f"export(format='gguf') needs the gguf package: {extra_install('gguf')}") from err
    return gguf


@dataclass(frozen=True)
class Tensor:
    """One tensor to write: its state-dict key (or quantized layer name), GGUF name and GGUF type name."""

    key: str
    name: str
    type_name: str


@dataclass(frozen=True)
class GgufPlan:
    """What will be written: the architecture, the preset, and every tensor with its type."""

    arch: str
    permute_qk: bool
    gguf_type: str
    tensors: list[Tensor]
    vocabulary: tuple[str, str | None]  # ("gpt2", llama.cpp's pre-tokenizer name) or ("llama", None)

    @property
    def file_name(self) -> str:
        return f"model-{self.label}.gguf"

    @property
    def label(self) -> str:
        """The file's type name: the preset (upper case), or for "auto" the quantized layers' type."""
        if self.gguf_type != "auto":
            return self.gguf_type.upper()
        return Counter(t.type_name for t in self.tensors if t.type_name not in ("F16", "F32")).most_common(1)[0][0]


def _check_options(gguf_type: str, embeddings: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is invalid: gguf_type must be one of {', '.join(GGUF_TYPES)}.")
    if embeddings not in EMBEDDING_TYPES:
        raise ValueError(
            f"embeddings={embeddings!r} is invalid: embeddings must be 'preset' (the token embedding and output as "
            "llama.cpp's preset quantizes them) or 'f16'."
        )


def check_architecture(cfg: Any) -> tuple[str, bool]:
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"export(format='gguf') supports model types {', '.join(ARCHITECTURES)}; this model is {model_type!r}. "
            "Export it with format='compressed-tensors' or 'gptq'."
        )
    rope = _rope(cfg).get("rope_type", "default")
    if rope not in ROPE_TYPES:
        raise ValueError(
            f"export(format='gguf') writes rotary embeddings of types {', '.join(ROPE_TYPES)}; this model uses "
            f"{rope!r}. Export it with format='compressed-tensors' or 'gptq'."
        )
    return ARCHITECTURES[model_type]


def _rope(cfg: Any) -> dict:
    return dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})


def _check_layer(name: str, layer: QuantLinear, type_name: str) -> None:
    if layer.weight_g_idx is not None:
        raise ValueError(
            f"export(format='gguf'): layer {name!r} uses act-order groups (weight_g_idx), which GGUF blocks of "
            "consecutive inputs cannot express. Quantize with desc_act=False or static_groups=True, or export with "
            "format='compressed-tensors' or 'gptq'."
        )
    if layer.in_features % gguf_types.BLOCK:
        raise ValueError(
            f"export(format='gguf'): layer {name!r} has in_features={layer.in_features}, not a multiple of "
            f"{gguf_types.BLOCK} (GGUF's block size)."
        )
    if layer.bits > TYPE_BITS[type_name]:
        raise ValueError(
            f"export(format='gguf'): layer {name!r} has {layer.bits}-bit weights, more than {type_name} holds: "
            "writing it would quantize it again to fewer bits. Use gguf_type='q8_0' (or 'auto'), or quantize the "
            f"float model with bits={TYPE_BITS[type_name]}."
        )


def _role(gguf_name: str) -> tuple[str, int]:
    """("attn_v", 3) for "blk.3.attn_v.weight"; (name, -1) outside the blocks."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return parts[2], int(parts[1])
    return parts[0], -1


def type_of(
    gguf_name: str,
    shape: tuple[int, ...],
    layer: QuantLinear | None,
    gguf_type: str,
    tied: bool,
    embeddings: str,
    blocks: int,
) -> str:
    """The GGUF type name of one tensor (see the module docstring)."""
    if len(shape) < 2:
        return "F32"
    role, index = _role(gguf_name)
    is_output = role == "output" or (role == "token_embd" and tied)
    if gguf_type == "auto":
        if layer is None:
            return "F16"
        return gguf_types.auto_type(layer.bits, layer.sym, layer.float_zero_point)
    preset = PRESETS[gguf_type]
    if role in ("token_embd", "output"):
        if embeddings == "f16":
            return "F16"
        chosen = preset.output if is_output else preset.layers
    else:
        chosen = gguf_types.layer_type(preset, role, index, blocks)
    return gguf_types.fitted(chosen, shape[-1])


def plan(model: nn.Module, tokenizer: Any, gguf_type: str = "auto", embeddings: str = "preset") -> GgufPlan:
    """Check that `model` can be written as GGUF (ValueError naming what is supported otherwise) and list what."""
    gguf = gguf_module()
    _check_options(gguf_type, embeddings)
    cfg = model.config
    arch, permute_qk = check_architecture(cfg)
    layers = dict(quantized_layers(model, FORMAT))
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    tied = tied_output_embedding(model)
    skip = set(_output_keys(model)) if tied else set()
    state = float_state_dict(model)  # quantized embeddings (`embeddings=`) dequantized: encoded from float
    tensors = []  # in the state dict's order, a quantized layer where its first tensor is (as llama.cpp writes them)
    placed = set()
    for key, value in state.items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in layers and leaf != "bias":
            if module_name not in placed:
                placed.add(module_name)
                layer = layers[module_name]
                name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
                type_name = type_of(
                    name, (1, layer.in_features), layer, gguf_type, tied, embeddings, cfg.num_hidden_layers
                )
                _check_layer(module_name, layer, type_name)
                tensors.append(Tensor(module_name, name, type_name))
            continue
        if key in skip:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"export(format='gguf'): no GGUF tensor name for {key!r} (architecture {arch}).")
        type_name = type_of(name, tuple(value.shape), None, gguf_type, tied, embeddings, cfg.num_hidden_layers)
        tensors.append(Tensor(key, name, type_name))
    rows = vocab_rows(model)
    vocabulary = vocabulary_kind(tokenizer)
    check_vocabulary(tokenizer, rows)
    return GgufPlan(arch, permute_qk, gguf_type, tensors, vocabulary)


def _output_keys(model: nn.Module) -> list[str]:
    head = model.get_output_embeddings()
    return [f"{n}.weight" for n, m in model.named_modules() if m is head]


def check(model: nn.Module, tokenizer: Any = None, gguf_type: str = "auto", embeddings: str = "preset") -> None:
    plan(model, tokenizer, gguf_type, embeddings)


@export_format(
    FORMAT,
    "llama.cpp's types (Q8_0, Q4_0, Q4_1, Q4_K_M and the other K-quant mixes) with tokenizer and architecture "
    "metadata; llama.cpp and transformers read it",
    check,
    options=("gguf_type", "embeddings"),
    needs_tokenizer=True,
)
def write(model: nn.Module, folder: Path, tokenizer: Any, gguf_type: str = "auto", embeddings: str = "preset") -> None:
    gguf = gguf_module()
    p = plan(model, tokenizer, gguf_type, embeddings)
    state = float_state_dict(model)  # quantized embeddings (`embeddings=`) dequantized: encoded from float
    encoded = []  # (tensor, data, how)
    for tensor in logging.tqdm(p.tensors, desc="gguf export", unit="tensor"):
        data, how = _encode(model, state, tensor)
        encoded.append((tensor, _permuted(data, tensor.name, model, p), how))
    ways = Counter(how for _, _, how in encoded if how != "float")
    again = [t.key for t, _, how in encoded if how == "quantized again"]
    if again:
        logger.warning(
            f"gguf export: {len(again)} layers (e.g. {again[0]!r}) do not fit their GGUF type's blocks and were "
            "quantized again from their dequantized weights (a second rounding). Quantize with group_size=32 (sym=True "
            "for Q4_0) to write the integers unchanged."
        )
    writer = gguf.GGUFWriter(folder / p.file_name, p.arch)
    _write_metadata(writer, model, p, ways)
    rows = vocab_rows(model)
    write_tokenizer(writer, tokenizer, rows, p.vocabulary, getattr(model.config, "pad_token_id", None))
    rope_factors = _llama3_rope_factors(model.config)
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors)
    for tensor, data, _ in encoded:
        raw = None if tensor.type_name in ("F16", "F32") else getattr(gguf.GGMLQuantizationType, tensor.type_name)
        writer.add_tensor(tensor.name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _encode(model: nn.Module, state: dict, tensor: Tensor) -> tuple[np.ndarray, str]:
    """The tensor's bytes (or F16 / F32 array) and how they were made: "exact", "refitted" (a K grid fitted to the
    layer's own), "quantized again", "from float" (a float matrix quantized) or "float"."""
    if tensor.key in state:
        value = state[tensor.key]
        if tensor.type_name in ("F16", "F32"):
            return _float_array(value, tensor.type_name), "float"
        return gguf_types.encode_float(value, tensor.type_name), "from float"
    layer = model.get_submodule(tensor.key)
    assert isinstance(layer, QuantLinear)
    qw = layer.quantized_weight()  # unpacked once: integers, grid and dequantized weight all come from it
    if tensor.type_name in gguf_types.K_TYPES:
        fits = qw.bits <= TYPE_BITS[tensor.type_name] and tensor.type_name != "Q6_K"
        grid = gguf_types.kquant_grid(qw) if fits else None
        return gguf_kquants.encode(qw.dequantize(torch.float32), tensor.type_name, grid=grid), "refitted"
    data = gguf_types.encode_exact(qw, tensor.type_name)
    if data is not None:
        return data, "exact"
    return gguf_types.encode_float(qw.dequantize(torch.float32), tensor.type_name), "quantized again"


def _float_array(tensor: torch.Tensor, type_name: str) -> np.ndarray:
    """F32 for 1-D tensors (norms, biases), F16 for matrices (F32 where a value exceeds float16's range)."""
    values = tensor.detach().float()
    if type_name == "F16" and values.abs().max() <= torch.finfo(torch.float16).max:
        return values.to(torch.float16).numpy()
    return values.numpy()


def _permuted(data: np.ndarray, gguf_name: str, model: nn.Module, p: GgufPlan) -> np.ndarray:
    """Rows of q / k weights (and biases) in llama.cpp's rotary layout for the Llama family (llama.cpp rotates
    adjacent pairs, transformers the two halves of each head). Blocks lie along rows, so encoded rows move whole."""
    if not p.permute_qk or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return data
    cfg = model.config
    heads = cfg.num_attention_heads if ".attn_q." in gguf_name else cfg.num_key_value_heads
    rows = data.shape[0]
    order = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)
    return np.ascontiguousarray(data[order])


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope_theta(cfg: Any) -> float:
    return float(_rope(cfg).get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _llama3_rope_factors(cfg: Any) -> np.ndarray | None:
    """Llama 3.1's rotary scaling as llama.cpp reads it: per frequency i, the factor [head_dim / 2] (F32) its
    frequency is divided by. Frequencies whose wavelength is under original_context / high_freq_factor are kept
    (1), those over original_context / low_freq_factor are divided by `factor`, the ones between interpolate."""
    rope = _rope(cfg)
    if rope.get("rope_type") != "llama3":
        return None
    dim = _head_dim(cfg)
    freq = 1.0 / (_rope_theta(cfg) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    context = float(rope["original_max_position_embeddings"])
    wavelength = 2 * math.pi / freq
    smooth = np.clip((context / wavelength - low) / (high - low), 0.0, 1.0)  # 0: long wavelengths, 1: short
    scaled = (1 - smooth) * freq / factor + smooth * freq
    return (freq / scaled).astype(np.float32)


def _write_metadata(writer: Any, model: nn.Module, p: GgufPlan, ways: Counter) -> None:
    gguf = gguf_module()
    from ..version import __version__

    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = _head_dim(cfg)
    writer.add_name(Path(str(getattr(model, "name_or_path", "") or "model")).name)
    writer.add_quantized_by(f"hf_ptq {__version__}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(vocab_rows(model))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if p.arch == "phi3":  # llama.cpp's phi3 reads its sliding window and the context its rotary was trained on
        original = _rope(cfg).get("original_max_position_embeddings") or cfg.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_sliding_window(int(getattr(cfg, "sliding_window", None) or 0))
    elif getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        logger.warning("gguf export: the model's sliding-window attention is not written (llama.cpp attends fully).")
    if p.gguf_type == "auto":
        file_type = f"MOSTLY_{p.label}"
    else:
        file_type = PRESETS[p.gguf_type].file_type
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    qcfg = getattr(cfg, "quantization_config", None)
    settings = qcfg.to_dict() if hasattr(qcfg, "to_dict") else dict(qcfg or {})
    for key in ("method", "bits", "group_size", "sym", "embeddings"):
        if settings.get(key) is not None:
            value = settings[key]
            add = writer.add_bool if isinstance(value, bool) else writer.add_int32 if isinstance(value, int) else None
            (add or writer.add_string)(f"hf_ptq.{key}", value if add else str(value))
    writer.add_string("hf_ptq.gguf_type", p.gguf_type)
    writer.add_string("hf_ptq.encoding", ", ".join(f"{how}: {count}" for how, count in sorted(ways.items())))
