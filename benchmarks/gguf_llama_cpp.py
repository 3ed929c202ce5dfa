"""hf_ptq's GGUF exports against llama.cpp's own quantizer, both run by llama.cpp (SmolLM2-135M-Instruct).

    LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin .venv/bin/python benchmarks/gguf_llama_cpp.py
    ... --rows llama-bf16,llama-q4_0,hf-gptq-q4_0 --chunks 16 --no-bench

Every row is a GGUF file scored by `llama-perplexity` on the same chunks of 512 tokens of WikiText-2 test (it scores
the second half of each chunk, so its numbers are lower than the project's own perplexity protocol) and, unless
--no-bench, timed by `llama-bench` (pp512 / tg64, 2 threads). llama.cpp's rows: `convert_hf_to_gguf.py` BF16 of the
float checkpoint, then `llama-quantize` (plain, and with an importance matrix from `llama-imatrix` on the
calibration text hf_ptq's GPTQ uses: 64 x 512 tokens of valid.txt). hf_ptq's rows: the float checkpoint quantized on
load, then `hf_ptq.export(format="gguf")`. The embedded model's weights were Q4_1 (groups of 32, asymmetric) before
they were dequantized: the g32 grids GGUF uses flatter every row here alike, llama.cpp's included.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
MIB = 2**20

# name: (label, how): how is ("llama", quantize type, imatrix, extra llama-quantize args) or ("hf_ptq", config, gguf)
ROWS = {
    "llama-bf16": ("llama.cpp BF16 (convert_hf_to_gguf)", ("llama", None, False, ())),
    "llama-q8_0": ("llama.cpp Q8_0", ("llama", "Q8_0", False, ())),
    "llama-q4_k_m": ("llama.cpp Q4_K_M", ("llama", "Q4_K_M", False, ())),
    "llama-q4_k_m-imatrix": ("llama.cpp Q4_K_M, imatrix", ("llama", "Q4_K_M", True, ())),
    "llama-q4_0": ("llama.cpp Q4_0, token_embd F16", ("llama", "Q4_0", False, ("--token-embedding-type", "f16"))),
    "llama-q4_0-imatrix": (
        "llama.cpp Q4_0, token_embd F16, imatrix",
        ("llama", "Q4_0", True, ("--token-embedding-type", "f16")),
    ),
    "hf-rtn-q4_0": ("hf_ptq rtn w4 g32 sym → q4_0", ("hf_ptq", dict(method="rtn", sym=True), "q4_0")),
    "hf-rtn-full-q4_0": (
        "hf_ptq rtn w4 g32 sym full_range → q4_0",
        ("hf_ptq", dict(method="rtn", sym=True, full_range=True), "q4_0"),
    ),
    "hf-gptq-q4_0": (
        "hf_ptq gptq w4 g32 sym full_range, no act-order → q4_0",
        ("hf_ptq", dict(method="gptq", sym=True, full_range=True, desc_act=False), "q4_0"),
    ),
    "hf-gptq-static-q4_0": (
        "hf_ptq gptq w4 g32 sym full_range, act-order static groups → q4_0",
        ("hf_ptq", dict(method="gptq", sym=True, full_range=True, desc_act=True, static_groups=True), "q4_0"),
    ),
    "hf-gptq-q4_k_m": (
        "hf_ptq gptq w4 g32 asym, no act-order → q4_k_m",
        ("hf_ptq", dict(method="gptq", sym=False, desc_act=False), "q4_k_m"),
    ),
    "hf-gptq-keep-q4_k_m": (
        "hf_ptq gptq w4 g32 asym, no act-order, Q4_K_M's Q6_K layers kept float → q4_k_m",
        ("hf_ptq", dict(method="gptq", sym=False, desc_act=False, keep="q4_k_m"), "q4_k_m"),
    ),
    "hf-awq-q4_k_m": ("hf_ptq awq w4 g32 asym → q4_k_m", ("hf_ptq", dict(method="awq", sym=False), "q4_k_m")),
    # each Linear quantized onto the grid of its Q4_K_M type (`hf_ptq.gguf_layer_schemes`): Q5_0 / Q8_0 / Q6_K / Q4_K
    "hf-rtn-grid-q4_k_m": (
        "hf_ptq rtn, Q4_K_M's grids (gguf_layer_schemes) → q4_k_m",
        ("hf_ptq", dict(method="rtn", sym=False, grid="q4_k_m"), "q4_k_m"),
    ),
    "hf-gptq-grid-q4_k_m": (
        "hf_ptq gptq, Q4_K_M's grids, no act-order → q4_k_m",
        ("hf_ptq", dict(method="gptq", sym=False, desc_act=False, grid="q4_k_m"), "q4_k_m"),
    ),
    "hf-gptq-grid-static-q4_k_m": (
        "hf_ptq gptq, Q4_K_M's grids, act-order static groups → q4_k_m",
        ("hf_ptq", dict(method="gptq", sym=False, desc_act=True, static_groups=True, grid="q4_k_m"), "q4_k_m"),
    ),
    "hf-awq-grid-q4_k_m": (
        "hf_ptq awq, Q4_K_M's grids → q4_k_m",
        ("hf_ptq", dict(method="awq", sym=False, grid="q4_k_m"), "q4_k_m"),
    ),
}
OURS_Q4_K_M = [r for r in ROWS if r.startswith(("hf-gptq", "hf-awq")) and r.endswith("q4_k_m")]


def tool(bin_dir: Path, name: str, *args: str) -> str:
    done = subprocess.run([str(bin_dir / name), *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def calibration_text(tokenizer, samples: int, length: int) -> str:
    """The start of valid.txt holding `samples` x `length` tokens: the text hf_ptq's GPTQ calibrates on."""
    text = (DATA / "valid.txt").read_text(encoding="utf-8")
    ids = tokenizer(text)["input_ids"][: samples * length]
    return tokenizer.decode(ids)


