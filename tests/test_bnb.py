"""bitsandbytes methods behind PtqConfig: same layers as transformers' BitsAndBytesConfig, block size, save/reload."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, assert_same_model, input_ids, model_output, rel_err
from test_hub import FakeHub, hub, write_files  # noqa: F401  (hub is a fixture)
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import hf_ptq
from hf_ptq import PtqConfig
from hf_ptq.quantizer.bnb import BnbHfQuantizer

bnb = pytest.importorskip("bitsandbytes")

BNB_EQUIVALENT = {
    "nf4": (
        PtqConfig(method="nf4", compute_dtype="bfloat16"),
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    ),
    "fp4-double-quant": (
        PtqConfig(method="fp4", double_quant=True, compute_dtype="bfloat16"),
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
    ),
    "llm_int8": (PtqConfig(method="llm_int8"), BitsAndBytesConfig(load_in_8bit=True)),
}


def bnb_layer_type(method: str) -> type:
    return bnb.nn.Linear8bitLt if method == "llm_int8" else bnb.nn.Linear4bit


@pytest.mark.parametrize("name", list(BNB_EQUIVALENT))
def test_same_model_as_bits_and_bytes_config(name: str, tiny_llama_dir: Path) -> None:
    """PtqConfig(method=...) builds exactly what transformers' own BitsAndBytesConfig builds (same tensors)."""
    ours_cfg, theirs_cfg = BNB_EQUIVALENT[name]
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=ours_cfg, dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=theirs_cfg, dtype=torch.bfloat16)
    assert isinstance(ours.hf_quantizer, BnbHfQuantizer) and ours.hf_quantizer.is_trainable
    assert isinstance(ours.model.layers[1].self_attn.q_proj, bnb_layer_type(ours_cfg.method))
    assert not isinstance(ours.lm_head, bnb_layer_type(ours_cfg.method))  # the output embedding stays
    assert_same_model(ours, theirs)
    ids = input_ids()
    assert rel_err(model_output(ours, ids), model_output(FAMILIES["llama"].build(), ids)) < 0.2


@pytest.mark.parametrize("block", (32, 128))
def test_group_size_is_the_4bit_block_size(block: int, tiny_llama_dir: Path) -> None:
    """group_size sets bitsandbytes' block size; the weights equal bitsandbytes' own quantize_4bit at that size."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=PtqConfig(method="nf4", group_size=block), dtype=torch.bfloat16
    )
    float_model = FAMILIES["llama"].build()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        assert layer.weight.quant_state.blocksize == block
        w = float_model.get_submodule(name).weight.detach()
        packed, state = bnb.functional.quantize_4bit(w, blocksize=block, quant_type="nf4")
        assert torch.equal(layer.weight.data, packed)
        expected = bnb.functional.dequantize_4bit(packed, state)
        assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state), expected)


@pytest.mark.parametrize("method", ["nf4", "fp4", "llm_int8"])
def test_save_after_inference_reloads_the_same_model(method: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Saved after it ran (bitsandbytes repacks 4-bit weights for its CPU kernel at the first forward), the model
    reloads to the same outputs, with hf_ptq's config in config.json."""
    cfg = PtqConfig(method=method)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg, dtype=torch.bfloat16)
    ids = input_ids()
    before = model_output(model, ids)
    model.save_pretrained(tmp_path / "q")
    assert not list((tmp_path / "q").glob("*.bin"))
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (saved["quant_method"], saved["method"]) == ("hf_ptq", method)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, bnb_layer_type(method))
    assert reloaded.config.quantization_config == model.config.quantization_config
    assert torch.equal(model_output(reloaded, ids), before)
    assert torch.equal(model_output(model, ids), before)  # saving left the running model as it was


@pytest.mark.parametrize("method", ["nf4", "llm_int8"])
def test_quantize_in_memory_equals_on_load(method: str, tiny_llama_dir: Path) -> None:
    cfg = PtqConfig(method=method)
    on_load = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg, dtype=torch.bfloat16)
    in_memory = hf_ptq.quantize(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16), cfg)
    assert isinstance(in_memory.hf_quantizer, BnbHfQuantizer)
    assert_same_model(in_memory, on_load)
    with pytest.raises(ValueError, match="already quantized"):
        hf_ptq.quantize(in_memory, cfg)


