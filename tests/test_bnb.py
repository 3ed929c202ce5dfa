"""bitsandbytes methods behind PtqConfig: same layers as transformers' BitsAndBytesConfig, block size, save/reload."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, assert_same_model, input_ids, model_output, rel_err
from optional_extras import import_optional
from safetensors.torch import load_file
from test_hub import FakeHub, hub, write_files  # noqa: F401  (hub is a fixture)
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

import hf_ptq
from hf_ptq import PtqConfig
from hf_ptq.quantizer.bnb import STANDARD_STATE, BnbHfQuantizer, cpu_repack_applies

pytestmark = pytest.mark.extra("bnb")
bnb = import_optional("bitsandbytes")  # None without the extra: every test here is skipped then

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
    """Quantizing and reloading both need bitsandbytes: ImportError naming the extra bnb, before any weight is read."""
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
        with pytest.raises(ImportError, match=r"pip install -e \"\.\[bnb\]\" in your hf_ptq checkout"):
            AutoModelForCausalLM.from_pretrained(source, **kwargs)
    with pytest.raises(ImportError, match=r"\.\[bnb\]"):
        hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(method="llm_int8"))


def test_dequantize_gives_float_linears(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=PtqConfig(method="nf4"))
    layer = model.model.layers[0].mlp.down_proj
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    model.dequantize()
    dense = model.model.layers[0].mlp.down_proj
    assert type(dense) is torch.nn.Linear and not getattr(model, "is_quantized", False)
    assert torch.equal(dense.weight.float(), expected)


# Three blocks whose Linears all differ in shape: q/o [128, 128], k/v [16, 128] (one KV head of 16), gate/up
# [192, 128], down [128, 192]. At block size 64 a row holds 2 or 3 blocks, so scales read back in another order change
# the weights; k/v (16 rows) and, at 128 / 256, rows that are not whole blocks are what bitsandbytes' CPU kernel cannot
# take (it fails in the forward), so those layers run bitsandbytes' generic path next to repacked ones.
MIXED_LLAMA = dict(
    num_hidden_layers=3,
    hidden_size=128,
    intermediate_size=192,
    num_attention_heads=8,
    num_key_value_heads=1,
    vocab_size=128,
    bos_token_id=1,
    eos_token_id=2,
)
ROUND_TRIP = {  # name: (config, checkpoint and model dtype)
    "nf4": (PtqConfig(method="nf4"), torch.bfloat16),
    "fp4": (PtqConfig(method="fp4"), torch.bfloat16),
    "nf4-double-quant": (PtqConfig(method="nf4", double_quant=True), torch.bfloat16),
    "fp4-double-quant-g32": (PtqConfig(method="fp4", double_quant=True, group_size=32), torch.bfloat16),
    "nf4-g32": (PtqConfig(method="nf4", group_size=32), torch.bfloat16),
    "nf4-g128": (PtqConfig(method="nf4", group_size=128), torch.bfloat16),
    "nf4-double-quant-g256": (PtqConfig(method="nf4", double_quant=True, group_size=256), torch.bfloat16),
    # fp32 weights: block scales that bf16 (the CPU kernel's scale dtype) does not hold exactly
    "nf4-float32": (PtqConfig(method="nf4"), torch.float32),
    "fp4-double-quant-float32": (PtqConfig(method="fp4", double_quant=True), torch.float32),
    "llm_int8": (PtqConfig(method="llm_int8"), torch.bfloat16),
}


def save_mixed_llama(path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**MIXED_LLAMA), dtype=dtype).save_pretrained(path)
    return path


@pytest.fixture
def mixed_llama_dir(tmp_path: Path) -> Path:
    return save_mixed_llama(tmp_path / "mixed-float")


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def repacked_layers(model: torch.nn.Module) -> int:
    """How many Linear4bit layers bitsandbytes has repacked for its CPU kernel (it does so on AVX512-BF16 CPUs)."""
    return sum(
        getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_reload_after_inference_is_the_saved_model(name: str, tmp_path: Path) -> None:
    """Quantize, run, save, reload: the reloaded logits equal the saved model's bit for bit (same kernels on the same
    tensors), its state dict equals the saved files tensor by tensor, and the files equal those saved before the model
    ever ran (bitsandbytes' CPU repack at the first forward must not leak into the checkpoint)."""
    (cfg, dtype), ids = ROUND_TRIP[name], input_ids()
    float_dir = save_mixed_llama(tmp_path / "float", dtype)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg, dtype=dtype)
    model.save_pretrained(tmp_path / "fresh")
    before = model_output(model, ids)
    if cfg.method != "llm_int8" and bnb.functional.has_avx512bf16():
        # the case under test: the layers bitsandbytes' CPU kernel takes are in its layout when the model is saved
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert repacked_layers(model) == sum(map(cpu_repack_applies, layers))
        assert repacked_layers(model) > 0 or cfg.group_size > MIXED_LLAMA["hidden_size"]
    float_model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=dtype)
    assert rel_err(before, model_output(float_model, ids)) < 0.35  # 4-bit error (fp4: 0.28), not garbage

    model.save_pretrained(tmp_path / "q")
    on_disk = saved_tensors(tmp_path / "q")
    assert_same_tensors(on_disk, saved_tensors(tmp_path / "fresh"))
    assert_same_tensors(model.state_dict(), on_disk)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.hf_quantizer, BnbHfQuantizer)
    assert isinstance(reloaded.model.layers[2].mlp.down_proj, bnb_layer_type(cfg.method))
    assert_same_tensors(reloaded.state_dict(), on_disk)
    assert torch.equal(model_output(reloaded, ids), before)
    assert torch.equal(model_output(model, ids), before)  # and the saved model still computes what it did
    reloaded.save_pretrained(tmp_path / "again")  # the reloaded model, after inference, saves the same files
    assert_same_tensors(saved_tensors(tmp_path / "again"), on_disk)


