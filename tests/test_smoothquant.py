"""SmoothQuantConfig and the SmoothQuant method: validation, serialization, registration, statistics, smoothing
factors, static scales; W8A8 through the calibration pipeline for every family, saved and reloaded."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, VOCAB, input_ids, load_with_blocks_on_disk, model_output, rel_err
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto

import hf_ptq
from hf_ptq import PtqConfig, SmoothQuantConfig, SmoothQuantHfQuantizer
from hf_ptq.core.cpu import cpu_has_fast_bf16
from hf_ptq.core.quant import round_scale
from hf_ptq.methods.gptq import GPTQ
from hf_ptq.methods.smoothquant import (
    CLIP_GRID,
    SmoothQuantStats,
    clipped_input_scale,
    smooth,
    smoothing_factors,
    static_input_scale,
)
from hf_ptq.nn import QuantLinear, W8A8Linear
from hf_ptq.pipeline.blocks import find_blocks
from hf_ptq.pipeline.families import family_layout
from hf_ptq.pipeline.sequential import calibration_dtype
from hf_ptq.pipeline.smoothing import fold_into_producer, producer_fits

CALIB = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(7))


def sq_config(**kwargs) -> SmoothQuantConfig:
    return SmoothQuantConfig(**{"dataset": CALIB, "num_samples": 8, "seq_len": 16, "batch_size": 4, **kwargs})


# --- config --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"alpha": 1.5}, "alpha", ["[0, 1]"]),
        ({"alpha": "0.5"}, "alpha", ["[0, 1]", "'auto'"]),
        ({"alpha": True}, "alpha", ["[0, 1]"]),
        ({"activations": "per-token"}, "activations", ["'dynamic'", "'static'"]),
        ({"weight_method": "awq"}, "weight_method", ["'rtn'", "'gptq'"]),
        ({"damp_percent": 0.05}, "damp_percent", ["weight_method='gptq'"]),
        ({"weight_method": "gptq", "damp_percent": 2.0}, "damp_percent", ["(0, 1]"]),
        ({"weight_method": "gptq", "desc_act": "yes"}, "desc_act", ["True or False"]),
        ({"true_sequential": 1}, "true_sequential", ["True or False"]),
        ({"num_samples": 0}, "num_samples", ["positive"]),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert", ["list"]),
    ],
)
def test_invalid_values_raise_naming_field_and_allowed(kwargs: dict, field: str, allowed: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        SmoothQuantConfig(**kwargs)
    message = str(info.value)
    assert f"SmoothQuantConfig.{field}" in message
    for text in allowed:
        assert text in message, (text, message)


def test_unknown_field_and_foreign_quant_method() -> None:
    with pytest.raises(ValueError, match="alpah"):
        SmoothQuantConfig(alpah=0.5)
    with pytest.raises(ValueError, match="quant_method"):
        SmoothQuantConfig(quant_method="hf_ptq")


def test_smoothquant_is_not_a_weight_only_method() -> None:
    with pytest.raises(ValueError, match="method"):
        PtqConfig(method="smoothquant")
    assert "smoothquant" not in hf_ptq.method_names()


def test_defaults_and_gptq_options() -> None:
    cfg = SmoothQuantConfig()
    assert (cfg.alpha, cfg.activations, cfg.weight_method, cfg.method) == (0.5, "dynamic", "rtn", "smoothquant")
    scheme = cfg.scheme
    assert (scheme.bits, scheme.group_size, scheme.sym, cfg.damp_percent, cfg.true_sequential) == (
        8,
        -1,
        True,
        None,
        False,
    )
    assert not hasattr(cfg, "bits")  # the scheme is the one place the int8 grid is stated
    cfg = SmoothQuantConfig(weight_method="gptq", desc_act=False)
    assert cfg.method == "smoothquant_gptq" and cfg.true_sequential
    assert (cfg.damp_percent, cfg.desc_act, cfg.block_size, cfg.clip) == (0.01, False, 128, False)


CONFIGS = [
    SmoothQuantConfig(),
    SmoothQuantConfig(alpha=0.8, activations="static", modules_to_not_convert=["mlp.down_proj"]),
    SmoothQuantConfig(weight_method="gptq", damp_percent=0.02, dataset=["some text", "more text"], tokenizer="gpt2"),
    SmoothQuantConfig(dataset=torch.ones(2, 8, dtype=torch.long), num_samples=2, seq_len=8, alpha=1),
    SmoothQuantConfig(alpha="auto", activations="static"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_to_dict_json_round_trip(cfg: SmoothQuantConfig) -> None:
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["quant_method"] == "hf_ptq_smoothquant"
    assert data["dataset"] is None  # described, not embedded
    again = SmoothQuantConfig(**data)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert auto.AutoQuantizationConfig.from_dict(data) == cfg  # transformers' own rebuild path
    assert json.loads(cfg.to_json_string()) == data


def test_registration_is_idempotent() -> None:
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["hf_ptq_smoothquant"] is SmoothQuantConfig
    assert auto.AUTO_QUANTIZER_MAPPING["hf_ptq_smoothquant"] is SmoothQuantHfQuantizer
    hf_ptq.registration.register("hf_ptq_smoothquant", SmoothQuantConfig, SmoothQuantHfQuantizer)
    importlib.reload(hf_ptq)
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["hf_ptq_smoothquant"] is hf_ptq.SmoothQuantConfig
    assert "compressed-tensors" in auto.AUTO_QUANTIZATION_CONFIG_MAPPING  # transformers' own names untouched


# --- method ----------------------------------------------------------------------------------------------------
def test_smoothing_factors_formula() -> None:
    act = torch.tensor([4.0, 0.25, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_factors(act, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.25, 1.0, 1.0]))  # sqrt(a / w); dead channels keep s = 1
    s = smoothing_factors(act[:2], w[:2], 0.8)
    assert torch.allclose(s, act[:2] ** 0.8 / w[:2] ** 0.2)
    # after smoothing, the channel maxima of x / s and W * s meet at max|x|^α max|W|^(1-α)
    s = smoothing_factors(act[:2], w[:2], 0.5)
    assert torch.allclose(act[:2] / s, w[:2] * s)


def test_stats_maxima_and_rescaled_hessian() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 16, generator=g), torch.randn(3, 7, 16, generator=g)]
    stats = SmoothQuantStats(16, hessian=True)
    for b in batches:
        stats.add_batch(b.to(torch.bfloat16))
    rows = torch.cat([b.reshape(-1, 16) for b in batches]).to(torch.bfloat16).float()
    assert torch.equal(stats.amax, rows.abs().amax(0))
    s = torch.rand(16, generator=g) + 0.5
    stats.rescale(s)
    smoothed = GPTQ(16)
    smoothed.add_batch(rows / s)
    assert torch.allclose(stats.amax, rows.abs().amax(0) / s)
    tol = 2**-8 if cpu_has_fast_bf16() else 1e-5  # bf16 batches: per-batch sums rounded to bf16 (see GPTQ)
    assert torch.allclose(stats.hessian, smoothed.hessian, rtol=tol, atol=tol * smoothed.hessian.abs().max().item())
    with pytest.raises(RuntimeError, match="after rescale"):
        stats.add_batch(rows)


def test_static_input_scale_is_calibration_max_over_127() -> None:
    scale = static_input_scale(torch.tensor([0.5, 12.7, 3.0]), torch.bfloat16)
    assert scale.shape == (1,) and torch.equal(scale, torch.tensor([0.1]).to(torch.bfloat16).float())


# --- pipeline, save, reload ------------------------------------------------------------------------------------
def w8a8_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, W8A8Linear)}


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_every_family_quantizes_saves_and_reloads(family_name: str, tmp_path: Path) -> None:
    family = FAMILIES[family_name]
    float_model = family.build()
    float_model.save_pretrained(tmp_path / "float")
    ids = input_ids()
    reference = model_output(float_model, ids)
    static = family_name in ("llama", "opt", "gpt2", "phi3")
    cfg = sq_config(activations="static" if static else "dynamic")
    q = family.auto_class.from_pretrained(tmp_path / "float", quantization_config=cfg)
    assert w8a8_names(q) == family.expected_linears()
    assert not any(isinstance(m, QuantLinear) for m in q.modules())
    out = model_output(q, ids)
    assert rel_err(out, reference) < 0.08
    q.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        name = sorted(family.expected_linears())[0]
        assert f.get_tensor(f"{name}.weight").dtype == torch.int8
        assert f.get_tensor(f"{name}.weight_scale").shape[1] == 1
        assert (f"{name}.input_scale" in f.keys()) == static
        assert not any(k.endswith("weight_packed") for k in f.keys())
    reloaded = family.auto_class.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.config.quantization_config, SmoothQuantConfig)
    assert reloaded.config.quantization_config == SmoothQuantConfig(**cfg.to_dict())
    saved, again = q.state_dict(), reloaded.state_dict()
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    assert torch.equal(model_output(reloaded, ids), out)


def test_static_input_scale_comes_from_the_calibration_inputs(tiny_llama_dir: Path) -> None:
    """Each layer's static scale is a fraction (`CLIP_GRID`) of max|x| / 127 over the inputs it saw in calibration
    (the first block's q/k/v input is the normed embeddings, which quantization upstream does not change)."""
    q = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=sq_config(activations="static"))
    layer = q.model.layers[0].self_attn.q_proj
    # The block's input as calibration computed it: in fp32 on CPUs without native bf16 (`calibration_dtype`).
    work = calibration_dtype(q, torch.bfloat16)
    norm = copy.deepcopy(q.model.layers[0].input_layernorm).to(work)
    with torch.no_grad():
        seen = norm(q.model.embed_tokens(CALIB).to(work)).float()
    full = static_input_scale(seen.abs().amax().reshape(1), torch.float32)
    candidates = [round_scale(full * f, torch.bfloat16) for f in CLIP_GRID]
    assert any(torch.equal(layer.input_scale.float(), c) for c in candidates)
    assert layer.input_scale is not q.model.layers[0].self_attn.k_proj.input_scale  # saved separately
    assert torch.equal(layer.input_scale, q.model.layers[0].self_attn.k_proj.input_scale)


