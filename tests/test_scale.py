"""Real sizes, CI-sized: synthetic checkpoints from `hf_ptq.evaluation.synthetic`, quantize-on-load memory measured
in a fresh process, and GPTQ with half the blocks offloaded to disk."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import load_with_blocks_on_disk
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq.evaluation.memory import checkpoint_bytes
from hf_ptq.evaluation.synthetic import (
    OUTLIER_CHANNELS,
    OUTLIER_GAIN,
    checkpoint_plan,
    checkpoint_size,
    real_config,
    synthetic_tensor,
    write_synthetic_checkpoint,
)
from hf_ptq.nn import QuantLinear
from hf_ptq.pipeline import sequential

# ~280M parameters (untied 32k vocabulary), bf16: 0.56 GB, big enough that the interpreter's own RSS is not most of it.
MID_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 14,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
}


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> Path:
    config = real_config("llama-3.2-1b", **MID_CONFIG)
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("synthetic") / "mid", config, max_shard_size=200 * 2**20)


def test_synthetic_checkpoint_has_the_model_shapes_and_is_sharded(tmp_path: Path) -> None:
    config = real_config("llama-3.2-1b", num_hidden_layers=2, vocab_size=4096)
    folder = write_synthetic_checkpoint(tmp_path / "small", config, max_shard_size=20 * 2**20, seed=3)
    plan = checkpoint_plan(config)
    assert "lm_head.weight" not in plan  # tied: stored once
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(plan)
    assert index["metadata"]["total_size"] == checkpoint_size(plan)
    assert len(set(index["weight_map"].values())) > 1
    for file in set(index["weight_map"].values()):
        with safe_open(folder / file, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                assert tensor.shape == plan[name] and tensor.dtype == torch.bfloat16, name
                assert torch.equal(tensor, synthetic_tensor(name, plan[name], config, 3, torch.bfloat16)), name
    norm = synthetic_tensor(
        "model.layers.0.input_layernorm.weight", plan["model.norm.weight"], config, 3, torch.float32
    )
    assert (norm == OUTLIER_GAIN).sum() == OUTLIER_CHANNELS and (norm == 1).sum() == norm.numel() - OUTLIER_CHANNELS
    weight = synthetic_tensor(
        "model.layers.0.mlp.up_proj.weight", plan["model.layers.0.mlp.up_proj.weight"], config, 3, torch.float32
    )
    assert abs(weight.std().item() - config.initializer_range) < 1e-3
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_synthetic_checkpoint_refuses_a_disk_too_small(tmp_path: Path) -> None:
    config = real_config("llama-3.2-1b", num_hidden_layers=1, vocab_size=1024)
    with pytest.raises(OSError, match=r"needs .* GiB free at .*: free some space"):
        write_synthetic_checkpoint(tmp_path / "x", config, disk_margin=2**60)
    assert not (tmp_path / "x").exists()


_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    import hf_ptq
    from transformers import AutoModelForCausalLM
    from hf_ptq.evaluation.memory import current_rss_bytes, high_water_rss_bytes, reset_high_water_rss
    folder, method, out = sys.argv[1:4]  # argv[4]: the PtqConfig's arguments
    before = current_rss_bytes()
    reset_high_water_rss()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=hf_ptq.PtqConfig(**json.loads(sys.argv[4]))
    )
    peak = high_water_rss_bytes()
    model.save_pretrained(out)
    print(json.dumps({"before": before, "peak": peak}))
    """
)


@pytest.mark.parametrize("method", ["rtn", "int8"])
def test_quantize_on_load_streams(mid_checkpoint: Path, tmp_path: Path, method: str) -> None:
    options = {"method": method} | ({"group_size": 128} if method == "rtn" else {})
    """Loading a bf16 checkpoint with quantize-on-load never holds the float model: the process's peak RSS grows
    by less than the bf16 checkpoint, and by at most 1.3x the quantized checkpoint it produces (measured in a fresh
    interpreter, VmHWM)."""
    out = tmp_path / method
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(mid_checkpoint), method, str(out), json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = res["peak"] - res["before"]
    bf16 = checkpoint_bytes(mid_checkpoint)
    quantized = checkpoint_bytes(out)
    assert quantized < bf16 * (0.5 if method == "rtn" else 0.75)  # both embeddings stay bf16: 0.24 of bf16
    assert grown < bf16, (grown, bf16)
    assert grown <= 1.3 * quantized, (grown, quantized)


def _quantized_state(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.cpu()
        for name, module in model.named_modules()
        if isinstance(module, QuantLinear)
        for key, value in module.state_dict().items()
    }


def test_gptq_with_half_the_blocks_on_disk_gives_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    # Offloaded blocks calibrate in the model's dtype; in-memory bf16 blocks calibrate in fp32 on CPUs without native
    # bf16 (`calibration_dtype`): pin the CPU class so that both walks run bf16 and must agree bit for bit everywhere.
    monkeypatch.setattr(sequential, "cpu_has_fast_bf16", lambda: True)
    config = real_config(
        "llama-3.2-1b",
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=2048,
        rope_scaling=None,
    )
    folder = write_synthetic_checkpoint(tmp_path / "float", config)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))

    def gptq():
        return hf_ptq.PtqConfig(method="gptq", bits=4, group_size=64, dataset=ids, batch_size=2)

    offloaded = load_with_blocks_on_disk(folder, gptq(), on_disk=(2, 3), blocks=4, dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=gptq())
    a, b = _quantized_state(offloaded), _quantized_state(plain)
    assert len(a) == len(b) and set(a) == set(b)
    assert sum(name.endswith("weight_packed") for name in a) == 4 * 7
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different
