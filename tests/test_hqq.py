"""HQQ through hf_ptq: the hqq package's optimizer, hf_ptq's packed format (float zero points) and int4 kernel."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, assert_same_model, input_ids, model_output, rel_err
from safetensors import safe_open
from test_kernels import calls, check_close  # noqa: F401  (calls is a fixture)
from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq import PtqConfig
from hf_ptq.core.quant import quantize as rtn_quantize
from hf_ptq.nn import QuantLinear

pytestmark = pytest.mark.extra("hqq")


def hqq_reference(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ by the hqq package itself, as its HQQLinear does it (axis=1 groups of input channels, its defaults):
    (unsigned integers [out, in], dequantized weight [out, in] in fp32 from fp32 scale / zero)."""
    from hqq.core.quantize import Quantizer, hqq_base_quant_config

    params = hqq_base_quant_config(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"]
    params.pop("view_as_float")
    q_u, meta = Quantizer.quantize(w, bitpack=False, device="cpu", **params)
    deq = ((q_u.float() - meta["zero"].float()) * meta["scale"].float()).reshape(w.shape)
    return q_u.reshape(w.shape).float(), deq


def weight(out_f: int = 96, in_f: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[:, 3] *= 8  # an outlier channel, where an l_p (p < 1) fit and a min/max fit differ most
    return w.to(torch.bfloat16)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 64), (4, 32), (3, 32), (2, 16), (8, 128)])
def test_hqq_method_matches_hqq_package(bits: int, group_size: int) -> None:
    w = weight()
    qw = hf_ptq.methods.method_spec("hqq").quantize_weight(
        w, PtqConfig(method="hqq", bits=bits, group_size=group_size).scheme, None
    )
    q_ref, deq_ref = hqq_reference(w, bits, group_size)
    assert torch.equal(qw.q.float() + (1 << (bits - 1)), q_ref)  # the same integers
    assert qw.zero_point.is_floating_point() and qw.scale.dtype == w.dtype  # stored in the model's dtype
    # scale and zero point are stored in bf16: the dequantized weight moves by at most a bf16 rounding of each,
    # |q - zp| * ds + s * dzp <= eps * (|w| + |zp| * s)
    deq = qw.dequantize(torch.float32)
    step = qw.scale.float().repeat_interleave(group_size, dim=1)
    zp = qw.zero_point.float().abs().repeat_interleave(group_size, dim=1)
    assert ((deq - deq_ref).abs() <= 1.01 * 2**-8 * (deq_ref.abs() + zp * step) + 1e-7).all()


def test_hqq_beats_min_max_rounding_on_its_objective() -> None:
    """HQQ minimises a sub-linear norm of the weight error: its mean |error| is below RTN's (same grid, bits)."""
    w = weight().float()
    qw = hf_ptq.methods.method_spec("hqq").quantize_weight(
        w, PtqConfig(method="hqq", bits=4, group_size=64).scheme, None
    )
    hqq_err = (qw.dequantize() - w).abs().mean()
    rtn_err = (rtn_quantize(w, 4, 64, False).dequantize() - w).abs().mean()
    assert hqq_err < 0.98 * rtn_err  # measured: 0.96


@pytest.mark.parametrize("rows", (1, 9))
def test_float_zero_points_run_on_the_int4_kernel(calls: Counter, rows: int) -> None:  # noqa: F811
    w = weight()
    qw = hf_ptq.methods.method_spec("hqq").quantize_weight(w, PtqConfig(method="hqq", group_size=32).scheme, None)
    layer = QuantLinear(128, 96, False, 4, 32, False, dtype=torch.bfloat16, float_zero_point=True)
    layer.set_quantized(qw)
    assert torch.equal(layer.dequantized_weight(torch.float32), qw.dequantize(torch.float32))
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    check_close(layer, x)
    assert calls == Counter(int4_cpu_matmul=1, dense_matmul=1)  # dense once: inside forward_reference


