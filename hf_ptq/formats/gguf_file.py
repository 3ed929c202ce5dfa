"""Export to GGUF (llama.cpp, and transformers' `from_pretrained(folder, gguf_file=...)`), written with `gguf`.

GGUF's integer types quantize blocks of 32 consecutive inputs of a row, each with its own fp16 scale:
    Q8_0  w = d * q,      q int8                 (8.5 bits per weight)
    Q4_0  w = d * (u - 8), u in [0, 15]          (4.5 bits per weight)
    Q4_1  w = d * u + m,   u in [0, 15]          (5 bits per weight)
A hf_ptq weight is `n * scale` with integers `n = q - zero_point`. Where every block of 32 lies inside one hf_ptq
group (group size a multiple of 32, per-channel or per-tensor) and its integers fit the type (Q8_0: n in
[-128, 127]; Q4_0: n in [-8, 7]; Q4_1: at most 16 distinct steps in a block), the integers are written unchanged and
only the scale is stored in fp16 (exact for bf16 scales in fp16's normal range; Q4_1's `m = scale * min(n)` is
rounded to fp16). Otherwise (group sizes such as 16, asymmetric weights into Q4_0) the dequantized weight is
quantized again with gguf's reference quantizer, with a warning: a second rounding. Exporting to fewer bits than
the model has, and act-order layers (their groups are not runs of 32 inputs), fail before anything is written.
Embeddings, the output layer and any Linear kept in full precision are written as F16, norms and biases as F32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..nn import QuantLinear
from .export import export_format
from .layers import quantized_layers, tied_output_embedding

logger = logging.get_logger(__name__)

FORMAT = "gguf"
GGUF_TYPES = ("auto", "q8_0", "q4_0", "q4_1")
BLOCK = 32  # inputs per GGUF block (Q8_0, Q4_0, Q4_1)
# model_type -> (llama.cpp architecture, whether q/k rows are permuted to llama.cpp's rotary layout)
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError("export(format='gguf') needs the gguf package: pip install 'hf-ptq[gguf]'") from err
    return gguf


@dataclass(frozen=True)
class GgufPlan:
    """What will be written: the architecture, the GGUF type of the quantized layers, and every tensor."""

    arch: str
    permute_qk: bool
    qtype: Any  # gguf.GGMLQuantizationType
    tensors: list[tuple[str, str]]  # (state-dict key, or quantized layer name; GGUF tensor name)
    pre_tokenizer: str

    @property
    def file_name(self) -> str:
        return f"model-{self.qtype.name}.gguf"


def _target_type(gguf_type: str, bits: int, sym: bool, float_zero_point: bool = False):
    """The GGUF type for `gguf_type` ("auto": the smallest type holding the model's integers exactly; Q4_1 for float
    zero points, which only its per-block offset holds)."""
    gguf = _gguf()
    types = gguf.GGMLQuantizationType
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is invalid: gguf_type must be one of {', '.join(GGUF_TYPES)}.")
    if gguf_type == "auto":
        return types.Q8_0 if bits > 4 else (types.Q4_0 if sym and not float_zero_point else types.Q4_1)
    qtype = getattr(types, gguf_type.upper())
    if bits > _type_bits(qtype):
        raise ValueError(
            f"export(format='gguf', gguf_type={gguf_type!r}) would quantize {bits}-bit weights again to "
            f"{_type_bits(qtype)} bits. Supported for {bits}-bit weights: gguf_type='q8_0' (or 'auto'); for 4 bits, "
            "quantize the float model with bits=4, group_size=32."
        )
    return qtype


def _type_bits(qtype) -> int:
    return 8 if qtype.name == "Q8_0" else 4


def plan(model: nn.Module, tokenizer: Any, gguf_type: str = "auto") -> GgufPlan:
    """Check that `model` can be written as GGUF (ValueError naming what is supported otherwise) and list what."""
    gguf = _gguf()
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"export(format='gguf') supports model types {', '.join(ARCHITECTURES)}; this model is {model_type!r}. "
            "Export it with format='compressed-tensors' or 'gptq'."
        )
    arch, permute_qk = ARCHITECTURES[model_type]
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        raise ValueError(f"export(format='gguf') writes default rotary embeddings only; this model uses {rope!r}.")
    layers = dict(quantized_layers(model, FORMAT))
    first = next(iter(layers.values()))
    qtype = _target_type(gguf_type, first.bits, first.sym, first.float_zero_point)
    for name, layer in layers.items():
        if layer.weight_g_idx is not None:
            raise ValueError(
                f"export(format='gguf'): layer {name!r} uses act-order groups (weight_g_idx), which GGUF blocks of 32 "
                "consecutive inputs cannot express. Quantize with desc_act=False or static_groups=True, or export "
                "with format='compressed-tensors' or 'gptq'."
            )
        if layer.in_features % BLOCK:
            raise ValueError(
                f"export(format='gguf'): layer {name!r} has in_features={layer.in_features}, not a multiple of "
                f"{BLOCK} (GGUF's block size)."
            )
        if layer.bits > _type_bits(qtype):
            raise ValueError(
                f"export(format='gguf'): layer {name!r} has {layer.bits}-bit weights, more than {qtype.name}"
            )
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    skip = {key for key in _output_keys(model)} if tied_output_embedding(model) else set()
    tensors = []
    for key in model.state_dict():
        module_name, _, leaf = key.rpartition(".")
        if key in skip or (module_name in layers and leaf != "bias"):
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"export(format='gguf'): no GGUF tensor name for {key!r} (architecture {arch}).")
        tensors.append((key, gguf_name))
    for name in layers:
        tensors.append((name, names.get_name(f"{name}.weight", try_suffixes=(".weight",))))
    return GgufPlan(arch, permute_qk, qtype, tensors, _pre_tokenizer(tokenizer, model))


def _output_keys(model: nn.Module) -> list[str]:
    head = model.get_output_embeddings()
    return [f"{n}.weight" for n, m in model.named_modules() if m is head]


def check(model: nn.Module, tokenizer: Any = None, gguf_type: str = "auto") -> None:
    plan(model, tokenizer, gguf_type)


@export_format(
    FORMAT,
    "Q8_0 / Q4_0 / Q4_1 blocks with tokenizer and architecture metadata; llama.cpp and transformers read it",
    check,
    options=("gguf_type",),
    needs_tokenizer=True,
)
def write(model: nn.Module, folder: Path, tokenizer: Any, gguf_type: str = "auto") -> None:
    gguf = _gguf()
    p = plan(model, tokenizer, gguf_type)
    writer = gguf.GGUFWriter(folder / p.file_name, p.arch)
    _write_metadata(writer, model, p)
    _write_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0], p.pre_tokenizer)
    state = model.state_dict()
    requantized = []
    for key, gguf_name in logging.tqdm(p.tensors, desc="gguf export", unit="tensor"):
        module = model.get_submodule(key) if key not in state else None
        if isinstance(module, QuantLinear):
            data = encode_exact(module, p.qtype)
            if data is None:
                requantized.append(key)
                data = gguf.quants.quantize(module.dequantized_weight(torch.float32).numpy(), p.qtype)
            writer.add_tensor(gguf_name, _permuted(data, gguf_name, model, p), raw_dtype=p.qtype)
        else:
            writer.add_tensor(gguf_name, _permuted(_float_array(state[key]), gguf_name, model, p))
    if requantized:
        logger.warning(
            f"gguf export: {len(requantized)} of {sum(1 for k, _ in p.tensors if k not in state)} layers (e.g. "
            f"{requantized[0]!r}) do not fit {p.qtype.name}'s blocks of {BLOCK} exactly and were quantized again "
            f"from their dequantized weights (a second rounding). Quantize with group_size=32 (sym=True for Q4_0) to "
            "write the integers unchanged."
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _block_params(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """(q int16 [out, in/32, 32]; zero point [out, in/32] (integer or float) or None; scale fp32 [out, in/32]) of the
    layer's blocks of 32 inputs, or None when a block spans two hf_ptq groups."""
    if layer.group_size > 0 and layer.group_size % BLOCK:
        return None
    qw = layer.quantized_weight()
    out_f, in_f = qw.q.shape
    blocks = in_f // BLOCK
    if layer.group_size == 0:
        scale = qw.scale.float().reshape(1, 1).expand(out_f, blocks)
        zero = None if qw.zero_point is None else qw.zero_point.reshape(1, 1).expand(out_f, blocks)
    else:
        repeat = blocks // qw.scale.shape[1]
        scale = qw.scale.float().repeat_interleave(repeat, dim=1)
        zero = None if qw.zero_point is None else qw.zero_point.repeat_interleave(repeat, dim=1)
    return qw.q.to(torch.int16).reshape(out_f, blocks, BLOCK), zero, scale