def test_clipped_input_scale_minimises_the_weighted_rounding_error() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 24, generator=g)
    x[7] *= 40  # one extreme token
    w = torch.randn(16, 24, generator=g)
    stats = SmoothQuantStats(24)
    stats.add_batch(x)
    scale = clipped_input_scale(w, stats, torch.float32)

    def error(scale: torch.Tensor) -> float:  # channels weighted by the squared norms of their weight columns
        x_q = torch.clamp(torch.round(x / scale), -127, 127) * scale
        return ((x - x_q).square() * w.square().sum(0)).sum().item()

    full = x.abs().amax() / 127
    errors = {f: error(full * f) for f in CLIP_GRID}
    best = min(errors, key=errors.get)
    assert torch.allclose(scale, full * best) and best < 1.0
    assert error(scale) < errors[1.0]


def test_quantize_in_memory_matches_from_pretrained(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg = sq_config(weight_method="gptq")
    loaded = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    hf_ptq.quantize(model, cfg)
    assert isinstance(model.hf_quantizer, SmoothQuantHfQuantizer)
    ids = input_ids()
    assert torch.equal(model_output(model, ids), model_output(loaded, ids))
    with pytest.raises(ValueError, match="already quantized"):
        hf_ptq.quantize(model, cfg)
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(
        model_output(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), ids), model_output(model, ids)
    )


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_layer_without_calibration_input_still_becomes_w8a8(activations: str, caplog) -> None:
    model = FAMILIES["llama"].build()
    model.model.layers[0].mlp.unused = nn.Linear(64, 32, dtype=torch.bfloat16)  # never called by the block
    hf_ptq.quantize(model, sq_config(activations=activations))
    unused = model.model.layers[0].mlp.unused
    assert isinstance(unused, W8A8Linear) and unused.static == (activations == "static")
    assert "saw no calibration input" in caplog.text


