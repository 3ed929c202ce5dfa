"""GPTQ through the sequential pipeline: every family quantizes on load, saves and reloads; the block walk matches
a reference written here; offloaded models; in-memory `quantize`."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, VOCAB, input_ids, load_with_blocks_on_disk, model_output, rel_err
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ptq
from hf_ptq import PtqConfig
from hf_ptq.core.page_release import checkpoint_files_mapped
from hf_ptq.nn import QuantLinear

CALIB = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(7))
# One option set per family keeps the suite fast while covering act-order (g_idx saved and reloaded), static
# groups, per-stage and whole-block statistics, and symmetric grids.
OPTIONS = {
    "llama": {"desc_act": True},
    "mistral": {"true_sequential": False},
    "qwen2": {"desc_act": True, "static_groups": True},
    "qwen3": {"sym": True},
    "opt": {"desc_act": True},
    "phi3": {},
    "gemma2": {"bits": 3},
    "gpt2": {"desc_act": True},
    "bert": {"true_sequential": False, "bits": 8},
}


def gptq_config(**kwargs) -> PtqConfig:
    base = dict(method="gptq", bits=4, group_size=32, dataset=CALIB, num_samples=8, seq_len=16, batch_size=8)
    return PtqConfig(**{**base, **kwargs})


def quant_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_gptq_every_family_save_reload(family_name: str, tmp_path: Path, caplog) -> None:
    family = FAMILIES[family_name]
    float_model = family.build()
    float_model.save_pretrained(tmp_path / "float")
    cfg = gptq_config(**OPTIONS[family_name])
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        q = family.auto_class.from_pretrained(tmp_path / "float", quantization_config=cfg)
    assert "no calibration input" not in caplog.text  # every layer, BERT's pooler too, got statistics
    assert quant_names(q) == family.expected_linears()
    act_order = cfg.desc_act and not cfg.static_groups
    for name in family.expected_linears():
        module = q.get_submodule(name)
        assert (module.weight_g_idx is not None) == act_order, name
        assert module.weight_scale.dtype == torch.bfloat16
    ids = input_ids()
    out = model_output(q, ids)
    assert torch.isfinite(out).all()
    assert rel_err(out, model_output(float_model, ids)) < (0.3 if cfg.bits > 3 else 0.6)

    q.save_pretrained(tmp_path / "q")
    if act_order:
        with safe_open(str(next((tmp_path / "q").glob("*.safetensors"))), framework="pt") as f:
            assert any(k.endswith("weight_g_idx") for k in f.keys())
    r = family.auto_class.from_pretrained(tmp_path / "q")
    assert r.config.quantization_config == cfg
    assert quant_names(r) == quant_names(q)
    assert torch.equal(model_output(r, ids), out)


def reference_hessians(model: torch.nn.Module, quantized: torch.nn.Module, batches: list[torch.Tensor]) -> list:
    """Per block, the Hessians 2XXᵀ/N of the inputs of q_proj, o_proj, gate_proj, down_proj when the float model
    runs with blocks before it replaced by `quantized`'s dequantized weights (what a sequential walk must see)."""
    model = copy.deepcopy(model)
    names = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    result = []
    for i, layer in enumerate(model.model.layers):
        inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        hooks = [
            layer.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n, d=inputs: d[n].append(a[0]))
            for n in names
        ]
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
        for h in hooks:
            h.remove()
        for n in names:
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[n]]).double()
            result.append((2 * x.T @ x / x.shape[0]).float())
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                deq = quantized.get_submodule(f"model.layers.{i}.{name}").dequantized_weight(torch.float32)
                module.weight.data.copy_(deq)
    return result


