"""AWQ: the scale folding of every family leaves the float model unchanged, the grid search objective and its
never-worse-than-unscaled guarantee, the clipping objective, layouts that cannot fold, save / reload per family."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAMILIES, VOCAB, assert_same_model, input_ids, load_with_blocks_on_disk, model_output, rel_err
from transformers.pytorch_utils import Conv1D

import hf_ptq
from hf_ptq import PtqConfig
from hf_ptq.core.clip_search import clipped_qparams
from hf_ptq.core.quant import compute_qparams, quantize
from hf_ptq.methods.awq import AWQStats, _rounded, clipped_rtn, search_scale
from hf_ptq.nn import QuantLinear
from hf_ptq.nn.replace import filled_quant_linear
from hf_ptq.pipeline.blocks import find_blocks
from hf_ptq.pipeline.families import FamilyLayout, ScaleGroup, family_layout
from hf_ptq.pipeline.smoothing import fold_checked, fold_into_producer, producer_fits

CALIB = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(11))

# Scale groups whose producer fits in each tiny family (grouped-query attention: no v -> o fold in the Llama-likes
# and Phi-3; GPT-2 and BERT blocks have fewer foldable producers).
FOLDABLE = {"llama": 3, "mistral": 3, "qwen2": 3, "qwen3": 3, "opt": 4, "phi3": 3, "gemma2": 3, "gpt2": 3, "bert": 1}


def awq_config(**kwargs) -> PtqConfig:
    base = dict(method="awq", bits=4, group_size=32, dataset=CALIB, num_samples=8, seq_len=16, batch_size=8)
    return PtqConfig(**{**base, **kwargs})


def scale_inputs_(module: torch.nn.Module, s: torch.Tensor) -> None:
    """Multiply the input channels of a Linear / Conv1D weight by s."""
    if isinstance(module, Conv1D):  # weight [in, out]
        module.weight.data.mul_(s[:, None])
    else:
        module.weight.data.mul_(s)


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_folding_leaves_float_outputs_unchanged(family_name: str) -> None:
    family = FAMILIES[family_name]
    model = family.build(dtype=torch.float32)
    ids = input_ids()
    before = model_output(model, ids)
    layout = family_layout(model.config.model_type)
    _, blocks = find_blocks(model)
    g = torch.Generator().manual_seed(3)
    folded = 0
    for block in blocks:
        folded = 0
        for group in layout.groups:
            consumer = block.get_submodule(group.linears[0])
            n = consumer.weight.shape[0] if isinstance(consumer, Conv1D) else consumer.in_features
            if not producer_fits(block, group, n):
                continue
            s = torch.rand(n, generator=g) * 3 + 0.25
            fold_into_producer(block, group, layout, s)
            for name in group.linears:
                scale_inputs_(block.get_submodule(name), s)
            folded += 1
    assert folded == FOLDABLE[family_name]
    after = model_output(model, ids)
    assert rel_err(after, before) < 1e-5


def test_value_to_output_fold_without_grouped_query_attention() -> None:
    """With as many kv heads as heads, v_proj's rows take o_proj's scale (Phi-3: the v part of its fused qkv)."""
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB)
    for config in (
        transformers.LlamaConfig(num_key_value_heads=4, **shape),
        transformers.Phi3Config(num_key_value_heads=4, pad_token_id=0, **shape),
    ):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        ids = input_ids()
        before = model_output(model, ids)
        layout = family_layout(config.model_type)
        block = model.model.layers[0]
        group = layout.groups[1]
        assert producer_fits(block, group, 64)
        s = torch.linspace(0.3, 3.0, 64)
        fold_into_producer(block, group, layout, s)
        scale_inputs_(block.get_submodule(group.linears[0]), s)
        assert rel_err(model_output(model, ids), before) < 1e-5


def test_fold_into_quantized_producer_scales_its_rows() -> None:
    """A producer already quantized (v_proj before o_proj under true_sequential) takes the scale in its row scales:
    with `parts=3`, only its last third of rows (v of a fused qkv) changes."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    qw = quantize(linear.weight.data, 4, 32, False, torch.float32)
    layer = filled_quant_linear(linear, qw, dtype=torch.float32, compute_dtype="float32")
    block = torch.nn.Module()
    block.v = layer
    x = torch.randn(5, 64)
    before = layer(x)
    s = torch.linspace(0.5, 2.0, 16)
    undo = fold_into_producer(block, ScaleGroup("v", ("o",), parts=3), FamilyLayout(()), s)
    after = layer(x)
    assert torch.equal(after[:, :32], before[:, :32])
    assert torch.allclose(after[:, 32:] * s, before[:, 32:], rtol=1e-5, atol=1e-6)
    undo()
    assert torch.equal(layer(x), before)