# --- smoothing -------------------------------------------------------------------------------------------------
def group_input_maxima(model: nn.Module, block: nn.Module, layout) -> dict[str, torch.Tensor]:
    """max |x| per channel of the input of each scale group's first Linear, over CALIB (fp32 [in] each)."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module, args):
            amax = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
            maxima[name] = amax if name not in maxima else torch.maximum(maxima[name], amax)

        return fn

    handles = [block.get_submodule(g.linears[0]).register_forward_pre_hook(hook(g.prev)) for g in layout.groups]
    with torch.no_grad():
        model(input_ids=CALIB)
    for h in handles:
        h.remove()
    return maxima


@pytest.mark.parametrize("family_name", ["llama", "opt", "phi3", "gemma2"])
def test_smoothing_alone_leaves_outputs_unchanged_and_balances_maxima(family_name: str) -> None:
    """SmoothQuant's factors folded into each block's producers (as the pipeline does, no rounding): the float
    model computes the same function, and each smoothed input's channel maxima equal the scaled weight's,
    max|x_j| / s_j = max|W_j| s_j (α = 0.5)."""
    model = FAMILIES[family_name].build(dtype=torch.float32)
    ids = input_ids()
    before = model_output(model, ids)
    layout = family_layout(model.config.model_type)
    cfg = SmoothQuantConfig(alpha=0.5)
    _, blocks = find_blocks(model)
    block = blocks[0]
    maxima = group_input_maxima(model, block, layout)
    expected: dict[str, torch.Tensor] = {}
    for group in layout.groups:
        consumers = [block.get_submodule(n) for n in group.linears]
        weight = torch.cat([m.weight.data for m in consumers])
        if not producer_fits(block, group, weight.shape[1]):
            continue
        stats = SmoothQuantStats(weight.shape[1])
        stats.amax = maxima[group.prev]
        s = smooth(weight, cfg.scheme, cfg.options, stats)
        assert not torch.allclose(s, torch.ones_like(s))
        fold_into_producer(block, group, layout, s)
        for m in consumers:
            m.weight.data.mul_(s)
        expected[group.prev] = torch.cat([m.weight.data for m in consumers]).abs().amax(0)
    assert len(expected) >= 2
    assert rel_err(model_output(model, ids), before) < 1e-5
    smoothed = group_input_maxima(model, block, layout)
    for prev, w_max in expected.items():
        assert torch.allclose(smoothed[prev], w_max, rtol=1e-4), prev


def without_smoothing(monkeypatch) -> None:
    """Make the smoothquant method skip smoothing (plain W8A8), to compare against."""
    from hf_ptq import methods

    spec = methods.method_spec("smoothquant")
    monkeypatch.setitem(methods.METHODS, "smoothquant", dataclasses.replace(spec, smooth=None))


def add_activation_outliers_(model: nn.Module, factor: float = 50.0) -> None:
    """Scale a few channels of every norm output feeding q/k/v and gate/up by `factor`, and the matching weight
    columns by 1 / factor: the float model computes the same function, but its Linears see outlier channels."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linears in (
                (layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)),
            ):
                norm.weight[::16] *= factor
                for linear in linears:
                    linear.weight[:, ::16] /= factor


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_smoothing_recovers_accuracy_on_a_model_with_activation_outliers(activations: str, monkeypatch) -> None:
    """With a few input channels 50x larger, one int8 scale per token (or per tensor) set by them leaves the other
    channels a handful of levels; smoothing moves the outliers into the weights and the error drops several-fold."""
    model = FAMILIES["llama"].build(dtype=torch.float32)
    ref = model_output(model, CALIB)
    add_activation_outliers_(model)
    assert rel_err(model_output(model, CALIB), ref) < 1e-5  # the same float function
    smoothed = hf_ptq.quantize(copy.deepcopy(model), sq_config(activations=activations))
    err_smoothed = rel_err(model_output(smoothed, CALIB), ref)
    without_smoothing(monkeypatch)
    plain = hf_ptq.quantize(copy.deepcopy(model), sq_config(activations=activations))
    err_plain = rel_err(model_output(plain, CALIB), ref)
    assert err_smoothed < 0.3 * err_plain, (err_smoothed, err_plain)


