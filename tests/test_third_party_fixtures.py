"""Checkpoints made by the real tools (tests/fixtures/third_party: llm-compressor 0.14 and gptqmodel 7.7, each run
in its own virtualenv by the script next to its fixtures) load on hf_ptq's modules and give the logits the producing
tool computes; saved again by hf_ptq they reload bit-identically."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from optional_extras import require_extra
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq import QuantLinear, W8A8Linear
from hf_ptq.formats.save import saved_hf_ptq_config

FIXTURES = Path(__file__).parent / "fixtures" / "third_party"
LLMC_WEIGHT_ONLY = [
    "w4a16-g64",
    "w4a16-g128",
    "w4a16-g64-actorder-group",
    "w4a16-asym-g64",
    "w8a16",
    "awq-w4a16-asym-g64",
    "qwen2-w4a16-g64",
]
LLMC_W8A8 = ["w8a8-dynamic", "w8a8-static"]
GPTQMODEL = sorted(p.name for p in (FIXTURES / "gptqmodel").iterdir() if (p / "reference.safetensors").is_file())


def _load(folder: Path, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    for module in model.modules():  # the dequantize path in fp32: compares exactly enough with fp32 references
        if isinstance(module, QuantLinear):
            module.compute_dtype = "float32"
            module.invalidate_caches()
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("name", LLMC_WEIGHT_ONLY)
def test_llm_compressor_weight_only_checkpoint_matches_compressed_tensors_logits(name):
    """transformers + compressed-tensors dequantizes these weights and runs float matmuls: in fp32 the logits agree
    to float rounding."""
    folder = FIXTURES / "llmcompressor" / name
    reference = load_file(folder / "reference.safetensors")
    model = _load(folder)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in ("model.layers.0.mlp.down_proj",))
    torch.testing.assert_close(_logits(model, reference["input_ids"]), reference["logits"], rtol=1e-5, atol=1e-5)


def _compressed_tensors_qdq(self: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' W8A8 forward: activations fake-quantized per token with scale absmax / 127.5 (or the
    static input_scale) to [-128, 127], dequantized weights, a float matmul."""
    xf = x.float()
    scale = self.input_scale.float() if self.static else xf.abs().amax(-1, keepdim=True) / 127.5
    xq = torch.clamp(torch.round(xf / scale), -128, 127) * scale
    return torch.nn.functional.linear(xq, self.weight.float() * self.weight_scale.float(), self.bias)


@pytest.mark.parametrize("name", LLMC_W8A8)
def test_llm_compressor_w8a8_checkpoint_loads_on_w8a8_linear(name):
    """The weights and scales are compressed-tensors' exactly (its activation rounding applied to them gives its
    logits); hf_ptq's own W8A8 rounding (absmax / 127, [-127, 127], int8 matmuls) stays within the documented
    difference (docs/loading.md)."""
    folder = FIXTURES / "llmcompressor" / name
    reference = load_file(folder / "reference.safetensors")
    model = _load(folder)
    layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert len(layers) == 14 and all(m.static == (name == "w8a8-static") for m in layers)
    ours = _logits(model, reference["input_ids"])
    for layer in layers:
        layer.forward = types.MethodType(_compressed_tensors_qdq, layer)
    torch.testing.assert_close(_logits(model, reference["input_ids"]), reference["logits"], rtol=1e-5, atol=1e-5)
    assert _rel(ours, reference["logits"]) < 0.02
    config = model.config.quantization_config
    assert isinstance(config, hf_ptq.SmoothQuantConfig) and config.static == (name == "w8a8-static")


@pytest.mark.parametrize("name", GPTQMODEL)
def test_gptqmodel_checkpoint_matches_gptqmodel_logits(name):
    """gptqmodel's own CPU kernels ran these in float16 (see the fixtures' README): agreement to fp16 rounding."""
    folder = FIXTURES / "gptqmodel" / name
    reference = load_file(folder / "reference.safetensors")
    model = _load(folder)
    assert _rel(_logits(model, reference["input_ids"]), reference["logits"]) < 3e-3
    descact = "descact" in name
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, QuantLinear) and (layer.weight_g_idx is not None) == descact


