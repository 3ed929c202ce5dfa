"""Fine-tuning: every method whose quantizer says `is_trainable` takes a peft LoRA adapter and trains (QLoRA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import input_ids
from optional_extras import import_optional
from transformers import AutoModelForCausalLM

from hf_ptq import PtqConfig, method_names
from hf_ptq.quantizer import PtqHfQuantizer

pytestmark = pytest.mark.extra("finetune")
peft = import_optional("peft")  # None without the extra: every test here is skipped then


def trainable_methods() -> list[str]:
    return [m for m in method_names() if PtqHfQuantizer(PtqConfig(method=m)).is_trainable]


def test_the_bitsandbytes_methods_are_the_trainable_ones() -> None:
    assert trainable_methods() == ["fp4", "llm_int8", "nf4"]
    for method in ("rtn", "int8", "hqq", "gptq"):
        assert not PtqHfQuantizer(PtqConfig(method=method)).is_trainable


@pytest.mark.parametrize("method", trainable_methods())
@pytest.mark.parametrize("checkpointing", (False, True))
def test_lora_three_steps_lower_the_loss(method: str, checkpointing: bool, tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=PtqConfig(method=method), dtype=torch.float32
    )
    model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(model, lora)
    wrapped = model.base_model.model.model.layers[0].mlp.down_proj
    assert type(wrapped).__module__.startswith("peft.tuners.lora")  # peft recognised the quantized layer
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()
    }

    model.train()
    assert model.base_model.model.is_activation_checkpointing == checkpointing
    mlp = model.base_model.model.model.layers[0].mlp
    mlp_calls = []
    mlp.register_forward_pre_hook(lambda *args: mlp_calls.append(1))  # recomputation may stop mid-block
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = input_ids(batch=4, seq=16)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0], losses
    assert len(mlp_calls) == 3 * (2 if checkpointing else 1)  # checkpointing reruns the block in backward
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), frozen[name]), name  # only the adapter trained