# --- alpha="auto" ----------------------------------------------------------------------------------------------
def test_stats_sample_is_an_even_stride_over_all_rows(monkeypatch) -> None:
    from hf_ptq.methods import smoothquant

    monkeypatch.setattr(smoothquant, "SAMPLE_ROWS", 10)
    stats = SmoothQuantStats(4)
    rows = torch.arange(4 * 45, dtype=torch.float32).reshape(45, 4)
    for chunk in rows.split([7, 13, 5, 20]):
        stats.add_batch(chunk)
    assert torch.equal(stats.sample, rows[::8])  # 45 rows: 23 -> 12 -> 6 kept, stride 8
    s = torch.tensor([1.0, 2.0, 4.0, 8.0])
    stats.rescale(s)
    assert torch.equal(stats.sample, rows[::8] / s)


def fake_w8a8_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> float:
    """||x wᵀ - Q(x / s) Q(w s)ᵀ||² with symmetric int8 per row (tokens of x / s, output channels of w s)."""

    def fq(t: torch.Tensor) -> torch.Tensor:
        scale = t.abs().amax(1, keepdim=True) / 127
        return torch.clamp(torch.round(t / scale), -128, 127) * scale

    return (fq(x / s) @ fq(w * s).t() - x @ w.t()).square().sum().item()


