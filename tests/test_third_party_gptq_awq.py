"""GPTQ (v1 / v2) and AWQ GEMM checkpoints made by other tools load on hf_ptq's modules.

The checkpoints here are written by reference packers in this file, from each format's description (AutoGPTQ's
`qweight` bit stream along the input, v1's zero - 1; AutoAWQ's interleaved nibbles along the output), over a tiny
Llama; the AWQ packer is cross-checked against compressed-tensors' own AutoAWQ converter. Real gptqmodel-made
checkpoints are tested in tests/test_third_party_fixtures.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optional_extras import require_extra
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_ptq
from hf_ptq import CheckpointError, QuantLinear
from hf_ptq.formats.third_party.awq import ORDER, pack_awq, unpack_awq

VOCAB = 96


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).float().eval()


def pack_bit_stream(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [rows, cols] -> int32 [rows*bits/32, cols]: value r of each column at bits [r*bits,
    (r+1)*bits) of that column's little-endian bit stream (GPTQ's qweight layout; qzeros transposed)."""
    rows, cols = u.shape
    words = torch.zeros(rows * bits // 32, cols, dtype=torch.int64)
    for r in range(rows):
        for b in range(bits):
            pos = r * bits + b
            words[pos // 32] |= ((u[r].long() >> b) & 1) << (pos % 32)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned zero points [groups, out] -> qzeros int32 [groups, out*bits/32] (packed along the output)."""
    return pack_bit_stream(zeros.t().contiguous(), bits).t().contiguous()


def _v1_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """v1 qzeros as gptqmodel writes them: for 2/4/8 bits, one subtracted from every field of the packed word at
    once (a zero of 0 borrows from the next field); for 3 bits, zero - 1 modulo 2^bits per field."""
    if bits == 3:
        return pack_zeros((zeros - 1) & 7, bits)
    ones = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}[bits]
    words = (pack_zeros(zeros, bits).to(torch.int64) - ones) & 0xFFFFFFFF
    return (words - ((words >> 31) << 32)).to(torch.int32)


def reference_awq_pack(u: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM packing, written from its description: word c of a row holds columns 8c .. 8c+7, column
    8c + ORDER[i] in nibble i."""
    rows, cols = u.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i, col in enumerate(ORDER):
            words[:, c] |= u[:, 8 * c + col].long() << (4 * i)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def _layers(model: torch.nn.Module, lm_head: bool = False) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (lm_head or n != "lm_head")]


def write_gptq(
    folder: Path,
    *,
    bits=4,
    group_size=32,
    sym=False,
    desc_act=False,
    v1=True,
    seed=0,
    zero_zero=False,
    extra=None,
    lm_head=False,
):
    """A GPTQ checkpoint of random integers, scales and zero points; returns (float model holding the reference
    dequantized weights, {layer: weight [out, in]})."""
    model = _tiny_llama(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tensors, reference = {}, {}
    for name, layer in _layers(model, lm_head):
        out_f, in_f = layer.out_features, layer.in_features
        groups = 1 if group_size == -1 else in_f // group_size
        u = torch.randint(0, 2**bits, (in_f, out_f), generator=gen)
        if sym:
            zeros = torch.full((groups, out_f), 2 ** (bits - 1))
        else:
            zeros = torch.randint(0 if zero_zero else 1, 2**bits, (groups, out_f), generator=gen)
        scales = (torch.rand(groups, out_f, generator=gen) * 0.02 + 0.001).half()
        per_group = in_f if group_size == -1 else group_size
        g_idx = torch.arange(in_f) // per_group
        if desc_act:
            g_idx = g_idx[torch.randperm(in_f, generator=gen)]
        weight = (scales.float()[g_idx] * (u - zeros[g_idx]).float()).t().contiguous()
        tensors[f"{name}.qweight"] = pack_bit_stream(u, bits)
        tensors[f"{name}.qzeros"] = _v1_zeros(zeros, bits) if v1 else pack_zeros(zeros, bits)
        tensors[f"{name}.scales"] = scales
        tensors[f"{name}.g_idx"] = g_idx.to(torch.int32)
        layer.weight.data = weight
        reference[name] = weight
    quantization_config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": "gptq" if v1 else "gptq_v2",
        **(extra or {}),
    }
    return _write_checkpoint(folder, model, tensors, reference, quantization_config)


def _write_checkpoint(folder: Path, model, tensors: dict, reference: dict, quantization_config: dict):
    """Save the quantized layers' `tensors`, the model's other tensors and its config with `quantization_config`;
    returns (model, reference)."""
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in reference:
            tensors[key] = value.contiguous()
    config = model.config.to_dict() | {"quantization_config": quantization_config}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return model, reference


def write_awq(folder: Path, *, group_size=32, zero_point=True, seed=0):
    model = _tiny_llama(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tensors, reference = {}, {}
    for name, layer in _layers(model):
        out_f, in_f = layer.out_features, layer.in_features
        groups = in_f // group_size
        u = torch.randint(0, 16, (in_f, out_f), generator=gen)
        zeros = torch.randint(0, 16, (groups, out_f), generator=gen) if zero_point else torch.full((groups, out_f), 8)
        scales = (torch.rand(groups, out_f, generator=gen) * 0.02 + 0.001).half()
        g = torch.arange(in_f) // group_size
        weight = (scales.float()[g] * (u - zeros[g]).float()).t().contiguous()
        tensors[f"{name}.qweight"] = reference_awq_pack(u)
        if zero_point:
            tensors[f"{name}.qzeros"] = reference_awq_pack(zeros)
        tensors[f"{name}.scales"] = scales
        layer.weight.data = weight
        reference[name] = weight
    quantization_config = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": zero_point,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    return _write_checkpoint(folder, model, tensors, reference, quantization_config)


def _load(folder: Path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)


def _assert_weights(model, reference: dict[str, torch.Tensor]) -> None:
    for name, weight in reference.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear), name
        assert torch.equal(layer.dequantized_weight(torch.float32), weight), name


def _fp32_compute(model) -> None:
    """Run hf_ptq's layers in fp32 (the dequantize path), so logits compare exactly enough with an fp32 model."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.compute_dtype = "float32"
            module.invalidate_caches()


def _logits(model, seed: int = 3) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize(
    "bits,group_size,sym,desc_act,v1",
    [
        (4, 32, False, False, True),
        (4, 32, True, False, True),
        (4, 32, False, True, True),
        (4, -1, True, False, True),
        (4, 32, False, True, False),
        (8, 32, False, False, True),
        (3, 32, True, False, True),
        (2, 64, False, False, False),
    ],
)
def test_gptq_checkpoint_dequantizes_to_the_reference_weights(tmp_path, bits, group_size, sym, desc_act, v1):
    reference_model, reference = write_gptq(
        tmp_path / "ckpt", bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, v1=v1
    )
    model = _load(tmp_path / "ckpt")
    _assert_weights(model, reference)
    layer = model.get_submodule(next(iter(reference)))
    assert layer.sym == sym and (layer.weight_g_idx is not None) == desc_act  # act-order: the reordered kernel
    config = model.config.quantization_config
    assert isinstance(config, hf_ptq.PtqConfig) and (config.bits, config.group_size) == (bits, group_size)
    assert config.converted_from["quant_method"] == "gptq"
    _fp32_compute(model)
    torch.testing.assert_close(_logits(model), _logits(reference_model), rtol=1e-4, atol=1e-4)


def test_gptq_checkpoint_saves_and_reloads_bit_identically(tmp_path):
    write_gptq(tmp_path / "ckpt", desc_act=True)
    model = _load(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hf_ptq" and saved["converted_from"]["quantization_config"]["bits"] == 4
    reloaded = _load(tmp_path / "saved")
    state, again = model.state_dict(), reloaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    assert torch.equal(_logits(model), _logits(reloaded))


def test_quantized_lm_head_is_kept_as_its_dequantized_weight(tmp_path):
    """gptqmodel's `lm_head: true`: hf_ptq keeps output embeddings in full precision, so the loaded lm_head is a
    float Linear holding exactly the dequantized weight, and the model saves and reloads."""
    reference_model, reference = write_gptq(tmp_path / "ckpt", lm_head=True, extra={"lm_head": True})
    model = _load(tmp_path / "ckpt")
    assert type(model.lm_head) is torch.nn.Linear and torch.equal(model.lm_head.weight, reference["lm_head"])
    _assert_weights(model, {k: v for k, v in reference.items() if k != "lm_head"})
    model.save_pretrained(tmp_path / "saved")
    reloaded = _load(tmp_path / "saved")
    assert torch.equal(reloaded.lm_head.weight, reference["lm_head"])
    assert torch.equal(_logits(reloaded), _logits(model))


@pytest.mark.parametrize("bits", [4, 3, 8])
def test_gptq_v1_zero_point_of_zero_reads_back_as_zero(tmp_path, bits):
    """v1 stores zero - 1: a zero of 0 borrows from the next field of the word (2/4/8 bits, as gptqmodel writes
    it) or wraps to 2^bits - 1 (3 bits); both read back as 0."""
    _, reference = write_gptq(tmp_path / "ckpt", bits=bits, zero_zero=True, seed=5)
    _assert_weights(_load(tmp_path / "ckpt"), reference)


def test_gptq_unsupported_settings_are_refused_before_weights_load(tmp_path):
    write_gptq(tmp_path / "marlin", extra={"checkpoint_format": "marlin"})
    with pytest.raises(ValueError, match=r"checkpoint_format='marlin'.*use_backend\('gptq', 'transformers'\)"):
        _load(tmp_path / "marlin")
    write_gptq(tmp_path / "bits", extra={"bits": 5})
    with pytest.raises(ValueError, match="bits but found 5"):  # transformers' GPTQConfig refuses it first
        _load(tmp_path / "bits")


def test_gptq_checkpoint_whose_tensors_disagree_with_its_bits_is_refused(tmp_path):
    write_gptq(tmp_path / "ckpt", bits=4)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"q_proj\.qweight.*shape \[8, 64\], expected \[16, 64\].*bits=8"):
        _load(tmp_path / "ckpt")


def test_pickled_gptq_checkpoint_is_refused(tmp_path):
    write_gptq(tmp_path / "ckpt")
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "ckpt" / "model.safetensors"), tmp_path / "ckpt" / "pytorch_model.bin")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors files only"):
        _load(tmp_path / "ckpt")


