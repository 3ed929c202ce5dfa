"""hf_ptq.quantize on a model already in memory: same tensors as quantize-on-load, saves and reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, float_weight, input_ids, int8, model_output, reference_rtn, rtn_w4

import hf_ptq
from hf_ptq import PtqConfig
from hf_ptq.formats.save import saved_hf_ptq_config
from hf_ptq.nn import QuantLinear

CONFIGS = {"rtn-w4": rtn_w4, "int8": int8, "rtn-w4-perchannel": lambda: PtqConfig(group_size=-1, sym=False)}


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("family_name", ["llama", "gpt2", "opt", "bert"])
def test_quantize_in_memory_equals_quantize_on_load(family_name: str, config_name: str, tmp_path: Path) -> None:
    family = FAMILIES[family_name]
    cfg = CONFIGS[config_name]()
    float_model = family.build()
    float_model.save_pretrained(tmp_path / "float")
    originals = {n: float_weight(float_model.get_submodule(n)).detach().clone() for n in family.expected_linears()}
    on_load = family.auto_class.from_pretrained(tmp_path / "float", quantization_config=cfg)

    in_memory = hf_ptq.quantize(family.build(), cfg)  # same seed: the same float weights
    assert in_memory.is_quantized and in_memory.config.quantization_config == cfg
    names = {n for n, m in in_memory.named_modules() if isinstance(m, QuantLinear)}
    assert names == family.expected_linears()

    expected, got = on_load.state_dict(), in_memory.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    for name in names:
        ref = reference_rtn(originals[name], cfg.bits, cfg.group_size, cfg.sym)
        assert torch.equal(in_memory.get_submodule(name).dequantized_weight(torch.float32), ref), name

    ids = input_ids()
    out = model_output(in_memory, ids)
    assert torch.equal(out, model_output(on_load, ids))

    in_memory.save_pretrained(tmp_path / "q")
    assert not list((tmp_path / "q").glob("*.bin"))
    saved = saved_hf_ptq_config(json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"])
    assert PtqConfig(**saved) == cfg
    reloaded = family.auto_class.from_pretrained(tmp_path / "q")
    assert {n for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)} == names
    assert torch.equal(model_output(reloaded, ids), out)


def test_quantize_honours_modules_to_not_convert() -> None:
    model = FAMILIES["llama"].build()
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    hf_ptq.quantize(model, PtqConfig(group_size=32, modules_to_not_convert=["mlp.down_proj", "self_attn.o_proj"]))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantLinear) and isinstance(layer.mlp.up_proj, QuantLinear)
    assert not isinstance(layer.mlp.down_proj, QuantLinear) and not isinstance(layer.self_attn.o_proj, QuantLinear)
    assert torch.equal(layer.mlp.down_proj.weight, down)
    assert not isinstance(model.lm_head, QuantLinear)


def test_quantize_twice_raises() -> None:
    model = hf_ptq.quantize(FAMILIES["llama"].build(), rtn_w4())
    with pytest.raises(ValueError, match="already quantized"):
        hf_ptq.quantize(model, rtn_w4())


def test_quantized_layers_hold_no_float_weight() -> None:
    """The in-memory path frees what it replaces: no float parameter besides norms, embeddings, head, biases."""
    model = hf_ptq.quantize(FAMILIES["llama"].build(), rtn_w4())
    for name, _ in model.named_parameters():
        assert not name.endswith(("_proj.weight",)), name
    assert all(m.weight_packed.dtype == torch.int32 for m in model.modules() if isinstance(m, QuantLinear))
