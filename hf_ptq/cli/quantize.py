"""`hf-ptq quantize [MODEL] --method gptq --bits 4 --group-size 128 [--dataset ...] --out DIR [--push-to-hub REPO]`

Quantizes on load, saves the packed checkpoint and tokenizer (staged: an interrupted run leaves no folder), then
reloads it and prints its measurements and the checklist against the original model. With no MODEL it uses the
embedded SmolLM2-135M-Instruct and data-free calibration: no data and no network needed.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from ..folders import check_output_folder, staged_folder
from ..methods import method_names
from .common import add_config_arguments, add_eval_arguments, config_from_args, embedded_model, eval_options
from .common import thresholds as checklist_thresholds

NAME = "quantize"
HELP = "quantize a model, save it, and check it against the original"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--method", default="rtn", choices=method_names(), help="quantization method (default rtn)")
    add_config_arguments(parser)
    parser.add_argument("--out", help="output folder (default: ./<model>-hf_ptq-<method>-w<bits>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub repo, with a model card")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    parser.add_argument("--no-eval", action="store_true", help="skip the measurements and the checklist")
    add_eval_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ptq

    embedded = args.model is None
    cfg = config_from_args(args.method, args, embedded)  # every field validated before any long work
    options = eval_options(args)
    limits = checklist_thresholds(args)
    model_id = embedded_model() if embedded else args.model
    name = Path(model_id.rstrip("/")).name
    out = check_output_folder(args.out or f"{name}-hf_ptq-{cfg.method}-w{cfg.bits}", args.overwrite, "--out")

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    print(f"Quantizing {model_id} with {cfg.describe()}...")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_id, quantization_config=cfg, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    with staged_folder(out, args.overwrite, "--out") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    del model
    gc.collect()
    print(f"Quantized in {seconds:.1f} s -> {out}")

    result = None
    if not args.no_eval:
        print(f"Measuring {out} against {model_id}...")
        result = hf_ptq.evaluate(str(out), tokenizer, reference=model_id, **options)
        result.model.quantize_seconds = seconds
        print(f"\nEvaluation: {result.data}; {result.windows} window(s), {result.tokens_scored} tokens scored.\n")
        print(result.to_markdown(limits))
    if args.push_to_hub:
        from .push import push_folder

        push_folder(out, args.push_to_hub, metrics=result.headline() if result else None, private=args.private)
    return 0
