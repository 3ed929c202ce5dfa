"""export(format="gptq"): unpacked by a reference reader written here from the GPTQ v1 format description, the
checkpoint gives back hf_ptq's dequantized weights exactly, and a model built from it gives the same logits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, input_ids, model_output, rel_err
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import hf_ptq
from hf_ptq import PtqConfig
from hf_ptq.nn import QuantLinear

CONFIGS = {
    "rtn-w4-g32-asym": lambda: PtqConfig(bits=4, group_size=32),
    "rtn-w4-channel-sym": lambda: PtqConfig(bits=4, group_size=-1, sym=True),
    "rtn-w3-g32-asym": lambda: PtqConfig(bits=3, group_size=32),
    "rtn-w2-g64-sym": lambda: PtqConfig(bits=2, group_size=64, sym=True),
    "rtn-w8-tensor-asym": lambda: PtqConfig(bits=8, group_size=0),
    "int8": lambda: PtqConfig(method="int8"),
    "gptq-act-order-asym": lambda: PtqConfig(method="gptq", bits=4, group_size=32, num_samples=4, seq_len=16),
}


# --- reference reader, from the format's description (docs/export.md), independent of hf_ptq's packing code ---
def unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 words [n_words, cols] -> `count` unsigned values per column: value i is bits [i*bits, (i+1)*bits) of the
    little-endian bit stream formed by the words of a column (word 0 = bits 0..31)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    values = []
    for i in range(count):
        word, offset = divmod(i * bits, 32)
        v = w[word] >> offset
        if offset + bits > 32:  # straddles into the next word (3-bit)
            v = v | (w[word + 1] << (32 - offset))
        values.append(v & ((1 << bits) - 1))
    return torch.stack(values)


def reference_dequantize(tensors: dict[str, torch.Tensor], prefix: str, bits: int) -> torch.Tensor:
    """GPTQ v1: W[o, i] = scales[g_idx[i], o] * (qweight value [i, o] - (qzeros value [g_idx[i], o] + 1))."""
    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    scales, g_idx = tensors[f"{prefix}.scales"].float(), tensors[f"{prefix}.g_idx"].long()
    in_f, out_f = qweight.shape[0] * 32 // bits, scales.shape[1]
    u = unpack_stream(qweight, bits, in_f)  # [in, out]
    zeros = unpack_stream(qzeros.t(), bits, out_f).t() + 1  # [groups, out]
    return (scales[g_idx] * (u - zeros[g_idx]).float()).t()


def reference_load(folder: Path) -> torch.nn.Module:
    """A float model (fp32) built from the GPTQ checkpoint with the reference reader."""
    config = AutoConfig.from_pretrained(folder)
    bits = config.quantization_config["bits"]
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_file(folder / "model.safetensors")
    state = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            prefix = key.removesuffix(".qweight")
            state[f"{prefix}.weight"] = reference_dequantize(tensors, prefix, bits)
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = value.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    model = hf_ptq.quantize(FAMILIES["llama"].build(), CONFIGS[request.param]())
    return model, hf_ptq.export(model, tmp_path_factory.mktemp("gptq") / request.param, format="gptq")


def test_reference_unpacker_gives_hf_ptq_weights(exported) -> None:
    model, folder = exported
    tensors = load_file(folder / "model.safetensors")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, layer in layers.items():
        assert torch.equal(layer.weight_scale.half().float(), layer.weight_scale.float())  # fp16 holds the scales
        expected = layer.dequantized_weight(torch.float32)
        assert torch.equal(reference_dequantize(tensors, name, layer.bits), expected), name
        assert tensors[f"{name}.qweight"].shape == (layer.in_features * layer.bits // 32, layer.out_features)
        assert tensors[f"{name}.scales"].dtype == torch.float16
        if layer.weight_g_idx is not None:
            assert torch.equal(tensors[f"{name}.g_idx"], layer.weight_g_idx)


def test_model_built_from_the_export_matches(exported) -> None:
    model, folder = exported
    rebuilt = reference_load(folder)
    reference = FAMILIES["llama"].build().float()  # the same bf16 float weights, in fp32
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            reference.get_submodule(name).weight.data = layer.dequantized_weight(torch.float32)
    ids = input_ids()
    assert torch.equal(model_output(rebuilt, ids), model_output(reference, ids))
    assert rel_err(model_output(rebuilt, ids), model_output(model, ids)) < 0.02


def test_config_names_the_v1_checkpoint(exported) -> None:
    model, folder = exported
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config == json.loads((folder / "quantize_config.json").read_text())
    cfg = model.config.quantization_config
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq"
    assert config["bits"] == cfg.bits and config["sym"] == cfg.sym
    assert config["group_size"] == (cfg.group_size if cfg.group_size > 0 else -1)
    assert config["desc_act"] == cfg.act_order_modules
    from transformers import GPTQConfig

    assert GPTQConfig.from_dict(config).bits == cfg.bits  # transformers' own GPTQ config accepts it


def test_zero_point_zero_is_shifted_for_the_v1_format(tmp_path: Path, caplog) -> None:
    """v1 stores zero - 1, so a group whose zero point is 0 (all weights >= 0) moves to zero 1: exact when the group
    does not use the top value, clamped by one step (and counted in a warning) when it does."""
    float_model = FAMILIES["llama"].build()
    q_proj = float_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight[0, :32] = 0.0  # zero point 0, every integer 0: shifted exactly
        q_proj.weight[1, :32] = q_proj.weight[1, :32].abs()  # zero point 0 and the top value: one value clamped
    model = hf_ptq.quantize(float_model, PtqConfig(bits=4, group_size=32))
    layer = model.model.layers[0].self_attn.q_proj
    assert (layer.quantized_weight().zero_point[:2, 0] == -8).all()
    with caplog.at_level(logging.WARNING):
        folder = hf_ptq.export(model, tmp_path / "gptq", format="gptq")
    assert "1 weight(s)" in caplog.text
    got = reference_dequantize(load_file(folder / "model.safetensors"), "model.layers.0.self_attn.q_proj", 4)
    expected = layer.dequantized_weight(torch.float32)
    assert torch.equal(got[0], expected[0])
    differs = (got[1] != expected[1]).nonzero().flatten().tolist()
    assert len(differs) == 1 and expected[1, differs[0]] == expected[1].max()
    assert torch.equal(got[1, differs[0]], expected[1].max() - layer.weight_scale[1, 0].float())
    assert torch.equal(got[2:], expected[2:])


def test_unsupported_shapes_fail_before_writing(tmp_path: Path) -> None:
    config = FAMILIES["llama"].make_config()
    config.intermediate_size = 80  # gate_proj out_features 80: not a multiple of 32 for 3-bit values
    model = hf_ptq.quantize(AutoModelForCausalLM.from_config(config), PtqConfig(bits=3, group_size=16))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.gate_proj' has out_features=80, not a multiple of 32"):
        hf_ptq.export(model, tmp_path / "out", format="gptq")
    assert not list(tmp_path.iterdir())


def test_five_and_six_bit_weights_are_refused_naming_the_formats_that_hold_them(tmp_path) -> None:
    model = hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(bits=5, group_size=32, sym=True))
    with pytest.raises(ValueError, match=r"writes 2, 3, 4, 8-bit weights .* this model's are 5-bit\. Export it with"):
        hf_ptq.export(model, tmp_path / "gptq", format="gptq")
    assert not (tmp_path / "gptq").exists()
