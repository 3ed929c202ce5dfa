"""Quantize a model on load, save it, reload it, and prepare a Hub upload with a model card.

Run on the embedded SmolLM2-135M model (offline):   python examples/quantize_and_push.py
Run on any model folder or Hub id:                  python examples/quantize_and_push.py MODEL --method int8
Add --push-to-hub ME/REPO to upload (needs a Hugging Face token and network).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ptq


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model folder or Hub id (default: embedded SmolLM2-135M)")
    parser.add_argument("--method", default="rtn", choices=hf_ptq.method_names())
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out", help="output folder (default: a temporary folder)")
    parser.add_argument("--push-to-hub", metavar="REPO")
    args = parser.parse_args(argv)

    if args.model is None:
        from hf_ptq.default_model import smollm2_checkpoint

        args.model = str(smollm2_checkpoint())
    cfg = hf_ptq.PtqConfig(method=args.method, group_size=None if args.method == "int8" else args.group_size)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    out = args.out or tempfile.mkdtemp(prefix="hf_ptq-example-")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("Quantization makes models smaller.", return_tensors="pt").input_ids
    with torch.no_grad():
        same = torch.equal(model(ids).logits, reloaded(ids).logits)
    print(f"{cfg.describe()}: saved to {out}; reload gives identical logits: {same}")
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub, tokenizer=tokenizer)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return {"out": out, "identical": same}


if __name__ == "__main__":
    main()