def encode_exact(layer: QuantLinear, qtype) -> np.ndarray | None:
    """The layer's integers as GGUF blocks of `qtype` (uint8 [out, in/32 * block bytes]), unchanged, with fp16
    scales; None when they do not fit (blocks spanning groups, integers outside the type's range)."""
    params = _block_params(layer)
    if params is None:
        return None
    q, zero, scale = params
    d = scale.to(torch.float16)
    if not torch.isfinite(d).all():
        return None
    name = qtype.name
    if zero is not None and zero.is_floating_point():  # HQQ: w = d * u + m, u = q + 2^(b-1), m = -d * (z + 2^(b-1))
        if name != "Q4_1":
            return None
        offset = 1 << (layer.bits - 1)
        m = (-(scale * (zero.float() + offset))).to(torch.float16)
        parts = [d.unsqueeze(-1), m.unsqueeze(-1), _nibbles(q + offset)]
    else:
        n = q if zero is None else q - zero.to(torch.int16).unsqueeze(-1)  # w = n * scale
        if name == "Q8_0":
            if n.min() < -128 or n.max() > 127:
                return None
            parts = [d.unsqueeze(-1), n.to(torch.int8)]
        elif name == "Q4_0":
            if n.min() < -8 or n.max() > 7:
                return None
            parts = [d.unsqueeze(-1), _nibbles(n + 8)]
        else:  # Q4_1: u = n - c per block, m = d * c
            c = _q4_1_offset(n, scale)
            if c is None:
                return None
            m = (scale * c.float()).to(torch.float16)
            parts = [d.unsqueeze(-1), m.unsqueeze(-1), _nibbles(n - c.unsqueeze(-1))]
    as_bytes = [p.contiguous().view(torch.uint8) for p in parts]
    return torch.cat(as_bytes, dim=-1).reshape(q.shape[0], -1).numpy()


