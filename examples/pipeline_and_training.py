"""Plug hf_ptq into scripts you already have: a `pipeline(...)` and a training loop.

1. pipeline: the existing `pipeline("text-generation", model=...)` call gets one more argument,
   `model_kwargs={"quantization_config": cfg}`; everything else stays.
2. training: a frozen quantized backbone feeds a small trainable head (a linear probe), the usual way to train on
   top of a quantized model: the packed weights are buffers, so the optimizer only sees the head.

Run on the embedded SmolLM2-135M model (offline):  python examples/pipeline_and_training.py
"""

from __future__ import annotations

import argparse

import torch
from transformers import pipeline

import hf_ptq

PROMPT = "The three primary colours are"
# A toy sentiment task written for this example: (text, label), 1 = positive.
REVIEWS = [
    ("I loved this film, the acting was wonderful.", 1),
    ("A delightful, warm and funny story.", 1),
    ("Great food and friendly staff, we will come back.", 1),
    ("The best concert I have been to in years.", 1),
    ("Terrible service and the soup was cold.", 0),
    ("Boring plot, I fell asleep halfway through.", 0),
    ("The hotel room was dirty and noisy.", 0),
    ("A waste of money, it broke after one day.", 0),
]


def generate(model_id: str, cfg: hf_ptq.PtqConfig) -> str:
    """The existing pipeline script, quantized by one extra argument."""
    generator = pipeline(
        "text-generation", model=model_id, model_kwargs={"quantization_config": cfg, "dtype": torch.bfloat16}
    )
    assert isinstance(generator.model.model.layers[0].mlp.down_proj, hf_ptq.QuantLinear)
    return generator(PROMPT, max_new_tokens=12, do_sample=False)[0]["generated_text"]


def train_probe(model_id: str, cfg: hf_ptq.PtqConfig, steps: int = 30) -> tuple[float, float]:
    """Train a linear head on the quantized backbone's mean hidden state; (first loss, last loss)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    backbone = AutoModel.from_pretrained(model_id, quantization_config=cfg, dtype=torch.bfloat16).eval()
    backbone.requires_grad_(False)  # frozen; the packed weights are buffers anyway
    batch = tokenizer([t for t, _ in REVIEWS], return_tensors="pt", padding=True)
    labels = torch.tensor([y for _, y in REVIEWS])
    with torch.no_grad():  # the backbone is frozen: compute its features once
        hidden = backbone(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1)
        features = (hidden * mask).sum(1) / mask.sum(1)
    head = torch.nn.Linear(features.shape[-1], 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model folder or Hub id (default: embedded SmolLM2-135M)")
    parser.add_argument("--method", default="rtn", choices=hf_ptq.method_names())
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.model is None:
        from hf_ptq.default_model import smollm2_checkpoint

        args.model = str(smollm2_checkpoint())
    cfg = hf_ptq.PtqConfig(method=args.method, group_size=None if args.method == "int8" else args.group_size)

    text = generate(args.model, cfg)
    print(f"pipeline ({cfg.describe()}): {text!r}")
    first, last = train_probe(args.model, cfg)
    print(f"linear probe on the quantized backbone: loss {first:.3f} -> {last:.3f}")
    return {"text": text, "first_loss": first, "last_loss": last}


if __name__ == "__main__":
    main()