def test_fold_that_changes_the_block_is_undone() -> None:
    """BERT's attention LayerNorm also feeds the residual: folding it into intermediate.dense would change the
    block, so the check refuses it and restores the norm exactly."""
    model = FAMILIES["bert"].build(dtype=torch.float32)
    block = model.encoder.layer[0]
    wrong = ScaleGroup("attention.output.LayerNorm", ("intermediate.dense",))
    layout = FamilyLayout((wrong,))
    norm = block.attention.output.LayerNorm
    weight, bias = norm.weight.detach().clone(), norm.bias.detach().clone()
    hidden = torch.randn(2, 12, 64)
    s = torch.linspace(0.3, 3.0, 64)
    assert not fold_checked(block, wrong, layout, s, lambda: block(hidden)[0])
    assert torch.equal(norm.weight, weight) and torch.equal(norm.bias, bias)
    right = ScaleGroup("attention.self.value", ("attention.output.dense",))
    assert fold_checked(block, right, FamilyLayout((right,)), s, lambda: block(hidden)[0])


def test_post_norm_opt_quantizes_unscaled_with_one_warning(caplog) -> None:
    """OPT-350m style blocks (norm after attention) do not fit the pre-norm table: no crash, a warning, and the
    unfoldable groups are quantized without scaling."""
    config = FAMILIES["opt"].make_config()
    config.do_layer_norm_before = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        hf_ptq.quantize(model, awq_config())
    warnings = [r for r in caplog.records if "can absorb" in r.getMessage()]
    assert len(warnings) == 1 and "self_attn.q_proj" in warnings[0].getMessage()
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith(("q_proj", "fc2")))