def test_block_walk_calibrates_each_block_on_quantized_predecessors(monkeypatch) -> None:
    """Block i's statistics are those of the model whose blocks < i are quantized (whole-block statistics)."""
    import hf_ptq.methods.gptq as gptq_module

    seen = []
    original = gptq_module.gptq_quantize

    def recording(weight, hessian, *args, **kwargs):
        seen.append(hessian.clone())
        return original(weight, hessian, *args, **kwargs)

    monkeypatch.setattr(gptq_module, "gptq_quantize", recording)
    model = FAMILIES["llama"].build(dtype=torch.float32)
    q = hf_ptq.quantize(copy.deepcopy(model), gptq_config(true_sequential=False, compute_dtype="float32"))
    expected = reference_hessians(model, q, [CALIB])
    assert len(seen) == len(expected) == 8  # 2 blocks x (q/k/v, o, gate/up, down): shared inputs, one Hessian
    for got, ref in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # and it matters: block 1 on the float model's block-0 outputs has other statistics
    float_only = reference_hessians(model, model_as_quantized(model), [CALIB])
    assert not torch.allclose(seen[4], float_only[4], rtol=1e-4, atol=1e-5)


def model_as_quantized(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with a `dequantized_weight` on every Linear returning its float weight (no quantization)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if isinstance(module, torch.nn.Linear):
            module.dequantized_weight = lambda dtype, m=module: m.weight.detach().to(dtype)
    return clone


def test_true_sequential_calibrates_later_stages_on_quantized_earlier_ones() -> None:
    model = FAMILIES["llama"].build(dtype=torch.float32)
    whole = hf_ptq.quantize(copy.deepcopy(model), gptq_config(true_sequential=False))
    staged = hf_ptq.quantize(copy.deepcopy(model), gptq_config(true_sequential=True))
    first, later = whole.model.layers[0], staged.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):  # first stage: same inputs
        assert torch.equal(first.get_submodule(name).weight_packed, later.get_submodule(name).weight_packed)
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # inputs come through quantized projections
        assert not torch.equal(first.get_submodule(name).weight_packed, later.get_submodule(name).weight_packed)


def test_gptq_beats_rtn_on_calibration_data() -> None:
    model = FAMILIES["llama"].build(dtype=torch.float32)
    ref = model_output(model, CALIB)
    rtn = hf_ptq.quantize(copy.deepcopy(model), PtqConfig(method="rtn", bits=3, group_size=32))
    gptq = hf_ptq.quantize(copy.deepcopy(model), gptq_config(bits=3))
    assert rel_err(model_output(gptq, CALIB), ref) < rel_err(model_output(rtn, CALIB), ref)


def test_offloaded_blocks(tmp_path: Path) -> None:
    """accelerate offloading a block to disk: calibrated and quantized like the in-memory model."""
    model = FAMILIES["llama"].build(dtype=torch.float32)
    model.save_pretrained(tmp_path / "float")
    cfg = gptq_config(compute_dtype="float32")
    offloaded = load_with_blocks_on_disk(tmp_path / "float", cfg)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg, dtype=torch.float32)
    assert quant_names(offloaded) == quant_names(plain) == FAMILIES["llama"].expected_linears()
    for name in quant_names(plain):
        a = offloaded.get_submodule(name).dequantized_weight(torch.float32)
        b = plain.get_submodule(name).dequantized_weight(torch.float32)
        assert (a == b).float().mean() > 0.99, name
    ids = input_ids()
    assert rel_err(model_output(offloaded, ids), model_output(plain, ids)) < 1e-2


def test_quantize_in_memory_with_tokenizer(tiny_llama_with_tokenizer_dir: Path, tmp_path: Path) -> None:
    texts = ["The orchard behind the school has forty apple trees and one very old pear tree. " * 12]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer_dir)
    cfg = PtqConfig(method="gptq", group_size=32, dataset=texts, num_samples=4, seq_len=32, batch_size=2)
    on_load = AutoModelForCausalLM.from_pretrained(tiny_llama_with_tokenizer_dir, quantization_config=cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_with_tokenizer_dir)
    model.name_or_path = "nowhere"  # the tokenizer argument is used, not the model's repo
    in_memory = hf_ptq.quantize(model, cfg, tokenizer=tokenizer)
    expected, got = on_load.state_dict(), in_memory.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    in_memory.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = input_ids()
    assert torch.equal(model_output(reloaded, ids), model_output(in_memory, ids))