def _q4_1_offset(n: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """Per block, the offset c (int16 [out, blocks]) with `n - c` in [0, 15] whose `m = scale * c` float16 holds
    best (exactly, for bf16 scales, unless the block spans all 16 steps from an odd start of 9 or more); None when
    a block spans more than 16 steps."""
    low, high = n.amin(-1), n.amax(-1)
    if (high - low).max() > 15:
        return None
    candidates = low.unsqueeze(-1) - torch.arange(16, dtype=torch.int16)  # [out, blocks, 16]
    m = scale.unsqueeze(-1) * candidates.float()
    error = (m.to(torch.float16).float() - m).abs()
    error[high.unsqueeze(-1) - candidates > 15] = float("inf")
    return candidates.gather(-1, error.argmin(-1, keepdim=True)).squeeze(-1)


def _nibbles(u: torch.Tensor) -> torch.Tensor:
    """u in [0, 15], [..., 32] -> uint8 [..., 16]: byte j holds value j (low nibble) and value j + 16 (high)."""
    u = u.to(torch.uint8)
    return u[..., :16] | (u[..., 16:] << 4)


def _float_array(tensor: torch.Tensor) -> np.ndarray:
    """F32 for 1-D tensors (norms, biases), F16 for matrices (F32 where a value exceeds float16's range)."""
    values = tensor.detach().float()
    if values.ndim > 1 and values.abs().max() <= torch.finfo(torch.float16).max:
        return values.to(torch.float16).numpy()
    return values.numpy()


def _permuted(data: np.ndarray, gguf_name: str, model: nn.Module, p: GgufPlan) -> np.ndarray:
    """Rows of q / k weights (and biases) in llama.cpp's rotary layout for the Llama family (llama.cpp rotates
    adjacent pairs, transformers the two halves of each head)."""
    if not p.permute_qk or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return data
    cfg = model.config
    heads = cfg.num_attention_heads if ".attn_q." in gguf_name else cfg.num_key_value_heads
    rows = data.shape[0]
    order = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)
    return np.ascontiguousarray(data[order])


def _write_metadata(writer, model: nn.Module, p: GgufPlan) -> None:
    gguf = _gguf()
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    writer.add_name(Path(str(getattr(model, "name_or_path", "") or "model")).name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    if p.permute_qk:
        writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if getattr(cfg, "sliding_window", None):
        logger.warning("gguf export: the model's sliding-window attention is not written (llama.cpp attends fully).")
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{p.qtype.name}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer(tokenizer: Any, model: nn.Module) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the tokenizer's pre-tokenizer; ValueError when it is not a
    byte-level BPE tokenizer llama.cpp knows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    name = None
    if spec.get("model", {}).get("type") == "BPE":
        name = _byte_level_pre_name(spec.get("pre_tokenizer") or {})
    if name is None:
        raise ValueError(
            "export(format='gguf') writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2) into the "
            f"file; this tokenizer ({type(tokenizer).__name__}) is not one llama.cpp can name."
        )
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(f"export(format='gguf'): the tokenizer has {len(tokenizer)} tokens, the model {rows} rows.")
    return name


def _byte_level_pre_name(pre: dict) -> str | None:
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split (llama.cpp groups it with starcoder)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = (steps[0].get("pattern") or {}).get("Regex")
        return next((n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex), None)
    return None


def _write_tokenizer(writer, tokenizer: Any, rows: int, pre: str) -> None:
    """The vocabulary (padded with unused `[PAD<i>]` tokens to the embedding's rows), merges, special ids, BOS/EOS
    behaviour and chat template, under llama.cpp's keys."""
    gguf = _gguf()
    kinds = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [kinds.UNUSED] * rows
    for token, index in tokenizer.get_vocab().items():
        tokens[index], types[index] = token, kinds.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = kinds.CONTROL if added.special else kinds.USER_DEFINED
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key in ("bos", "eos", "unk", "pad"):
        index = getattr(tokenizer, f"{key}_token_id", None)
        if index is not None:
            getattr(writer, f"add_{key}_token_id")(index)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
