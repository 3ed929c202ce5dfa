"""PtqConfig: validation messages, early group_size check, serialization, idempotent registration."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAMILIES, input_ids, model_output
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto

import hf_ptq
import hf_ptq.registration
from hf_ptq import PtqConfig
from hf_ptq.formats.save import saved_hf_ptq_config
from hf_ptq.nn import QuantLinear
from hf_ptq.quantizer import PtqHfQuantizer


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"bits": 0}, "bits", ["2", "3", "4", "5", "6", "8"]),
        ({"bits": 7}, "bits", ["2", "3", "4", "5", "6", "8"]),
        ({"bits": "4"}, "bits", ["2", "3", "4", "5", "6", "8"]),
        ({"bits": True}, "bits", ["2", "3", "4", "5", "6", "8"]),
        ({"group_size": -7}, "group_size", ["-1", "0", "positive"]),
        ({"group_size": 3.5}, "group_size", ["-1", "0", "positive"]),
        ({"method": "magic"}, "method", ["'rtn'", "'int8'"]),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert", ["list"]),
        ({"modules_to_not_convert": ["lm_head", 3]}, "modules_to_not_convert", ["list"]),
        ({"sym": "yes"}, "sym", ["True", "False"]),
        ({"num_samples": 0}, "num_samples", ["positive"]),
        ({"compute_dtype": "int8"}, "compute_dtype", ["'bfloat16'", "'float32'"]),
        ({"method": "int8", "bits": 4}, "bits", ["8", "int8"]),
        ({"method": "int8", "group_size": 32}, "group_size", ["-1", "int8"]),
        ({"method": "int8", "sym": False}, "sym", ["True", "int8"]),
    ],
)
def test_invalid_values_raise_naming_field_and_allowed(kwargs: dict, field: str, allowed: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        PtqConfig(**kwargs)
    message = str(info.value)
    assert field in message
    for text in allowed:
        assert text in message, (text, message)


def test_unknown_field_and_foreign_quant_method() -> None:
    with pytest.raises(ValueError, match="bitz"):
        PtqConfig(bitz=4)
    with pytest.raises(ValueError, match="quant_method"):
        PtqConfig(quant_method="gptq")


def test_defaults_and_int8_forced_fields() -> None:
    cfg = PtqConfig()
    assert (cfg.method, cfg.bits, cfg.group_size, cfg.sym, cfg.quant_method) == ("rtn", 4, 128, False, "hf_ptq")
    cfg = PtqConfig(method="int8")
    assert (cfg.bits, cfg.group_size, cfg.sym) == (8, -1, True)
    assert PtqConfig(method="int8", bits=8, sym=True) == cfg  # restating the forced values is allowed


def test_group_size_not_dividing_raises_before_weights(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hidden 64 is not a multiple of 48: the error comes from module replacement, no weight is ever loaded."""
    import transformers.modeling_utils as modeling_utils

    loaded: list[str] = []

    def no_loading(*args, **kwargs):
        loaded.append("convert_and_load_state_dict_in_model")
        raise AssertionError("weights were read before group_size was validated")

    monkeypatch.setattr(modeling_utils, "convert_and_load_state_dict_in_model", no_loading)
    before_calls: list[str] = []
    original = PtqHfQuantizer._process_model_before_weight_loading

    def spy(self, model, **kwargs):
        before_calls.append("before")
        assert all(p.device.type == "meta" for p in model.parameters())  # nothing materialized yet
        return original(self, model, **kwargs)

    monkeypatch.setattr(PtqHfQuantizer, "_process_model_before_weight_loading", spy)
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=PtqConfig(bits=4, group_size=48))
    message = str(info.value)
    assert "group_size=48" in message and "in_features=64" in message
    assert "-1" in message and "modules_to_not_convert" in message
    assert before_calls == ["before"] and loaded == []


def test_group_size_not_dividing_quantize_leaves_model_untouched() -> None:
    model = FAMILIES["llama"].build()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="group_size=48"):
        hf_ptq.quantize(model, PtqConfig(bits=4, group_size=48))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_group_size_skip_layer_that_does_not_divide(tmp_path: Path) -> None:
    """Layers whose in_features the group size does not divide can be kept in full precision instead."""
    model = FAMILIES["llama"].build()
    model.config.intermediate_size = 96  # down_proj in_features 96: 64 divides the others only
    model = type(model)(model.config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="down_proj"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "f", quantization_config=PtqConfig(group_size=64))
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "f", quantization_config=PtqConfig(group_size=64, modules_to_not_convert=["down_proj"])
    )
    assert isinstance(q.model.layers[0].mlp.up_proj, QuantLinear)
    assert not isinstance(q.model.layers[0].mlp.down_proj, QuantLinear)