def llama_rows(args, work: Path, float_dir: Path, calib: Path, wanted: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    bf16 = work / "llama-bf16.gguf"
    convert = Path(args.convert)
    if not bf16.exists():  # files already in --work are reused
        subprocess.run(
            [sys.executable, str(convert), str(float_dir), "--outtype", "bf16", "--outfile", str(bf16)],
            check=True,
            capture_output=True,
        )
    files["llama-bf16"] = bf16
    imatrix = work / "imatrix.gguf"
    if not imatrix.exists() and any(ROWS[r][1][2] for r in wanted if r.startswith("llama")):
        tool(args.bin, "llama-imatrix", "-m", str(bf16), "-f", str(calib), "-c", str(args.calib_len),
             "--chunks", str(args.calib_samples), "-o", str(imatrix), "-t", str(args.threads))  # fmt: skip
    for row in wanted:
        if ROWS[row][1][0] != "llama" or ROWS[row][1][1] is None:
            continue
        _, qtype, with_imatrix, extra = ROWS[row][1]
        out = work / f"{row}.gguf"
        flags = ["--imatrix", str(imatrix)] if with_imatrix else []
        if not out.exists():
            tool(args.bin, "llama-quantize", *flags, *extra, str(bf16), str(out), qtype, str(args.threads))
        files[row] = out
    return files


def hf_ptq_row(row: str, work: Path, float_dir: Path, calibration) -> tuple[Path, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ptq

    _, (_, options, gguf_type) = ROWS[row]
    options = dict(options)
    keep = options.pop("keep", None)
    grid = options.pop("grid", None)
    if grid:  # every Linear on the grid of the type the preset exports it as
        options["layer_schemes"] = hf_ptq.gguf_layer_schemes(float_dir, grid)
    if keep:  # the tensors the preset writes with more bits stay float in the model, quantized from float on export
        from transformers import AutoConfig

        from hf_ptq.formats.gguf_types import more_bits_blocks

        layers = AutoConfig.from_pretrained(float_dir).num_hidden_layers
        options["modules_to_not_convert"] = [
            f"model.layers.{i}.{name}"
            for role, name in (("attn_v", "self_attn.v_proj"), ("ffn_down", "mlp.down_proj"))
            for i in more_bits_blocks(keep, role, layers)
        ]
    if options["method"] in ("gptq", "awq"):
        options["dataset"] = calibration
    cfg = hf_ptq.PtqConfig(bits=4, group_size=32, **options)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    embeddings = _embeddings(gguf_type)
    folder = hf_ptq.export(
        model, work / row, format="gguf", gguf_type=gguf_type, tokenizer=tokenizer, embeddings=embeddings
    )
    (path,) = folder.glob("*.gguf")
    return path, seconds


def _embeddings(gguf_type: str) -> str:
    """The Q4_0 rows keep token_embd F16 (as llama.cpp's Q4_0 rows are made), the K mixes follow the preset."""
    return "f16" if gguf_type == "q4_0" else "preset"


def perplexity(args, path: Path, text: Path) -> float:
    for _ in range(6):  # llama.cpp logs from a thread: about one fast run in six here lost its last lines
        out = tool(args.bin, "llama-perplexity", "-m", str(path), "-f", str(text), "-c", "512",
                   "--chunks", str(args.chunks), "-t", str(args.threads))  # fmt: skip
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        if found:
            return float(found.group(1))
    raise RuntimeError(f"llama-perplexity printed no estimate for {path}:\n{out[-2000:]}")


def speed(args, path: Path) -> tuple[float, float]:
    """llama-bench's prompt (pp512) and generation (tg64) tokens/s."""
    import json

    out = subprocess.run(
        [str(args.bin / "llama-bench"), "-m", str(path), "-p", "512", "-n", "64", "-r", "2", "-t", str(args.threads),
         "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    runs = json.loads(out)
    pp = next(r["avg_ts"] for r in runs if r["n_prompt"] == 512)
    tg = next(r["avg_ts"] for r in runs if r["n_gen"] == 64)
    return pp, tg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows: " + ", ".join(ROWS))
    parser.add_argument("--bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"), help="llama.cpp's bin folder")
    parser.add_argument("--convert", default=None, help="convert_hf_to_gguf.py (default: beside the build folder)")
    parser.add_argument("--chunks", type=int, default=40, help="512-token chunks llama-perplexity scores")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bench", action="store_true", help="skip llama-bench")
    parser.add_argument("--work", type=Path, help="keep the GGUF files in this folder (default: a temporary one)")
    args = parser.parse_args()
    if args.bin is None:
        parser.error("set LLAMA_CPP_BIN (or --bin) to the folder holding llama-perplexity, llama-quantize, ...")
    args.convert = args.convert or str(Path(args.bin).resolve().parents[1] / "convert_hf_to_gguf.py")
    wanted = args.rows.split(",")
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")

    from transformers import AutoTokenizer

    from hf_ptq import evaluation as ev
    from hf_ptq.default_model import smollm2_checkpoint

    float_dir = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        calib = work / "calibration.txt"
        calib.write_text(calibration_text(tokenizer, args.calib_samples, args.calib_len), encoding="utf-8")
        ids = tokenizer((DATA / "valid.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
        calibration = ev.token_windows(ids, args.calib_len, args.calib_samples)
        files = llama_rows(args, work, float_dir, calib, wanted)
        seconds: dict[str, float] = {}
        for row in wanted:
            if ROWS[row][1][0] == "hf_ptq":
                kept = sorted((work / row).glob("*.gguf"))
                if kept:  # made by an earlier run with the same --work: reused, its quantize time not measured
                    files[row] = kept[0]
                else:
                    files[row], seconds[row] = hf_ptq_row(row, work, float_dir, calibration)
        text = DATA / "test.txt"
        print(f"\nSmolLM2-135M-Instruct, llama-perplexity on {args.chunks} x 512 tokens of WikiText-2 test")
        print("| file | MiB | PPL | pp512 tok/s | tg64 tok/s | quantize s |\n|---|---|---|---|---|---|")
        results = {}
        for row in wanted:
            path = files[row]
            ppl = perplexity(args, path, text)
            pp, tg = (float("nan"), float("nan")) if args.no_bench else speed(args, path)
            results[row] = (path.stat().st_size / MIB, ppl, pp, tg)
            quantize = f"{seconds[row]:.0f}" if row in seconds else ""
            print(f"| {ROWS[row][0]} | {results[row][0]:.0f} | {ppl:.2f} | {pp:.1f} | {tg:.1f} | {quantize} |")
        pairs = [(ours, theirs) for ours in ("hf-gptq-q4_0", "hf-gptq-static-q4_0") for theirs in ("llama-q4_0",
                 "llama-q4_0-imatrix")] + [(ours, theirs) for ours in OURS_Q4_K_M
                 for theirs in ("llama-q4_k_m", "llama-q4_k_m-imatrix")]  # fmt: skip
        for ours, theirs in pairs:
            if ours in results and theirs in results:
                (mib, ppl, pp, tg), (tmib, tppl, tpp, ttg) = results[ours], results[theirs]
                print(f"{ours} / {theirs}: PPL {ppl / tppl:.3f}x, size {mib / tmib:.3f}x, "
                      f"pp512 {pp / tpp:.2f}x, tg64 {tg / ttg:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
