"""Decode speed and memory of hf_ptq's packed CPU kernel against torch's int4 / int8 weight-only kernels.

Quantizes a synthetic checkpoint (`hf_ptq.evaluation.synthetic`, default Llama-3.2-1B-shaped, random weights) on
load with each `--configs` entry, then, in the same process, times batch-1 decode of `--new-tokens` tokens
(`hf_ptq.evaluation.speed.decode_tokens_per_s`) with hf_ptq's kernel (`kernels.packed_matmul_cpu`, AVX512-BF16 CPUs)
and with torch's kernels (the packed kernel switched off, as on other CPUs), interleaved `--rounds` times, best of
each. It reports tok/s, bytes read per token ÷ time as a fraction of the read bandwidth (`bandwidth.py`), and the
resident memory once each path has decoded: torch's kernels keep a second copy of every layer's codes in their own
layout, the packed kernel reads `weight_packed` itself. Prefill (512 rows) takes the dense path either way.

    .venv/bin/python benchmarks/decode_kernels.py
    .venv/bin/python benchmarks/decode_kernels.py --configs rtn-g128,rtn-g32,int8,rtn-g128-emb4 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import hf_ptq  # noqa: E402
from hf_ptq import kernels  # noqa: E402
from hf_ptq.evaluation.memory import current_rss_bytes  # noqa: E402
from hf_ptq.evaluation.speed import decode_tokens_per_s  # noqa: E402

CONFIGS = {
    "rtn-g128": lambda: hf_ptq.PtqConfig(method="rtn", bits=4, group_size=128),
    "rtn-g64": lambda: hf_ptq.PtqConfig(method="rtn", bits=4, group_size=64),
    "rtn-g32": lambda: hf_ptq.PtqConfig(method="rtn", bits=4, group_size=32, sym=True),
    "int8": lambda: hf_ptq.PtqConfig(method="int8"),
    "rtn-g128-emb4": lambda: hf_ptq.PtqConfig(method="rtn", bits=4, group_size=128, embeddings="int4"),
    "rtn-g128-emb8": lambda: hf_ptq.PtqConfig(method="rtn", bits=4, group_size=128, embeddings="int8"),
    "int8-emb8": lambda: hf_ptq.PtqConfig(method="int8", embeddings="int8"),
}


def step_bytes(model) -> int:
    """Bytes one decode step reads (see scale.py's `decode_step_bytes`)."""
    from scale import decode_step_bytes

    return decode_step_bytes(model)


def reset_layouts(model) -> None:
    """Forget every kernel layout and plan, so the next call builds the one its path needs (and only that one)."""
    for module in model.modules():
        if hasattr(module, "invalidate_caches"):
            module.invalidate_caches()
    gc.collect()


def measure(model, prompt, new_tokens: int, own: bool) -> tuple[float, int]:
    """(tok/s, RSS after decoding) with the packed kernel on (`own`) or off."""
    original = kernels.packed_matmul_cpu_available
    available = original if own else (lambda: False)
    kernels.packed_matmul_cpu_available = available
    try:
        reset_layouts(model)
        rate = decode_tokens_per_s(model, prompt, new_tokens, repeats=1)
        return rate, current_rss_bytes()
    finally:
        kernels.packed_matmul_cpu_available = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.2-1b", help="a name of hf_ptq.evaluation.synthetic")
    p.add_argument("--configs", default="rtn-g128,rtn-g32,int8,rtn-g128-emb4")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", type=Path, default=None, help="synthetic checkpoints (default: scale.py's)")
    args = p.parse_args()
    from bandwidth import read_bandwidth
    from scale import build_checkpoint

    from hf_ptq.folders.cache import cache_root

    if not kernels.packed_matmul_cpu_available():
        raise SystemExit("hf_ptq's packed kernel does not run here (it needs AVX512-BF16 and a C compiler)")
    bandwidth = read_bandwidth(torch.get_num_threads(), 1 << 30)
    folder, _, _ = build_checkpoint(args.model, args.cache or cache_root() / "synthetic")
    prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(4))
    print(
        f"{args.model}, {torch.get_num_threads()} threads, read bandwidth {bandwidth / 2**30:.1f} GiB/s, "
        f"{args.new_tokens} new tokens, best of {args.rounds} interleaved rounds"
    )
    header = "| config | GB read per token | hf_ptq kernel tok/s | torch kernels tok/s | speed-up "
    print(header + "| bandwidth used (hf_ptq / torch) | RSS after decode GB (hf_ptq / torch) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=CONFIGS[name]())
        model.eval()
        load_s = time.perf_counter() - start
        nbytes = step_bytes(model)
        best = {True: (0.0, 0), False: (0.0, 0)}
        for _ in range(args.rounds):
            for own in (True, False):
                rate, rss = measure(model, prompt, args.new_tokens, own)
                if rate > best[own][0]:
                    best[own] = (rate, rss)
        (mine, rss_mine), (theirs, rss_theirs) = best[True], best[False]
        print(
            f"| {name} | {nbytes / 1e9:.2f} | {mine:.1f} | {theirs:.1f} | {mine / theirs:.2f}x "
            f"| {mine * nbytes / bandwidth:.0%} / {theirs * nbytes / bandwidth:.0%} "
            f"| {rss_mine / 1e9:.2f} / {rss_theirs / 1e9:.2f} |",
            flush=True,
        )
        print(f"  (loaded and quantized in {load_s:.0f} s)", file=sys.stderr)
        del model
        gc.collect()


if __name__ == "__main__":
    main()
