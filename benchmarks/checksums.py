"""What verifying a checkpoint costs: SHA-256 of every tensor at save, `hf_ptq.verify`, and `from_pretrained` with
and without the checksum check (`HF_PTQ_VERIFY_CHECKSUMS`), measured in one run.

Rows:
- `digest in memory`: `checksums.tensor_digests` of a state dict (what `save_pretrained` adds), ms per GB;
- `check from file`: `checksums.check_checksums` of a saved file, page cache warm (what loading adds), ms per GB;
- `verify, no checksums` / `verify`: `hf_ptq.verify(folder)` of the quantized SmolLM2-135M (layout and values
  only / with checksums);
- `from_pretrained` with `HF_PTQ_VERIFY_CHECKSUMS=0` and `=1`: loading that checkpoint, best of `--repeats`.

The throughput rows use a synthetic file of `--gigabytes` GB of random int32 tensors (a 4-bit checkpoint's packed
weights), the others the embedded SmolLM2-135M quantized with RTN w4 g64 and a Llama-3.2-1B-shaped checkpoint of
random weights quantized with RTN w4 g128 (its numbers are costs only). Run it alone on the machine:

    .venv/bin/python benchmarks/checksums.py [--gigabytes 1] [--repeats 5] [--no-1b]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import hf_ptq
from hf_ptq.default_model import smollm2_checkpoint
from hf_ptq.formats.checksums import _workers, check_checksums, checksum_metadata, tensor_digests
from hf_ptq.formats.safetensors_file import read_header


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def throughput_rows(work: Path, gigabytes: float, repeats: int) -> list[tuple[str, float, str]]:
    per_tensor = 64 << 20  # 64 MB tensors, about one large layer's packed weight
    count = max(1, round(gigabytes * (1 << 30) / per_tensor))
    shape = (per_tensor // 4,)
    tensors = {
        f"layer{i}.weight_packed": torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32) for i in range(count)
    }
    size_gb = count * per_tensor / (1 << 30)
    file = work / "model.safetensors"
    save_file(tensors, str(file), metadata=checksum_metadata(tensors))
    check_checksums([read_header(file)])  # warm the page cache
    memory_s = best(lambda: tensor_digests(tensors), repeats)
    file_s = best(lambda: check_checksums([read_header(file)]), repeats)
    return [
        ("digest in memory (save)", memory_s * 1000 / size_gb, f"ms/GB ({size_gb:.2f} GB, {_workers()} threads)"),
        ("check from file (load, warm cache)", file_s * 1000 / size_gb, f"ms/GB ({size_gb:.2f} GB)"),
    ]


def llama_1b_shaped(work: Path) -> Path:
    """A Llama-3.2-1B-shaped checkpoint with random bf16 weights (hidden 2048, 16 layers, GQA 32/8, vocab 128256,
    tied embeddings): for the cost of loading at a real size only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = work / "llama-1b-shaped"
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def load_rows(work: Path, repeats: int, model_id: str, label: str, group_size: int) -> list[tuple[str, float, str]]:
    from transformers import AutoModelForCausalLM

    folder = work / f"{label}-rtn"
    cfg = hf_ptq.PtqConfig(method="rtn", bits=4, group_size=group_size)
    AutoModelForCausalLM.from_pretrained(model_id, quantization_config=cfg).save_pretrained(folder)
    size_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / (1 << 30)
    rows = [(f"**{label}**, rtn w4 g{group_size} checkpoint", size_gb * 1024, "MB")]
    verify_fast = best(lambda: hf_ptq.verify(folder, checksums=False), repeats)
    verify_full = best(lambda: hf_ptq.verify(folder), repeats)
    rows.append(("verify, no checksums", verify_fast * 1000, "ms"))
    rows.append(
        (
            "verify",
            verify_full * 1000,
            f"ms: {(verify_full - verify_fast) * 1000 / size_gb:.0f} ms/GB for the checksums",
        )
    )
    loads: dict[str, list[float]] = {"0": [], "1": []}
    for _ in range(repeats):  # alternate, so that drift on a shared machine hits both alike
        for flag in loads:
            os.environ["HF_PTQ_VERIFY_CHECKSUMS"] = flag
            start = time.perf_counter()
            AutoModelForCausalLM.from_pretrained(folder)
            loads[flag].append(time.perf_counter() - start)
    os.environ.pop("HF_PTQ_VERIFY_CHECKSUMS")
    off, on = min(loads["0"]), min(loads["1"])
    rows.append(("from_pretrained, HF_PTQ_VERIFY_CHECKSUMS=0", off * 1000, "ms"))
    rows.append(("from_pretrained, checksums checked", on * 1000, f"ms: {on / off:.3f}x the unchecked load"))
    median = _median_ratio(loads)
    rows.append(("checksum share of load", (on - off) * 1000 / size_gb, f"ms/GB (median of pairs {median:.3f}x)"))
    return rows


def _median_ratio(loads: dict[str, list[float]]) -> float:
    return statistics.median(b / a for a, b in zip(loads["0"], loads["1"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0, help="size of the synthetic file (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row, best kept (default 5)")
    parser.add_argument("--no-1b", action="store_true", help="skip the Llama-3.2-1B-shaped rows (~5 GB of disk)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("HF_PTQ_BENCH_TMP")) as tmp:
        work = Path(tmp)
        rows = throughput_rows(work, args.gigabytes, args.repeats)
        rows += load_rows(work, args.repeats, str(smollm2_checkpoint()), "SmolLM2-135M", 64)
        if not args.no_1b:
            rows += load_rows(work, args.repeats, str(llama_1b_shaped(work)), "Llama-3.2-1B-shaped", 128)
    print("| what | value | unit |\n|---|---|---|")
    for name, value, unit in rows:
        print(f"| {name} | {value:.0f} | {unit} |")


if __name__ == "__main__":
    main()
