"""Fine-tune a GPTQ-quantized model with a LoRA adapter (peft + transformers' Trainer), then save, reload and merge.

1. quantize: GPTQ w4 g64, calibrated on the training text this script carries;
2. train: `hf_ptq.prepare_for_training`, a peft LoRA adapter on every projection, a few `Trainer` steps (the
   quantized weights stay frozen and packed; only the adapter trains);
3. save the quantized base and the adapter, reload them (`PeftModel.from_pretrained` after `import hf_ptq`);
4. merge: `merge_and_unload()` rounds the merged weights onto each layer's own grid (still a quantized model, saved
   and reloaded as one; changes below half a grid step are lost), or, exactly, `dequantize()` first (float layers).

Run on the embedded SmolLM2-135M model (offline, about 3 minutes on 2 cores):  python examples/finetune_quantized.py
Needs the finetune extra: pip install "hf-ptq[finetune]". See docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_ptq  # before peft is used: hf_ptq's layers join peft's LoRA dispatch

# Written for this example: plain English prose about an invented mountain village, so that a few training steps
# have something to learn (names, places, habits) that the held-out text shares.
TRAIN_TEXT = """\
High in the mountains, at the end of a narrow railway, lies the village of Larkspur Halt. The train reaches Larkspur \
Halt twice a day, once in the morning and once in the evening, and the station master, Oskar Brandt, meets every \
train with a lantern and a brass whistle. Oskar Brandt has worked at the station of Larkspur Halt for thirty-one \
years, and he knows every passenger by name.

The village has one shop, run by a cheerful woman called Ilse Fenwick. Ilse Fenwick sells bread, cheese, candles, \
rope and warm wool socks, and she keeps a notebook of everything the village needs from the valley. When the \
morning train leaves Larkspur Halt, Oskar Brandt carries the notebook of Ilse Fenwick down to the valley, and the \
evening train brings the goods back up the mountain.

In summer the meadows above Larkspur Halt are full of goats, cows and wild flowers. The shepherd, a quiet young man \
called Piet Aldous, takes the goats up to the high pastures at dawn and brings them down at sunset. Walkers who come \
up on the morning train follow the goat paths to the glacier, and in the evening they buy cheese from Ilse Fenwick \
before the train takes them home.

In winter the snow is so deep that the railway is closed for weeks. Then the people of Larkspur Halt clear the \
station with shovels, Oskar Brandt keeps a fire burning in the waiting room, and Piet Aldous brings hay to the goats \
in the barn. Ilse Fenwick opens her shop for one hour every morning, and the village children ski down the slope \
behind the station until it is dark.

Every autumn the village holds a festival at the station of Larkspur Halt. The goats wear bells, the children sing \
songs about the mountain, and Oskar Brandt blows his brass whistle to start the dancing. Ilse Fenwick bakes apple \
cakes for everyone, and Piet Aldous plays the accordion on the platform until the last train has gone.
"""
HELD_OUT_TEXT = """\
When spring comes to Larkspur Halt, the snow melts and the railway opens again. Oskar Brandt polishes his lantern and \
his brass whistle, and the first morning train brings walkers up the mountain. Ilse Fenwick fills her shop with \
bread, cheese and wool socks, and Piet Aldous takes the goats back to the high pastures above the station.
"""
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def held_out_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token loss of `model` on `ids` [1, n], in eval mode."""
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model folder or Hub id (default: embedded SmolLM2-135M)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training / calibration sample")
    parser.add_argument("--steps", type=int, default=8, help="training steps (batch of 4 samples)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", help="output folder (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.model is None:
        from hf_ptq.default_model import smollm2_checkpoint

        args.model = str(smollm2_checkpoint())
    from peft import LoraConfig, PeftModel, get_peft_model

    out = Path(args.out or tempfile.mkdtemp(prefix="hf_ptq-finetune-"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_ids = tokenizer(TRAIN_TEXT, return_tensors="pt").input_ids[0]
    held_out = tokenizer(HELD_OUT_TEXT, return_tensors="pt").input_ids
    seq = args.seq_len
    samples = torch.stack([train_ids[i : i + seq] for i in range(0, len(train_ids) - seq + 1, seq // 4)])

    # 1. quantize (GPTQ w4 g64 on 8 samples of the training text) and save the quantized base
    cfg = hf_ptq.PtqConfig(
        method="gptq", bits=4, group_size=args.group_size, dataset=samples[:8], num_samples=8, seq_len=seq, batch_size=8
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg, dtype=torch.float32)
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")

    # 2. LoRA on the frozen quantized layers, trained by the Trainer
    model = hf_ptq.prepare_for_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.print_trainable_parameters()
    before = held_out_loss(model, held_out)
    training = TrainingArguments(
        output_dir=str(out / "trainer"),
        use_cpu=True,  # this example runs on CPU; drop it to train on a GPU
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    data = [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": s} for s in samples]
    Trainer(model=model, args=training, train_dataset=data).train()
    after = held_out_loss(model, held_out)
    print(f"held-out loss: {before:.4f} before training, {after:.4f} after {args.steps} steps")

    # 3. save the adapter (only the LoRA weights), reload base + adapter
    model.save_pretrained(out / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
    reloaded_loss = held_out_loss(reloaded, held_out)
    print(f"reloaded base + adapter: held-out loss {reloaded_loss:.4f}")

    # 4a. merge onto the quantized grid: still an hf_ptq model (QuantLinear layers), saved and reloaded as one; logs
    # a warning: merged weights are rounded onto each layer's grid, changes below half a grid step are lost
    merged = reloaded.merge_and_unload()
    assert isinstance(merged.model.layers[0].mlp.down_proj, hf_ptq.QuantLinear)
    merged.save_pretrained(out / "merged")
    merged_loss = held_out_loss(AutoModelForCausalLM.from_pretrained(out / "merged"), held_out)
    print(f"merged onto the 4-bit grid (saved, reloaded): held-out loss {merged_loss:.4f}")

    # 4b. exact merge: dequantize the base first (float nn.Linear layers), then peft's float merge
    exact = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
    exact.base_model.model.dequantize()
    exact_merged = exact.merge_and_unload()
    assert type(exact_merged.model.layers[0].mlp.down_proj) is torch.nn.Linear
    exact_loss = held_out_loss(exact_merged, held_out)
    print(f"dequantized, then merged exactly (float model): held-out loss {exact_loss:.4f}")
    print(f"saved under {out}: base/ (quantized), adapter/, merged/ (quantized, adapter merged)")
    return {
        "before": before,
        "after": after,
        "reloaded": reloaded_loss,
        "merged": merged_loss,
        "exact_merged": exact_loss,
        "out": str(out),
    }


if __name__ == "__main__":
    main()