def test_alpha_search_picks_the_grid_point_with_the_smallest_w8a8_error() -> None:
    from hf_ptq.methods.smoothquant import ALPHA_GRID, search_alpha

    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 32, generator=g) * torch.linspace(0.1, 1, 32)
    x[:, 5] *= 60  # an outlier channel
    w = torch.randn(48, 32, generator=g) * 0.05
    stats = SmoothQuantStats(32)
    stats.add_batch(x)
    s = search_alpha(w, stats, static=False)
    errors = {a: fake_w8a8_error(x, w, smoothing_factors(stats.amax, w.abs().amax(0), a)) for a in ALPHA_GRID}
    best = min(errors, key=errors.get)
    assert torch.allclose(s, smoothing_factors(stats.amax, w.abs().amax(0), best))
    assert errors[best] < 0.5 * errors[0.0]  # the outlier is worth smoothing


def test_alpha_auto_end_to_end(monkeypatch) -> None:
    model = FAMILIES["llama"].build(dtype=torch.float32)
    ref = model_output(model, CALIB)
    add_activation_outliers_(model)
    auto_model = hf_ptq.quantize(copy.deepcopy(model), sq_config(alpha="auto"))
    assert auto_model.config.quantization_config.describe().startswith("smoothquant w8a8 alpha=auto")
    without_smoothing(monkeypatch)
    plain = hf_ptq.quantize(copy.deepcopy(model), sq_config())
    assert rel_err(model_output(auto_model, CALIB), ref) < 0.3 * rel_err(model_output(plain, CALIB), ref)


def test_fold_into_a_w8a8_producer_scales_its_rows() -> None:
    """A producer already quantized to W8A8 (v_proj before o_proj, up_proj before down_proj) takes the scale in its
    per-row weight scales and bias; undo restores it."""
    from hf_ptq.core.quant import W8A8Weight, quantize
    from hf_ptq.nn.replace import filled_w8a8_linear
    from hf_ptq.pipeline.families import FamilyLayout, ScaleGroup

    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=True)
    layer = filled_w8a8_linear(linear, W8A8Weight(quantize(linear.weight.data, 8, -1, True)), dtype=torch.float32)
    block = nn.Module()
    block.v = layer
    x = torch.randn(40, 64)
    before = layer(x)
    s = torch.linspace(0.5, 2.0, 32)
    undo = fold_into_producer(block, ScaleGroup("v", ("o",)), FamilyLayout(()), s)
    assert torch.allclose(layer(x) * s, before, rtol=1e-5, atol=1e-6)
    undo()
    assert torch.equal(layer(x), before)


def test_offloaded_block_matches_in_memory(tmp_path: Path) -> None:
    """accelerate offloading a block to disk: its norm takes the folded scale, its Linears become W8A8Linears on
    the execution device, and the model computes what the in-memory one does."""
    model = FAMILIES["llama"].build(dtype=torch.float32)
    model.save_pretrained(tmp_path / "float")
    cfg = sq_config(activations="static")
    offloaded = load_with_blocks_on_disk(tmp_path / "float", cfg)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg, dtype=torch.float32)
    layer = offloaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, W8A8Linear) and layer.weight.device.type == "cpu"
    assert torch.equal(layer.weight, plain.model.layers[1].mlp.down_proj.weight)
    norm = offloaded.model.layers[1].input_layernorm.weight
    assert torch.allclose(norm, plain.model.layers[1].input_layernorm.weight)
    assert not torch.allclose(norm, torch.ones_like(norm))  # a smoothing scale was folded in
    ids = input_ids()
    assert rel_err(model_output(offloaded, ids), model_output(plain, ids)) < 1e-2