@pytest.mark.parametrize("double_quant", [False, True])
def test_scales_changed_after_the_repack_are_saved_as_computed(
    double_quant: bool, mixed_llama_dir: Path, tmp_path: Path
) -> None:
    """A repacked layer whose pre-repack state hf_ptq did not keep (or no longer matches) is saved with the block
    scales it computes with, in block order and not nested: the reload still computes the same logits."""
    cfg, ids = PtqConfig(method="nf4", double_quant=double_quant), input_ids()
    model = AutoModelForCausalLM.from_pretrained(mixed_llama_dir, quantization_config=cfg, dtype=torch.bfloat16)
    before = model_output(model, ids)
    if not repacked_layers(model):
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    down = model.model.layers[1].mlp.down_proj
    delattr(down, STANDARD_STATE)
    model.save_pretrained(tmp_path / "q")
    on_disk = saved_tensors(tmp_path / "q")
    assert "model.layers.1.mlp.down_proj.weight.nested_absmax" not in on_disk
    assert on_disk["model.layers.1.mlp.down_proj.weight.absmax"].shape == (128 * 192 // 64,)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert_same_tensors(reloaded.state_dict(), on_disk)
    assert torch.equal(model_output(reloaded, ids), before)
    assert torch.equal(model_output(model, ids), before)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_after_inference(double_quant: bool, mixed_llama_dir: Path) -> None:
    """`dequantize()` of a model that ran (layers in bitsandbytes' CPU layout) gives the weights it gives before."""
    cfg = PtqConfig(method="nf4", double_quant=double_quant)
    fresh = AutoModelForCausalLM.from_pretrained(mixed_llama_dir, quantization_config=cfg, dtype=torch.bfloat16)
    ran = AutoModelForCausalLM.from_pretrained(mixed_llama_dir, quantization_config=cfg, dtype=torch.bfloat16)
    model_output(ran, input_ids())
    fresh.dequantize()
    ran.dequantize()
    assert_same_tensors(ran.state_dict(), fresh.state_dict())


def test_quantized_in_memory_saves_after_inference(mixed_llama_dir: Path, tmp_path: Path) -> None:
    """`hf_ptq.quantize` on a loaded model gets the same save path: run, save, reload, same logits and tensors."""
    cfg, ids = PtqConfig(method="nf4", double_quant=True), input_ids()
    model = hf_ptq.quantize(AutoModelForCausalLM.from_pretrained(mixed_llama_dir, dtype=torch.bfloat16), cfg)
    before = model_output(model, ids)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert_same_tensors(reloaded.state_dict(), saved_tensors(tmp_path / "q"))
    assert torch.equal(model_output(reloaded, ids), before)