def outlier_inputs(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """Inputs [rows, n] with a few channels 20x larger than the rest, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    x[:, :: n // 4] *= 20
    return x


def stats_of(x: torch.Tensor) -> AWQStats:
    stats = AWQStats(x.shape[1])
    for chunk in x.split(64):
        stats.add_batch(chunk)
    return stats


def test_search_objective_is_the_output_error_and_never_worse_than_no_scaling() -> None:
    torch.manual_seed(0)
    x = outlier_inputs(256, 64)
    w = torch.randn(48, 64)
    stats = stats_of(x)
    assert torch.allclose(stats.hessian, 2 * x.t() @ x / 256, rtol=1e-4, atol=1e-3)
    assert torch.allclose(stats.mean_abs, x.abs().mean(0), rtol=1e-5)
    cfg = PtqConfig(method="awq", bits=3, group_size=32, duo_scaling=True, grid=10)
    s, errors = search_scale(w, stats.hessian, stats.mean_abs, cfg.scheme, cfg.options, torch.float32)
    assert len(errors) == 11
    # The chosen scale's objective, computed directly: 2/N Σ_t ||W x_t - Q(W s)(x_t / s)||².
    q = quantize(w * s, 3, 32, False, torch.float32).dequantize()
    direct = 2 * ((x @ w.t() - (x / s) @ q.t()) ** 2).sum().item() / 256
    assert direct == pytest.approx(min(errors), rel=1e-3)
    assert min(errors) < errors[0]  # outlier channels: scaling helps
    q1 = quantize(w, 3, 32, False, torch.float32).dequantize()
    no_scaling = 2 * ((x @ w.t() - x @ q1.t()) ** 2).sum().item() / 256
    assert no_scaling == pytest.approx(errors[0], rel=1e-3) and direct <= no_scaling


@pytest.mark.parametrize(("group_size", "sym"), [(32, False), (-1, True), (0, False)])
def test_search_candidates_are_rounded_as_the_model_will_store_them(group_size: int, sym: bool) -> None:
    """A candidate's Q(W s) / s is exactly what quantizing the bf16 weight W s and dequantizing gives."""
    torch.manual_seed(4)
    w, s = torch.randn(48, 64), torch.rand(64) + 0.5
    cfg = PtqConfig(method="awq", bits=4, group_size=group_size, sym=sym)
    expected = quantize((w * s).to(torch.bfloat16), 4, group_size, sym, torch.bfloat16).dequantize() / s
    assert torch.equal(_rounded(w, s, cfg.scheme, torch.bfloat16), expected)


def test_search_keeps_no_scaling_when_nothing_beats_it() -> None:
    """Uniform inputs and weights: every candidate is at least as bad as s = 1, which is then returned."""
    x = torch.ones(64, 32)
    w = torch.ones(8, 32)
    stats = stats_of(x)
    cfg = PtqConfig(method="awq", bits=4, group_size=32, grid=5)
    s, errors = search_scale(w, stats.hessian, stats.mean_abs, cfg.scheme, cfg.options, torch.float32)
    assert torch.equal(s, torch.ones(32)) and errors[0] <= min(errors)


def test_clipping_minimises_the_group_output_error() -> None:
    """With the inputs' Gram matrix, each row's range is the grid factor with the smallest output error, found here
    by brute force over the same factors."""
    torch.manual_seed(1)
    x = outlier_inputs(128, 32, seed=1)
    w = torch.randn(16, 32)
    w[0, 3] = 6.0  # an outlying weight worth clipping
    scale, zero = clipped_qparams(w, 3, False, torch.float32, x.t() @ x, min_shrink=0.5, steps=20)

    def output_error(sc: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(w / sc[:, None]) + zp.float()[:, None], -4, 3)
        return (((w - (q - zp.float()[:, None]) * sc[:, None]) @ x.t()) ** 2).sum(1)

    candidates = [
        compute_qparams(w.amin(1) * f, w.amax(1) * f, 3, False, torch.float32)
        for f in 1.0 - 0.5 * torch.arange(21) / 20
    ]
    brute = torch.stack([output_error(sc, zp) for sc, zp in candidates]).amin(0)
    assert torch.allclose(output_error(scale, zero), brute, rtol=1e-5)
    assert output_error(scale, zero)[0] < output_error(*candidates[0])[0]  # the outlier row is clipped


def test_clipped_rtn_is_never_worse_than_min_max() -> None:
    torch.manual_seed(2)
    x = outlier_inputs(256, 64, seed=2)
    w = torch.randn(32, 64)
    stats = stats_of(x)
    cfg = PtqConfig(method="awq", bits=3, group_size=32)
    clipped = clipped_rtn(w, stats.hessian, cfg.scheme).dequantize()
    plain = quantize(w, 3, 32, False, torch.float32).dequantize()
    err = lambda wq: ((x @ (w - wq).t()) ** 2).sum().item()  # noqa: E731
    assert err(clipped) <= err(plain)


def test_awq_beats_rtn_on_a_model_with_outlier_channels() -> None:
    model = FAMILIES["llama"].build(dtype=torch.float32)
    with torch.no_grad():  # a few hidden channels much larger, as trained LLMs have
        model.model.embed_tokens.weight[:, ::16] *= 25
    ref = model_output(model, CALIB)
    rtn = hf_ptq.quantize(copy.deepcopy(model), PtqConfig(method="rtn", bits=3, group_size=32))
    awq = hf_ptq.quantize(copy.deepcopy(model), awq_config(bits=3))
    assert rel_err(model_output(awq, CALIB), ref) < rel_err(model_output(rtn, CALIB), ref)


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_awq_every_family_save_reload(family_name: str, tmp_path: Path, caplog) -> None:
    family = FAMILIES[family_name]
    family.build().save_pretrained(tmp_path / "float")
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        q = family.auto_class.from_pretrained(tmp_path / "float", quantization_config=awq_config())
    assert "can absorb" not in caplog.text  # every group the table names folds, the rest is known unscaled
    assert {n for n, m in q.named_modules() if isinstance(m, QuantLinear)} == family.expected_linears()
    q.save_pretrained(tmp_path / "q")
    reloaded = family.auto_class.from_pretrained(tmp_path / "q")
    assert reloaded.config.quantization_config.method == "awq"
    assert_same_model(reloaded, q)


def test_awq_offloaded_block_matches_in_memory(tmp_path: Path) -> None:
    """accelerate offloading a block to disk: its norms take the folded scales too (made resident)."""
    model = FAMILIES["llama"].build(dtype=torch.float32)
    model.save_pretrained(tmp_path / "float")
    cfg = awq_config(compute_dtype="float32")
    offloaded = load_with_blocks_on_disk(tmp_path / "float", cfg)
    plain = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=cfg, dtype=torch.float32
    )
    norm_offloaded = offloaded.model.layers[1].input_layernorm.weight
    assert norm_offloaded.device.type == "cpu"
    assert torch.allclose(norm_offloaded, plain.model.layers[1].input_layernorm.weight)
    assert not torch.allclose(norm_offloaded, torch.ones_like(norm_offloaded))  # a scale was folded in
    ids = input_ids()
    assert rel_err(model_output(offloaded, ids), model_output(plain, ids)) < 1e-2


def test_awq_options_are_rejected_for_other_methods() -> None:
    with pytest.raises(ValueError, match=r"PtqConfig\.duo_scaling=False does not apply to method='gptq'.*'awq'"):
        PtqConfig(method="gptq", duo_scaling=False)
    with pytest.raises(ValueError, match=r"PtqConfig\.desc_act=True does not apply to method='awq'.*'gptq'"):
        PtqConfig(method="awq", desc_act=True)
    with pytest.raises(ValueError, match=r"PtqConfig\.grid=0 is invalid"):
        PtqConfig(method="awq", grid=0)
    cfg = PtqConfig(method="awq")
    assert (cfg.duo_scaling, cfg.grid, cfg.clip, cfg.true_sequential) == (True, 20, True, True)
    assert PtqConfig(**cfg.to_dict()) == cfg