def test_integer_and_float_zero_points_are_not_mixed() -> None:
    w = weight()
    int_layer = QuantLinear(128, 96, False, 4, 32, False, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float_zero_point=True"):
        int_layer.set_quantized(
            hf_ptq.methods.method_spec("hqq").quantize_weight(w, PtqConfig(method="hqq", group_size=32).scheme, None)
        )
    float_layer = QuantLinear(128, 96, False, 4, 32, False, dtype=torch.bfloat16, float_zero_point=True)
    with pytest.raises(ValueError, match="integer"):
        float_layer.set_quantized(rtn_quantize(w, 4, 32, False))


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "opt"])
def test_hqq_load_save_reload_exact(family_name: str, tmp_path: Path) -> None:
    family = FAMILIES[family_name]
    family.build().save_pretrained(tmp_path / "float")
    cfg = PtqConfig(method="hqq", group_size=32)
    model = family.auto_class.from_pretrained(tmp_path / "float", quantization_config=cfg)
    layers = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers == family.expected_linears()
    ids = input_ids()
    out = model_output(model, ids)
    assert rel_err(out, model_output(family.build(), ids)) < 0.1

    model.save_pretrained(tmp_path / "q")
    name = sorted(layers)[0]
    with safe_open(str(next((tmp_path / "q").glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.int32  # packed, 8 values a word
        assert f.get_tensor(f"{name}.weight_zero_point").dtype == torch.bfloat16  # HQQ's float zero points
        assert f"{name}.weight" not in f.keys()
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (saved["quant_method"], saved["method"], saved["group_size"]) == ("hf_ptq", "hqq", 32)

    assert_same_model(family.auto_class.from_pretrained(tmp_path / "q"), model)


def test_quantize_in_memory_equals_on_load(tiny_llama_dir: Path) -> None:
    cfg = PtqConfig(method="hqq", group_size=32)
    on_load = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    in_memory = hf_ptq.quantize(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), cfg)
    assert_same_model(in_memory, on_load)


def test_missing_hqq_package_names_the_extra_before_weights(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quantizing needs the hqq package (ImportError naming the extra hqq, before loading); a saved HQQ model
    reloads and runs without it."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=PtqConfig(method="hqq", group_size=32)
    )
    model.save_pretrained(tmp_path / "q")

    import transformers.modeling_utils as modeling_utils

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real_find_spec(name, *a)
    )
    with monkeypatch.context() as m:
        m.setattr(modeling_utils, "convert_and_load_state_dict_in_model", lambda *a, **k: pytest.fail("weights read"))
        with pytest.raises(ImportError, match=r"pip install -e \"\.\[hqq\]\" in your hf_ptq checkout"):
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=PtqConfig(method="hqq"))
    with pytest.raises(ImportError, match=r"\.\[hqq\]"):
        hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(method="hqq", group_size=32))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = input_ids()
    assert torch.equal(model_output(reloaded, ids), model_output(model, ids))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"group_size": 0}, "group_size"), ({"sym": True}, "sym"), ({"double_quant": True}, "double_quant")],
)
def test_hqq_rejects_fields_that_do_not_apply(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"PtqConfig\.{field}="):
        PtqConfig(method="hqq", **kwargs)


def test_dequantize_gives_float_linears(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=PtqConfig(method="hqq", group_size=32)
    )
    expected = model.model.layers[0].mlp.down_proj.dequantized_weight(torch.float32)
    model.dequantize(dtype=torch.float32)
    dense = model.model.layers[0].mlp.down_proj
    assert type(dense) is torch.nn.Linear and torch.equal(dense.weight, expected)


@pytest.mark.parametrize("rows", (1, 5))
def test_float_zero_points_run_on_the_packed_kernel(rows: int) -> None:
    """HQQ's float zero points become the packed kernel's fp32 centers (AVX512-BF16 CPUs)."""
    from hf_ptq import kernels

    if not kernels.packed_matmul_cpu_available():
        pytest.skip("hf_ptq's packed kernel needs AVX512-BF16 and a C compiler")
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(5)) * 0.05
    qw = hf_ptq.methods.method_spec("hqq").quantize_weight(w, PtqConfig(method="hqq", group_size=64).scheme, None)
    layer = QuantLinear(256, 96, False, 4, 64, False, dtype=torch.bfloat16, float_zero_point=True)
    layer.set_quantized(qw)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    assert layer._plan(x).matmul is kernels.packed_matmul_cpu
    check_close(layer, x)