def test_gpt2_conv1d_layers(tmp_path: Path) -> None:
    family = FAMILIES["gpt2"]
    family.build().save_pretrained(tmp_path / "float")
    model = family.auto_class.from_pretrained(
        tmp_path / "float", quantization_config=PtqConfig(method="nf4", group_size=32)
    )
    names = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert names == family.expected_linears()
    ids = input_ids()
    assert rel_err(model_output(model, ids), model_output(family.build(), ids)) < 0.2


def test_push_to_hub_and_reload(hub: FakeHub, tiny_llama_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=PtqConfig(method="nf4"))
    model.push_to_hub("me/tiny-nf4", metrics={"perplexity": 40.1})
    files = hub.files()
    card = files["README.md"].decode()
    assert "`nf4`" in card and "| bits | 4 |" in card and "| group size | 64 |" in card and "40.1" in card
    reloaded = AutoModelForCausalLM.from_pretrained(write_files(files, tmp_path / "dl"))
    ids = input_ids()
    assert torch.equal(model_output(reloaded, ids), model_output(model, ids))


@pytest.mark.parametrize(
    ("kwargs", "field", "text"),
    [
        ({"method": "nf4", "group_size": 48}, "group_size", "32, 64, 128"),
        ({"method": "nf4", "bits": 8}, "bits", "bits=4"),
        ({"method": "fp4", "sym": False}, "sym", "sym=True"),
        ({"method": "llm_int8", "group_size": 64}, "group_size", "group_size=-1"),
        ({"method": "llm_int8", "double_quant": True}, "double_quant", "'fp4' / 'nf4'"),
        ({"method": "nf4", "outlier_threshold": 4.0}, "outlier_threshold", "'llm_int8'"),
        ({"method": "llm_int8", "outlier_threshold": -1}, "outlier_threshold", "positive"),
        ({"method": "llm_int8", "compute_dtype": "float32"}, "compute_dtype", "activations' dtype"),
        ({"method": "nf4", "desc_act": True}, "desc_act", "'gptq'"),
    ],
)
def test_fields_that_do_not_apply_are_rejected(kwargs: dict, field: str, text: str) -> None:
    with pytest.raises(ValueError) as info:
        PtqConfig(**kwargs)
    assert f"PtqConfig.{field}=" in str(info.value) and text in str(info.value)


def test_config_maps_onto_bits_and_bytes_options() -> None:
    from hf_ptq.quantizer.bnb import bnb_config

    four = bnb_config(PtqConfig(method="fp4", double_quant=True), ["lm_head"], torch.bfloat16)
    assert (four.load_in_4bit, four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == (True, "fp4", True)
    assert four.bnb_4bit_compute_dtype == torch.bfloat16 and four.llm_int8_skip_modules == ["lm_head"]
    assert bnb_config(
        PtqConfig(method="nf4", compute_dtype="float32"), None, torch.bfloat16
    ).bnb_4bit_compute_dtype == (torch.float32)
    eight = bnb_config(PtqConfig(method="llm_int8", outlier_threshold=4.0), None, torch.bfloat16)
    assert eight.load_in_8bit and eight.llm_int8_threshold == 4.0


def test_missing_bitsandbytes_names_the_extra_before_weights(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quantizing and reloading both need bitsandbytes: ImportError naming hf-ptq[bnb], before any weight is read."""
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=PtqConfig(method="nf4")).save_pretrained(
        tmp_path / "q"
    )
    import transformers.modeling_utils as modeling_utils

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(modeling_utils, "convert_and_load_state_dict_in_model", lambda *a, **k: pytest.fail("read"))
    for source, kwargs in ((tiny_llama_dir, {"quantization_config": PtqConfig(method="nf4")}), (tmp_path / "q", {})):
        with pytest.raises(ImportError, match=r"pip install \"hf-ptq\[bnb\]\""):
            AutoModelForCausalLM.from_pretrained(source, **kwargs)
    with pytest.raises(ImportError, match=r"hf-ptq\[bnb\]"):
        hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(method="llm_int8"))


def test_dequantize_gives_float_linears(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=PtqConfig(method="nf4"))
    layer = model.model.layers[0].mlp.down_proj
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    model.dequantize()
    dense = model.model.layers[0].mlp.down_proj
    assert type(dense) is torch.nn.Linear and not getattr(model, "is_quantized", False)
    assert torch.equal(dense.weight.float(), expected)