def test_reused_attention_outputs_change_nothing(monkeypatch) -> None:
    """With true_sequential, a finished attention module's outputs are stored and served on later passes: the same
    quantized weights as recomputing them, with fewer attention forwards."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    from hf_ptq.pipeline.reuse import OutputStore

    model = FAMILIES["llama"].build(dtype=torch.float32)
    calls = {"n": 0}
    forward = LlamaAttention.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaAttention, "forward", counting)
    cfg = gptq_config(true_sequential=True, batch_size=2)
    reused = hf_ptq.quantize(copy.deepcopy(model), cfg)
    with_reuse, calls["n"] = calls["n"], 0
    monkeypatch.setattr(
        OutputStore, "replaying_finished_children", lambda self, quantized, record: contextlib.nullcontext()
    )
    recomputed = hf_ptq.quantize(copy.deepcopy(model), cfg)
    assert with_reuse < calls["n"]
    for name in quant_names(recomputed):
        a, b = reused.get_submodule(name), recomputed.get_submodule(name)
        assert torch.equal(a.weight_packed, b.weight_packed) and torch.equal(a.weight_scale, b.weight_scale), name


def test_replaced_float_linears_are_released() -> None:
    """Nothing keeps a replaced float Linear (and its weight) alive once its QuantLinear is in place."""
    model = FAMILIES["llama"].build(dtype=torch.float32)
    refs = [weakref.ref(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert refs
    hf_ptq.quantize(model, gptq_config())
    gc.collect()
    assert all(r() is None for r in refs)


def test_small_models_calibrate_on_one_thread_with_the_same_result(monkeypatch) -> None:
    """A tiny model's walk runs on one CPU thread (each op would wait for a busy core on a loaded machine) and gives
    bit for bit the result of the walk with the caller's thread count."""
    from hf_ptq.pipeline import sequential

    threads_seen: set[int] = set()
    original = sequential.collect

    def recording(*args, **kwargs):
        threads_seen.add(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(sequential, "collect", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = FAMILIES["llama"].build()
        one = hf_ptq.quantize(copy.deepcopy(model), gptq_config(desc_act=True))
        assert threads_seen == {1} and torch.get_num_threads() == 2
        monkeypatch.setattr(sequential, "SMALL_WORK_MACS", 0)
        threads_seen.clear()
        caller = hf_ptq.quantize(model, gptq_config(desc_act=True))
        assert threads_seen == {2}
    finally:
        torch.set_num_threads(before)
    a, b = one.state_dict(), caller.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_page_release_only_with_mapped_checkpoints(tmp_path: Path, monkeypatch) -> None:
    """The walk gives back checkpoint pages of the float weights it replaces when the model was loaded from (mapped)
    safetensors files, and skips that work (a read of /proc/self/maps per layer group) for a model built in memory."""
    import sys

    from hf_ptq.pipeline import sequential

    if not sys.platform.startswith("linux"):
        pytest.skip("page release works on Linux only")
    released: list[int] = []
    original = sequential.release_file_pages

    def counting(*tensors):
        released.append(len(tensors))
        return original(*tensors)

    monkeypatch.setattr(sequential, "release_file_pages", counting)
    model = FAMILIES["llama"].build()
    model.save_pretrained(tmp_path)
    gc.collect()  # models of earlier tests may still map their checkpoints until collected
    mapped_elsewhere = checkpoint_files_mapped()
    hf_ptq.quantize(model, gptq_config())
    assert released == [] or mapped_elsewhere
    released.clear()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert checkpoint_files_mapped()
    hf_ptq.quantize(loaded, gptq_config())
    assert len(released) >= 8 and sum(released) >= 14  # every group of both blocks, each with its Linears
