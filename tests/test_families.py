"""Quantize-on-load, save and reload for every supported model family, on tiny random models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, Family, float_weight, input_ids, int8, model_output, reference_rtn, rel_err, rtn_w4
from safetensors import safe_open
from transformers.pytorch_utils import Conv1D

from hf_ptq import PtqConfig
from hf_ptq.formats.save import saved_hf_ptq_config
from hf_ptq.nn import QuantLinear

CONFIGS = {"rtn-w4-g32-asym": rtn_w4, "int8": int8}
# Relative error of the outputs against the unquantized model (measured: 4-bit 0.10-0.21, Gemma-2 the largest;
# int8 0.01-0.02). Loose on purpose: the exact check is against the float model running reference-RTN weights.
BOUNDS = {"rtn-w4-g32-asym": 0.3, "int8": 0.04}


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """family name -> (saved bf16 checkpoint folder, the float model), built once per module."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(family: Family) -> tuple[Path, torch.nn.Module]:
        if family.name not in cache:
            model = family.build()
            path = tmp_path_factory.mktemp(f"{family.name}-float")
            model.save_pretrained(path)
            cache[family.name] = (path, model)
        return cache[family.name]

    return get


def quant_names(model: torch.nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def simulated_model(float_model: torch.nn.Module, names: set[str], cfg: PtqConfig) -> torch.nn.Module:
    """The float model with each quantized layer's weight replaced by the reference RTN weight."""
    sim = copy.deepcopy(float_model)
    for name in names:
        module = sim.get_submodule(name)
        deq = reference_rtn(float_weight(module), cfg.bits, cfg.group_size, cfg.sym).to(module.weight.dtype)
        module.weight.data.copy_(deq.t() if isinstance(module, Conv1D) else deq)
    return sim


def safetensors_tensors(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, bytes) of every tensor of every .safetensors file in `folder`."""
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = (t.dtype, tuple(t.shape), t.numel() * t.element_size())
    return out


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_quantize_save_reload(family_name: str, config_name: str, float_checkpoints, tmp_path: Path) -> None:
    family = FAMILIES[family_name]
    float_dir, float_model = float_checkpoints(family)
    cfg = CONFIGS[config_name]()
    q = family.auto_class.from_pretrained(float_dir, quantization_config=cfg)

    # every expected Linear is quantized, embeddings / lm_head are not and hold the original weights
    names = quant_names(q)
    assert names == family.expected_linears()
    for name in family.float_modules:
        module = q.get_submodule(name)
        assert not isinstance(module, QuantLinear)
        assert torch.equal(module.weight, float_model.get_submodule(name).weight), name
    for name in names:
        module = q.get_submodule(name)
        assert "weight" not in module._parameters, f"{name} kept its float weight"
        assert module.weight_packed.device.type == "cpu" and module.weight_scale.dtype == torch.bfloat16
        original = float_model.get_submodule(name)
        if original.bias is not None:
            assert torch.equal(module.bias, original.bias), name
        else:
            assert module.bias is None

    # outputs: close to the float model, and equal (up to bf16 matmul rounding) to the float model running
    # the reference-RTN weights
    ids = input_ids()
    float_out, q_out = model_output(float_model, ids), model_output(q, ids)
    assert torch.isfinite(q_out).all()
    assert rel_err(q_out, float_out) < BOUNDS[config_name]
    sim_out = model_output(simulated_model(float_model, names, cfg), ids)
    assert rel_err(q_out, sim_out) < 0.02
    assert rel_err(q_out, sim_out) < rel_err(q_out, float_out) / 2 or config_name == "int8"

    # save: safetensors only, compressed-tensors names, our config in config.json
    saved = tmp_path / "quantized"
    q.save_pretrained(saved)
    files = sorted(p.name for p in saved.iterdir())
    assert any(f.endswith(".safetensors") for f in files)
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    qcfg = saved_hf_ptq_config(json.loads((saved / "config.json").read_text())["quantization_config"])
    assert qcfg["quant_method"] == "hf_ptq"
    assert (qcfg["method"], qcfg["bits"], qcfg["group_size"], qcfg["sym"]) == (
        cfg.method,
        cfg.bits,
        cfg.group_size,
        cfg.sym,
    )
    tensors = safetensors_tensors(saved)
    for name in names:
        module = q.get_submodule(name)
        out_f, in_f = module.out_features, module.in_features
        assert f"{name}.weight" not in tensors
        assert tensors[f"{name}.weight_packed"][:2] == (torch.int32, (out_f, in_f * cfg.bits // 32))
        groups = in_f // cfg.group_size if cfg.group_size > 0 else 1
        assert tensors[f"{name}.weight_scale"][:2] == (torch.bfloat16, (out_f, groups))
        assert tensors[f"{name}.weight_shape"][:2] == (torch.int64, (2,))
        if cfg.sym:
            assert f"{name}.weight_zero_point" not in tensors
        else:
            assert tensors[f"{name}.weight_zero_point"][:2] == (torch.int32, (out_f * cfg.bits // 32, groups))

    # reload without a quantization_config: same modules, bit-identical outputs, reference weights
    r = family.auto_class.from_pretrained(saved)
    assert isinstance(r.config.quantization_config, PtqConfig) and r.config.quantization_config == cfg
    assert quant_names(r) == names
    assert torch.equal(model_output(r, ids), q_out)
    for name in names:
        module = r.get_submodule(name)
        ref = reference_rtn(float_weight(float_model.get_submodule(name)), cfg.bits, cfg.group_size, cfg.sym)
        assert torch.equal(module.dequantized_weight(torch.float32), ref), name
        assert torch.equal(module.weight_shape, torch.tensor([module.out_features, module.in_features]))
    for name in family.float_modules:
        assert torch.equal(r.get_submodule(name).weight, float_model.get_submodule(name).weight), name


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_modules_to_not_convert(family_name: str, float_checkpoints, tmp_path: Path) -> None:
    family = FAMILIES[family_name]
    float_dir, float_model = float_checkpoints(family)
    cfg = PtqConfig(method="rtn", bits=4, group_size=32, sym=False, modules_to_not_convert=[family.down_proj])
    q = family.auto_class.from_pretrained(float_dir, quantization_config=cfg)
    kept = {f"{family.layer_prefix}.{i}.{family.down_proj}" for i in range(2)}
    assert quant_names(q) == family.expected_linears() - kept
    for name in kept:
        module = q.get_submodule(name)
        assert isinstance(module, (torch.nn.Linear, Conv1D)) and not isinstance(module, QuantLinear)
        assert torch.equal(module.weight, float_model.get_submodule(name).weight)
    q.save_pretrained(tmp_path / "q")
    saved = saved_hf_ptq_config(json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"])
    assert saved["modules_to_not_convert"] == [family.down_proj]
    r = family.auto_class.from_pretrained(tmp_path / "q")
    assert quant_names(r) == quant_names(q)
    for name in kept:
        assert torch.equal(r.get_submodule(name).weight, float_model.get_submodule(name).weight)
    ids = input_ids()
    assert torch.equal(model_output(r, ids), model_output(q, ids))


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "bert"])
def test_four_bit_checkpoint_size(family_name: str, float_checkpoints, tmp_path: Path) -> None:
    """Packed 4-bit g32 layers: 0.5 B/weight + bf16 scale and packed zero per 32 weights = 0.29x bf16."""
    family = FAMILIES[family_name]
    float_dir, float_model = float_checkpoints(family)
    q = family.auto_class.from_pretrained(float_dir, quantization_config=rtn_w4())
    q.save_pretrained(tmp_path / "q")
    tensors = safetensors_tensors(tmp_path / "q")
    quantized, bf16 = 0, 0
    for name in family.expected_linears():
        parts = [k for k in tensors if k.startswith(name + ".weight")]
        assert parts, name
        quantized += sum(tensors[k][2] for k in parts)
        bf16 += float_weight(float_model.get_submodule(name)).numel() * 2
    assert quantized <= 0.3 * bf16, quantized / bf16
    float_tensors = safetensors_tensors(float_dir)
    float_total = sum(v[2] for v in float_tensors.values())
    assert sum(v[2] for v in tensors.values()) < float_total


@pytest.mark.parametrize(
    "cfg",
    [
        PtqConfig(method="rtn", bits=4, group_size=-1, sym=False),
        PtqConfig(method="rtn", bits=4, group_size=0, sym=False),
        PtqConfig(method="rtn", bits=8, group_size=32, sym=False),
        PtqConfig(method="rtn", bits=3, group_size=0, sym=True),
        PtqConfig(method="rtn", bits=2, group_size=64, sym=False),
        PtqConfig(method="rtn", bits=4, group_size=32, sym=True, compute_dtype="float32"),
    ],
    ids=lambda c: c.describe().replace(" ", "-"),
)
@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_other_granularities_round_trip(family_name: str, cfg: PtqConfig, float_checkpoints, tmp_path: Path) -> None:
    family = FAMILIES[family_name]
    float_dir, float_model = float_checkpoints(family)
    q = family.auto_class.from_pretrained(float_dir, quantization_config=cfg)
    assert quant_names(q) == family.expected_linears()
    q.save_pretrained(tmp_path / "q")
    r = family.auto_class.from_pretrained(tmp_path / "q")
    ids = input_ids(batch=1, seq=5)  # few rows: the packed kernels where they apply
    out = model_output(r, ids)
    assert torch.isfinite(out).all()
    assert torch.equal(out, model_output(q, ids))
    for name in family.expected_linears():
        ref = reference_rtn(float_weight(float_model.get_submodule(name)), cfg.bits, cfg.group_size, cfg.sym)
        assert torch.equal(r.get_submodule(name).dequantized_weight(torch.float32), ref), name


def test_generate_runs_on_quantized_model(float_checkpoints) -> None:
    """Decoding (one row per step: the packed kernel path) gives the same tokens as the reloaded model."""
    family = FAMILIES["llama"]
    float_dir, _ = float_checkpoints(family)
    q = family.auto_class.from_pretrained(float_dir, quantization_config=rtn_w4())
    ids = input_ids(batch=1, seq=4)
    out = q.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10) and torch.equal(out[:, :4], ids)
