"""The real model: SmolLM2-135M-Instruct quantized with GPTQ w4 g64, a LoRA adapter trained by transformers' Trainer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from optional_extras import import_optional
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_ptq
from hf_ptq.default_model import smollm2_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.extra("finetune")]
peft = import_optional("peft")  # None without the extra: the test is skipped then

# Written for this test: plain English prose about one invented harbour town, its people and its habits, so that a
# few steps of training have something to learn (the names, the places) that the held-out text shares.
TRAIN_TEXT = """\
Quillhaven is a small harbour town on a rocky coast, and its lighthouse keeper is a woman called Edda Varnish. \
Every evening Edda Varnish climbs the ninety steps of the Quillhaven lighthouse, cleans the great lamp and writes the \
weather into a green ledger. The fishermen of Quillhaven trust her ledger more than the radio, because Edda Varnish \
has not missed a single evening in twenty years.

The baker of Quillhaven is an old man called Tobin Marsh. Tobin Marsh opens his bakery on Harrow Street at five \
o'clock in the morning, and by six the whole street smells of rye bread and cinnamon buns. The children of \
Quillhaven buy their buns from Tobin Marsh on the way to school, and the fishermen buy his rye bread before they \
sail.

On Saturdays the market of Quillhaven fills the square in front of the town hall. Farmers from the hills bring \
apples, cheese and honey, and the fishermen sell cod, herring and crabs straight from their boats. Edda Varnish buys \
honey for her tea, and Tobin Marsh buys apples for his pies. In the afternoon a brass band plays on the steps of the \
town hall, and the children of Quillhaven dance in the square.

In winter the storms come in from the north, and the ferry to the mainland stops for days at a time. Then the people \
of Quillhaven stay at home, mend their nets and tell stories by the fire. Edda Varnish keeps the lamp of the \
lighthouse burning through every storm, and Tobin Marsh bakes extra bread for the families whose boats cannot sail. \
When the storm is over, the whole town walks down to the harbour to see what the sea has left on the beach.

The school of Quillhaven has two classrooms and one teacher, a patient woman called Mira Holt. Mira Holt teaches \
the children to read, to count and to name the birds of the coast: gulls, terns, puffins and cormorants. Once a year \
she takes the children up the ninety steps of the lighthouse, and Edda Varnish shows them the great lamp and the \
green ledger.
"""
HELD_OUT_TEXT = """\
In spring the people of Quillhaven paint their boats in bright colours, and Tobin Marsh bakes a cake for the first \
boat that sails. Edda Varnish writes the date of the first sailing into the green ledger of the lighthouse. Mira \
Holt brings the children of Quillhaven down to the harbour to watch the boats leave, and the brass band plays on the \
steps of the town hall. In the evening the fishermen come back with cod and herring, and the whole town eats \
together in the square.
"""
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 128
STEPS = 8


def held_out_loss(model, ids: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


def lora_free_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not an adapter's (packed buffers and float parameters), cloned."""
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}


def test_trainer_trains_a_lora_adapter_on_gptq_smollm2(tmp_path: Path) -> None:
    started = time.perf_counter()
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_ids = tokenizer(TRAIN_TEXT, return_tensors="pt").input_ids[0]
    held_out = tokenizer(HELD_OUT_TEXT, return_tensors="pt").input_ids
    windows = [train_ids[i : i + SEQ] for i in range(0, len(train_ids) - SEQ + 1, SEQ // 4)]
    assert len(windows) >= 8 and held_out.shape[1] > 64

    # small calibration (8 x 128 tokens of the training text): GPTQ stays about a minute on 2 cores
    cfg = hf_ptq.PtqConfig(
        method="gptq",
        bits=4,
        group_size=64,
        dataset=torch.stack(windows[:8]),
        num_samples=8,
        seq_len=SEQ,
        batch_size=8,
        true_sequential=False,
    )
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
    assert isinstance(base.model.layers[0].self_attn.q_proj, hf_ptq.QuantLinear)
    base.save_pretrained(tmp_path / "base")
    quantized_at = time.perf_counter()

    model = hf_ptq.prepare_for_training(base, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    wrapped = model.base_model.model.model.layers[29].mlp.down_proj
    assert type(wrapped).__name__ == "QuantLoraLinear" and isinstance(wrapped.get_base_layer(), hf_ptq.QuantLinear)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    before_state = lora_free_state(model)
    before = held_out_loss(model, held_out)

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        use_cpu=True,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    data = [{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w} for w in windows]
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == STEPS
    trained_at = time.perf_counter()

    after = held_out_loss(model, held_out)
    assert after < before - 0.05, (before, after)  # the adapter learned what the held-out text shares
    after_state = lora_free_state(model)
    assert sorted(after_state) == sorted(before_state)
    for name, tensor in before_state.items():
        assert torch.equal(after_state[name], tensor), name  # only the adapter trained

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    assert held_out_loss(reloaded_base, held_out) == pytest.approx(before, rel=1e-4)  # the adapter starts at zero
    reloaded = peft.PeftModel.from_pretrained(reloaded_base, tmp_path / "adapter")
    assert type(reloaded.base_model.model.model.layers[29].mlp.down_proj).__name__ == "QuantLoraLinear"
    assert held_out_loss(reloaded, held_out) == pytest.approx(after, rel=1e-4)
    print(
        f"held-out loss {before:.4f} -> {after:.4f}; quantize {quantized_at - started:.0f} s, "
        f"train {STEPS} steps {trained_at - quantized_at:.0f} s, all {time.perf_counter() - started:.0f} s"
    )