@pytest.mark.parametrize(
    "folder",
    [
        "gptqmodel/gptq-v1-w4-g32-asym-descact",
        "gptqmodel/awq-gemm-w4-g32",
        "llmcompressor/w4a16-asym-g64",
        "llmcompressor/w8a8-static",
    ],
)
def test_converted_checkpoint_saves_and_reloads_bit_identically(tmp_path, folder):
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / folder, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "saved")
    saved = saved_hf_ptq_config(json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"])
    assert saved["quant_method"].startswith("hf_ptq") and saved["converted_from"]["quant_method"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    state, again = model.state_dict(), reloaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    ids = torch.arange(12).view(1, 12)
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))


def test_converted_gptq_checkpoint_exports_like_an_hf_ptq_model(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "gptqmodel" / "gptq-v1-w4-g32-sym", dtype=torch.float32)
    hf_ptq.export(model, tmp_path / "ct", format="compressed-tensors")
    hf_ptq.export(model, tmp_path / "gptq", format="gptq")
    again = _load(tmp_path / "ct")
    first = model.get_submodule("model.layers.1.self_attn.o_proj")
    for folder in ("ct", "gptq"):
        layer = _load(tmp_path / folder).get_submodule("model.layers.1.self_attn.o_proj")
        assert torch.equal(layer.dequantized_weight(torch.float32), first.dequantized_weight(torch.float32)), folder
    assert again.config.quantization_config.converted_from["quant_method"] == "compressed-tensors"


@pytest.mark.parametrize(("sym", "bits"), [(True, 4), (False, 4), (True, 5), (False, 6)])
def test_hf_ptq_compressed_tensors_export_loads_back_on_hf_ptq(tmp_path, tiny_llama_dir, sym, bits):
    """hf_ptq's own compressed-tensors export (asymmetric ones carry `dequantize: true` for transformers' reader)
    loads on hf_ptq's packed modules, still quantized, and saves again; 5- and 6-bit (GGUF's grids) too."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=hf_ptq.PtqConfig(bits=bits, group_size=32, sym=sym)
    )
    hf_ptq.export(model, tmp_path / "ct", format="compressed-tensors")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    name = "model.layers.0.self_attn.v_proj"
    assert torch.equal(again.get_submodule(name).dequantized_weight(), model.get_submodule(name).dequantized_weight())
    assert isinstance(again.config.quantization_config, hf_ptq.PtqConfig) and again.hf_quantizer.is_serializable()
    again.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "compressed-tensors" and saved_hf_ptq_config(saved)["sym"] == sym
    assert again.get_submodule(name).bits == bits


class _TransformersQuantizer:
    def __init__(self, quantization_config, **kwargs):
        raise RuntimeError(f"handed to transformers with {type(quantization_config).__name__}")


def _fp8_checkpoint(folder: Path) -> Path:
    """A compressed-tensors FP8 config (a format hf_ptq does not run) over the w8a16 fixture's tensors."""
    folder.mkdir()
    for f in (FIXTURES / "llmcompressor" / "w8a16").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group["format"] = config["quantization_config"]["format"] = "float-quantized"
    group["weights"]["type"] = "float"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unsupported_compressed_tensors_format_is_refused_naming_the_field(tmp_path, monkeypatch):
    """Without the package transformers' own loader needs, a format hf_ptq does not run is refused before any
    weight is read."""
    from transformers.quantizers import auto

    monkeypatch.setattr(auto.AUTO_QUANTIZER_MAPPING["compressed-tensors"], "packages", ("no_such_package_here",))
    with pytest.raises(ValueError, match=r"format='float-quantized': hf_ptq runs compressed-tensors checkpoints"):
        AutoModelForCausalLM.from_pretrained(_fp8_checkpoint(tmp_path / "fp8"))


def test_unsupported_format_goes_to_transformers_loader_when_its_package_is_installed(tmp_path, monkeypatch):
    require_extra("compressed-tensors")
    from transformers.quantizers import auto

    monkeypatch.setattr(auto.AUTO_QUANTIZER_MAPPING["compressed-tensors"], "original", _TransformersQuantizer)
    with pytest.raises(RuntimeError, match="handed to transformers with CompressedTensorsConfig"):
        AutoModelForCausalLM.from_pretrained(_fp8_checkpoint(tmp_path / "fp8"))