def test_awq_packing_matches_the_reference_packer_and_round_trips():
    values = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0))
    words = reference_awq_pack(values)
    assert torch.equal(pack_awq(values), words)
    assert torch.equal(unpack_awq(words), values.to(torch.int16))


@pytest.mark.parametrize("zero_point", [True, False])
def test_awq_gemm_checkpoint_dequantizes_to_the_reference_weights(tmp_path, zero_point):
    reference_model, reference = write_awq(tmp_path / "ckpt", zero_point=zero_point)
    model = _load(tmp_path / "ckpt")
    _assert_weights(model, reference)
    assert model.config.quantization_config.method == "awq"
    assert model.get_submodule(next(iter(reference))).sym == (not zero_point)
    _fp32_compute(model)
    torch.testing.assert_close(_logits(model), _logits(reference_model), rtol=1e-4, atol=1e-4)


def test_awq_reader_agrees_with_compressed_tensors_autoawq_converter(tmp_path):
    """compressed-tensors ships a converter of AutoAWQ GEMM tensors; on the same tensors it gives the integers and
    zero points hf_ptq's loader gives."""
    converters = require_extra("compressed-tensors", "compressed_tensors.entrypoints.convert.converters.autoawq")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    write_awq(tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    converted = converters.AutoAWQConverter(group_size=32).process(dict(tensors))
    model = _load(tmp_path / "ckpt")
    for name, _ in _layers(model):
        layer = model.get_submodule(name)
        qw = layer.quantized_weight()
        theirs = unpack_from_int32(converted[f"{name}.weight_packed"], 4, converted[f"{name}.weight_shape"])
        assert torch.equal(qw.q, theirs.to(torch.int8)), name
        zeros = unpack_from_int32(
            converted[f"{name}.weight_zero_point"], 4, torch.Size(qw.zero_point.shape), packed_dim=0
        )
        assert torch.equal(qw.zero_point, zeros.to(torch.int8)), name


class _TransformersQuantizer:
    """Stands in for transformers' own quantizer: records that a load was handed to it."""

    def __init__(self, quantization_config, **kwargs):
        raise RuntimeError(f"handed to transformers (pre_quantized={kwargs.get('pre_quantized')})")


@pytest.fixture
def transformers_gptq(monkeypatch):
    from transformers.quantizers import auto

    from hf_ptq.quantizer import backends

    monkeypatch.setattr(auto.AUTO_QUANTIZER_MAPPING["gptq"], "original", _TransformersQuantizer)
    monkeypatch.setattr(backends, "_chosen", {})
    monkeypatch.delenv("HF_PTQ_BACKENDS", raising=False)


def test_transformers_backend_can_be_chosen(tmp_path, monkeypatch, transformers_gptq):
    """use_backend / HF_PTQ_BACKENDS hand the load to the quantizer transformers ships."""
    from hf_ptq.quantizer import backends

    write_gptq(tmp_path / "ckpt")
    hf_ptq.use_backend("gptq", "transformers")
    with pytest.raises(RuntimeError, match="handed to transformers"):
        _load(tmp_path / "ckpt")
    monkeypatch.setattr(backends, "_chosen", {})
    monkeypatch.setenv("HF_PTQ_BACKENDS", "awq=hf_ptq,gptq=transformers")
    with pytest.raises(RuntimeError, match="handed to transformers"):
        _load(tmp_path / "ckpt")
    monkeypatch.setenv("HF_PTQ_BACKENDS", "hf_ptq")
    assert isinstance(_load(tmp_path / "ckpt").model.layers[0].mlp.up_proj, QuantLinear)
    with pytest.raises(ValueError, match="backend 'marlin' is not one of 'hf_ptq', 'transformers'"):
        hf_ptq.use_backend("gptq", "marlin")
    monkeypatch.setenv("HF_PTQ_BACKENDS", "exllama=transformers")
    with pytest.raises(ValueError, match="HF_PTQ_BACKENDS.*'exllama' is not one of"):
        _load(tmp_path / "ckpt")


def test_quantizing_with_transformers_gptq_config_still_goes_to_transformers(tiny_llama_dir, transformers_gptq):
    from transformers import GPTQConfig

    with pytest.raises(RuntimeError, match=r"handed to transformers \(pre_quantized=False\)"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=GPTQConfig(bits=4, dataset=["a b"]))


def test_without_import_hf_ptq_transformers_mapping_is_unchanged():
    code = (
        "from transformers.quantizers import auto;"
        "print(auto.AUTO_QUANTIZER_MAPPING['gptq'].__module__, auto.AUTO_QUANTIZER_MAPPING['awq'].__module__,"
        "auto.AUTO_QUANTIZATION_CONFIG_MAPPING['compressed-tensors'].__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.split() == [
        "transformers.quantizers.quantizer_gptq",
        "transformers.quantizers.quantizer_awq",
        "transformers.utils.quantization_config",
    ]


def test_take_over_is_idempotent():
    from transformers.quantizers import auto

    from hf_ptq.registration import take_over

    first = auto.AUTO_QUANTIZER_MAPPING["gptq"].original
    take_over()
    take_over()
    assert auto.AUTO_QUANTIZER_MAPPING["gptq"].original is first
    assert first.__module__ == "transformers.quantizers.quantizer_gptq"


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_hf_ptq_gptq_export_loads_back_on_hf_ptq(tmp_path, tiny_llama_dir, checkpoint_format):
    """hf_ptq's GPTQ exports (v1 and v2) read back by hf_ptq's GPTQ loader hold the weights they were written from;
    v2 keeps every zero point, v1 shifts groups whose zero is 0 (see hf_ptq.formats.gptq)."""
    from safetensors import safe_open

    model = AutoModelForCausalLM.from_pretrained(  # float16: the scales GPTQ stores
        tiny_llama_dir, dtype=torch.float16, quantization_config=hf_ptq.PtqConfig(bits=4, group_size=32, sym=False)
    )
    hf_ptq.export(model, tmp_path / "out", format="gptq", checkpoint_format=checkpoint_format)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["checkpoint_format"] == checkpoint_format and config["meta"]["quantizer"][0].startswith("hf_ptq:")
    reloaded = _load(tmp_path / "out")
    name = "model.layers.0.mlp.down_proj"
    original, again = model.get_submodule(name), reloaded.get_submodule(name)
    if checkpoint_format == "gptq_v2":
        assert torch.equal(again.dequantized_weight(torch.float32), original.dequantized_weight(torch.float32))
        with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
            stored = unpack_bit_stream_zeros(f.get_tensor(f"{name}.qzeros"), 4, original.out_features)
        assert torch.equal(stored, (original.quantized_weight().zero_point.to(torch.int16) + 8).t())
    else:
        differ = again.dequantized_weight(torch.float32) != original.dequantized_weight(torch.float32)
        assert differ.float().mean() < 0.01  # only values clamped at the top of zero-0 groups


def test_gptq_v2_export_option_is_checked(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_ptq.PtqConfig(group_size=32))
    with pytest.raises(ValueError, match="checkpoint_format='gptq_v3' is invalid"):
        hf_ptq.export(model, tmp_path / "out", format="gptq", checkpoint_format="gptq_v3")
    assert not (tmp_path / "out").exists()


def unpack_bit_stream_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """qzeros int32 [groups, out*bits/32] -> unsigned zero points int16 [groups, out] (inverse of pack_zeros)."""
    words = qzeros.to(torch.int64) & 0xFFFFFFFF
    values = [(words[:, (o * bits) // 32] >> ((o * bits) % 32)) & ((1 << bits) - 1) for o in range(out_features)]
    return torch.stack(values, 1).to(torch.int16)