CONFIGS = [
    PtqConfig(),
    PtqConfig(method="int8"),
    PtqConfig(method="rtn", bits=3, group_size=-1, sym=True, compute_dtype="float32"),
    PtqConfig(method="rtn", bits=2, group_size=0, modules_to_not_convert=["mlp.down_proj", "lm_head"]),
    PtqConfig(dataset=["first calibration text", "second one"], num_samples=2, seq_len=16, batch_size=1),
    PtqConfig(dataset=torch.ones(2, 8, dtype=torch.long)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_to_dict_json_round_trip(cfg: PtqConfig) -> None:
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["quant_method"] == "hf_ptq"
    again = PtqConfig(**data)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert PtqConfig.from_dict(data) == cfg  # transformers' own rebuild path
    assert json.loads(cfg.to_json_string()) == data


def test_dataset_is_described_not_embedded() -> None:
    texts = ["the quick brown fox", "jumps over the lazy dog"]
    cfg = PtqConfig(dataset=texts)
    desc = cfg.to_dict()["dataset_description"]
    assert desc["source"] == "texts" and desc["count"] == 2
    other = PtqConfig(dataset=["the quick brown fox", "jumps over the lazy cat"]).to_dict()["dataset_description"]
    assert desc["sha256"] != other["sha256"]
    assert PtqConfig(dataset=list(texts)).to_dict()["dataset_description"] == desc
    with pytest.raises(ValueError, match="dataset"):
        PtqConfig(dataset=[])
    with pytest.raises(ValueError, match="dataset"):
        PtqConfig(dataset=3.5)


def test_config_json_safe_with_dataset(tiny_llama_dir: Path, tmp_path: Path) -> None:
    texts = ["Calibration sentence number one, quite secret.", "Another private calibration line."]
    cfg = PtqConfig(method="rtn", bits=4, group_size=32, dataset=texts)
    q = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    q.save_pretrained(tmp_path / "q")
    raw = (tmp_path / "q" / "config.json").read_text()
    saved = saved_hf_ptq_config(json.loads(raw)["quantization_config"])
    for text in texts:
        assert text not in raw
        assert "secret" not in raw and "private" not in raw
    assert saved["quant_method"] == "hf_ptq"
    assert saved["dataset"] is None
    assert saved["dataset_description"]["count"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.config.quantization_config, PtqConfig)
    assert reloaded.config.quantization_config == PtqConfig(**saved)
    assert reloaded.config.quantization_config.dataset_description == cfg.dataset_description


def test_registration_is_idempotent(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["hf_ptq"] is PtqConfig
    assert auto.AUTO_QUANTIZER_MAPPING["hf_ptq"] is PtqHfQuantizer
    hf_ptq.registration.register("hf_ptq", PtqConfig, PtqHfQuantizer)
    hf_ptq.registration.register("hf_ptq", PtqConfig, PtqHfQuantizer)
    importlib.reload(hf_ptq)
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["hf_ptq"] is hf_ptq.PtqConfig
    assert auto.AUTO_QUANTIZER_MAPPING["hf_ptq"] is hf_ptq.PtqHfQuantizer
    # transformers' own names are untouched
    assert "gptq" in auto.AUTO_QUANTIZATION_CONFIG_MAPPING and "bitsandbytes_4bit" in auto.AUTO_QUANTIZER_MAPPING

    q = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_ptq.PtqConfig(group_size=32))
    q.save_pretrained(tmp_path / "q")
    importlib.reload(hf_ptq)
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(r.model.layers[0].self_attn.q_proj, QuantLinear)
    ids = input_ids()
    assert torch.equal(model_output(r, ids), model_output(q, ids))


def test_auto_config_rebuilds_ptq_config() -> None:
    cfg = PtqConfig(method="int8")
    rebuilt = transformers.quantizers.auto.AutoQuantizationConfig.from_dict(cfg.to_dict())
    assert isinstance(rebuilt, PtqConfig) and rebuilt == cfg
