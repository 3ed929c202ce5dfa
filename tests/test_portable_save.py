"""hf_ptq's `save_pretrained` writes a compressed-tensors `quantization_config` (hf_ptq's config nested) wherever
compressed-tensors can express the model: plain transformers + compressed-tensors, in a process that never imports
hf_ptq, then loads the right weights; hf_ptq reloads the same folder on its own kernels, checksums checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from optional_extras import require_extra
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq import QuantLinear, W8A8Linear
from hf_ptq.formats.model_card import build_model_card

pytestmark = pytest.mark.extra("compressed-tensors")

PLAIN_READER = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
assert "hf_ptq" not in sys.modules
ids = torch.arange(1, 13).view(1, 12)
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        save_file({"logits": model(ids).logits.float().contiguous()}, folder + "/plain.safetensors")
"""

CONFIGS = {
    "rtn-w4-g32-sym": hf_ptq.PtqConfig(bits=4, group_size=32, sym=True),
    "rtn-w4-g32-asym": hf_ptq.PtqConfig(bits=4, group_size=32, sym=False),
    "int8": hf_ptq.PtqConfig(method="int8"),
    "w8a8-static": hf_ptq.SmoothQuantConfig(activations="static", num_samples=2, seq_len=16),
}


def _qdq_forward(self: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """What transformers + compressed-tensors computes for a W8A8 layer (see docs/loading.md)."""
    xf = x.float()
    scale = self.input_scale.float() if self.static else xf.abs().amax(-1, keepdim=True) / 127.5
    xq = torch.clamp(torch.round(xf / scale), -128, 127) * scale
    return torch.nn.functional.linear(xq, self.weight.float() * self.weight_scale.float(), self.bias)


@pytest.fixture(scope="module")
def saved(tiny_llama_with_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("portable")
    models = {}
    for name, config in CONFIGS.items():
        model = AutoModelForCausalLM.from_pretrained(
            tiny_llama_with_tokenizer_dir, dtype=torch.float32, quantization_config=config
        )
        model.save_pretrained(root / name)
        models[name] = model
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_READER, *(str(root / n) for n in CONFIGS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root, models


@pytest.mark.parametrize("name", CONFIGS)
def test_plain_transformers_reads_the_saved_model(saved, name):
    root, models = saved
    model = models[name]
    block = json.loads((root / name / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "compressed-tensors" and block["hf_ptq"]["quant_method"].startswith("hf_ptq")
    for module in model.modules():  # what the foreign reader computes, from hf_ptq's own modules
        if isinstance(module, QuantLinear):
            module.compute_dtype = "float32"
            module.invalidate_caches()
        elif isinstance(module, W8A8Linear):
            module.forward = types.MethodType(_qdq_forward, module)
    with torch.no_grad():
        ours = model(torch.arange(1, 13).view(1, 12)).logits
    plain = load_file(root / name / "plain.safetensors")["logits"]
    torch.testing.assert_close(plain, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_ptq_reloads_the_saved_model_on_its_kernels_with_checksums(saved, name):
    root, models = saved
    reloaded = AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32)
    assert type(reloaded.config.quantization_config) is type(models[name].config.quantization_config)
    assert reloaded.config.quantization_config == models[name].config.quantization_config
    assert reloaded.hf_quantizer.verify_report.checksums_checked > 0
    state, again = models[name].state_dict(), reloaded.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert hf_ptq.verify(root / name).checksums_checked == reloaded.hf_quantizer.verify_report.checksums_checked


def test_a_model_compressed_tensors_cannot_express_keeps_hf_ptq_quant_method(tiny_llama_dir, tmp_path):
    """HQQ's float zero points: saved as quant_method "hf_ptq", and the model card says it needs hf_ptq, and why."""
    require_extra("hqq")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_ptq.PtqConfig(method="hqq"))
    model.save_pretrained(tmp_path / "q")
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "hf_ptq" and "hf_ptq" not in block
    card = str(build_model_card(model, "me/tiny-hqq"))
    assert "It needs hf_ptq" in card and "float zero points" in card


def test_model_card_of_a_portable_checkpoint_says_plain_transformers_reads_it(saved):
    _, models = saved
    card = str(build_model_card(models["rtn-w4-g32-sym"], "me/tiny"))
    assert "plain\ntransformers with `pip install compressed-tensors` also loads it" in card


def test_a_newer_nested_hf_ptq_config_is_refused(saved, tmp_path):
    root, _ = saved
    folder = tmp_path / "edited"
    folder.mkdir()
    for f in (root / "rtn-w4-g32-sym").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["hf_ptq"]["quant_method"] = "hf_ptq_future"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="upgrade hf-ptq"):
        AutoModelForCausalLM.from_pretrained(folder)
