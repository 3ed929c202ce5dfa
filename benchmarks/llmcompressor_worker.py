"""llm-compressor baseline on the benchmark protocol (DESIGN.md, "Benchmark protocol"): one method, one JSON line.

llm-compressor pins a different transformers than hf_ptq, so this script runs with its own virtualenv's python and
imports nothing from hf_ptq:

    python3 -m venv /work/lc-venv
    /work/lc-venv/bin/pip install torch==2.13.0
    /work/lc-venv/bin/pip install llmcompressor==0.14.0.1 torch==2.13.0
    /work/lc-venv/bin/python benchmarks/llmcompressor_worker.py --model CKPT_DIR --data WIKITEXT2_DIR \
        --method gptq --json-out /tmp/lc-gptq.json

Calibration: the first `--num-samples` consecutive `--seq-len`-token chunks of the tokenized `valid.txt`.
Evaluation: perplexity (fp32 logits) over the first `--windows` non-overlapping `--seq-len`-token windows of the
tokenized `test.txt`. `quant_s` times the `oneshot` call only; `load_s` the model load; `peak_rss_mb` is the
process's `ru_maxrss` (load + quantization + evaluation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def w4_group_asym_scheme(group_size: int) -> dict[str, Any]:
    """A compressed-tensors config group: int4 weights, per-group asymmetric scales, activations untouched."""
    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group_size, "symmetric": False}
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def gptq_recipe(args: argparse.Namespace) -> list[Any]:
    """GPTQ W4 g`group_size` asymmetric on every Linear but lm_head; block size, dampening, actorder: defaults."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    return [GPTQModifier(config_groups=w4_group_asym_scheme(args.group_size), ignore=["lm_head"])]


def smoothquant_w8a8_recipe(args: argparse.Namespace) -> list[Any]:
    """SmoothQuant (smoothing strength 0.8), then GPTQ with the W8A8 scheme (int8 per-channel weights, int8 dynamic
    per-token activations) on every Linear but lm_head: llm-compressor's W8A8 example."""
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    return [
        SmoothQuantModifier(smoothing_strength=0.8),
        GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    ]


def awq_recipe(args: argparse.Namespace) -> list[Any]:
    """AWQ (duo scaling, 20 grid points: its defaults) followed by the same W4 g`group_size` asymmetric scheme."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    _skip_pinning_without_accelerator()
    scheme = QuantizationModifier(config_groups=w4_group_asym_scheme(args.group_size), ignore=["lm_head"])
    return [AWQModifier(), scheme]


def _skip_pinning_without_accelerator() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations for faster host-to-device copies; without an
    accelerator `pin_memory` raises, so pinning becomes a no-op (it changes no value)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


# One entry per method: the llm-compressor recipe (a list of modifiers) it runs.
RECIPES: dict[str, Callable[[argparse.Namespace], list[Any]]] = {
    "gptq": gptq_recipe,
    "awq": awq_recipe,
    "smoothquant-w8a8": smoothquant_w8a8_recipe,
}


def token_ids(tokenizer: Any, path: Path) -> torch.Tensor:
    """All token ids of one text file, tokenized as a whole with the model's tokenizer, 1-D."""
    return tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]


def chunks(ids: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """The first `count` consecutive non-overlapping `length`-token chunks of `ids`, [count, length]."""
    if ids.numel() < count * length:
        raise ValueError(f"{count} chunks of {length} tokens need {count * length} tokens; the text has {ids.numel()}")
    return ids[: count * length].reshape(count, length)


def calibration_loader(samples: torch.Tensor) -> DataLoader:
    """Batch-1 loader over the calibration chunks, in order, as the model's forward kwargs."""
    rows = [{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in samples]
    return DataLoader(rows, batch_size=1, shuffle=False)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over all windows [n, seq], one window per forward, logits cast to float32."""
    total, count = 0.0, 0
    for window in windows:
        logits = model(window[None], use_cache=False).logits.float()[0, :-1]
        total += F.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.numel() - 1
    return math.exp(total / count)


def versions() -> dict[str, str]:
    """Versions of the packages and interpreter that produced the numbers."""
    names = ["llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate"]
    return {name: metadata.version(name) for name in names} | {"python": platform.python_version()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, quantize with `args.method`, evaluate; the result record."""
    from llmcompressor import oneshot
    from loguru import logger
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.remove()  # llm-compressor logs to stdout; keep stdout for the JSON line
    logger.add(sys.stderr, level="INFO")
    torch.manual_seed(0)
    res: dict[str, Any] = {"library": "llm-compressor", "method": args.method, "dtype": args.dtype}
    res |= {"num_samples": args.num_samples, "seq_len": args.seq_len, "windows": args.windows}
    res |= {"group_size": args.group_size, "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = chunks(token_ids(tokenizer, args.data / "valid.txt"), args.seq_len, args.num_samples)
    windows = chunks(token_ids(tokenizer, args.data / "test.txt"), args.seq_len, args.windows)

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
    res["load_s"] = time.perf_counter() - start

    recipe = RECIPES[args.method](args)
    start, cpu_start = time.perf_counter(), time.process_time()
    model = oneshot(model=model, recipe=recipe, dataset=calibration_loader(calibration), processor=tokenizer)
    res["quant_s"] = time.perf_counter() - start
    res["quant_cpu_s"] = time.process_time() - cpu_start  # less sensitive than wall time to a shared machine

    start = time.perf_counter()
    res["ppl"] = perplexity(model.eval(), windows)
    res["eval_s"] = time.perf_counter() - start
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    res["loadavg_end"] = os.getloadavg()
    res["recipe"] = [repr(modifier) for modifier in recipe]
    res["versions"] = versions()
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="local checkpoint folder (safetensors + tokenizer)")
    p.add_argument("--data", type=Path, required=True, help="folder with valid.txt (calibration) and test.txt")
    p.add_argument("--method", choices=sorted(RECIPES), default="gptq")
    p.add_argument("--num-samples", type=int, default=64, help="calibration chunks")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration chunk and per eval window")
    p.add_argument("--windows", type=int, default=40, help="evaluation windows")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="dtype the model is loaded in (float32: this CPU has no native bf16, bf16 matmuls are ~4x slower)",
    )
    p.add_argument("--json-out", type=Path, help="also write the JSON result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    line = json.dumps(run(args))
    if args.json_out:
        args.json_out.write_text(line + "\n", encoding="utf-8")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
