"""SmolLM2-135M-Instruct quantized by hf_ptq, exported to every format and read back by that format's reader.

    .venv/bin/python benchmarks/exports.py                  # rtn w4 g32 asym, 16 windows of 512 tokens
    .venv/bin/python benchmarks/exports.py --sym --windows 40

Rows: the bf16 model, hf_ptq's own checkpoint, and each export with its size on disk and its perplexity on the
first windows of wikitext-2 test.txt (the protocol of shared/DESIGN.md, fewer windows by default: the machine is
shared). Readers: compressed-tensors through plain `from_pretrained`, GGUF through transformers' GGUF reader
(`gguf_file=`, dequantized to fp32), GPTQ through the reference v1 reader of tests/test_export_gptq.py (gptqmodel,
the usual reader, is not installed here).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith("tokenizer"))


def perplexity(model, windows) -> float:
    import torch

    from hf_ptq import evaluation as ev

    nll, count = 0.0, 0
    for window in windows:
        window_nll, n = ev.nll_sum(ev.causal_lm_logits(model, window[None]), window[None])
        nll, count = nll + window_nll, count + n
    return float(torch.tensor(nll / count).exp())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="evaluation text (wikitext-2 test.txt)")
    p.add_argument("--windows", type=int, default=16, help="perplexity windows of 512 tokens (protocol: 40)")
    p.add_argument("--group-size", type=int, default=32, help="hf_ptq group size (32: GGUF's block)")
    p.add_argument("--sym", action="store_true", help="symmetric weights (GGUF Q4_0 then holds them exactly)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    import hf_ptq
    from hf_ptq import evaluation as ev
    from hf_ptq.default_model import smollm2_checkpoint

    sys.path.insert(0, str(REPO / "tests"))
    from test_export_gptq import reference_load  # the reference GPTQ v1 reader

    logging.set_verbosity_error()
    ckpt = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenizer(ev.read_text(args.data), return_tensors="pt").input_ids[0]
    windows = ev.token_windows(ids, 512, args.windows)
    cfg = hf_ptq.PtqConfig(method="rtn", bits=4, group_size=args.group_size, sym=args.sym)
    rows = []

    def row(name: str, reader: str, size: int, load) -> None:
        start = time.perf_counter()
        model = load().eval()
        ppl = perplexity(model, windows)
        rows.append((name, reader, size / 2**20, ppl, time.perf_counter() - start))
        print(f"{name}: {size / 2**20:.1f} MiB, perplexity {ppl:.3f}", flush=True)

    row("bf16 (reference)", "transformers", folder_bytes(ckpt), lambda: AutoModelForCausalLM.from_pretrained(ckpt))
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=cfg, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="bench-exports-") as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "hf_ptq")
        row(f"hf_ptq {cfg.describe()}", "hf_ptq", folder_bytes(root / "hf_ptq"), lambda: model)
        exports = [
            ("compressed-tensors", {}, "transformers + compressed-tensors"),
            ("gptq", {}, "reference GPTQ v1 reader (fp32)"),
            ("gguf", {"gguf_type": "auto"}, "transformers GGUF reader (fp32)"),
            ("gguf", {"gguf_type": "q8_0"}, "transformers GGUF reader (fp32)"),
            ("gguf", {"gguf_type": "q4_1" if args.sym else "q4_0"}, "transformers GGUF reader (fp32)"),
        ]
        for fmt, options, reader in exports:
            out = root / f"{fmt}-{options.get('gguf_type', '')}"
            hf_ptq.export(model, out, format=fmt, tokenizer=tokenizer, **options)
            if fmt == "gguf":
                (path,) = out.glob("*.gguf")
                name = f"gguf {path.stem.removeprefix('model-')}"
                row(
                    name,
                    reader,
                    path.stat().st_size,
                    lambda o=out, f=path.name: AutoModelForCausalLM.from_pretrained(o, gguf_file=f),
                )
            elif fmt == "gptq":
                row(fmt, reader, folder_bytes(out), lambda o=out: reference_load(o))
            else:
                row(fmt, reader, folder_bytes(out), lambda o=out: AutoModelForCausalLM.from_pretrained(o))

    print(
        f"\nSmolLM2-135M-Instruct, {cfg.describe()}; perplexity on {len(windows)} windows of 512 tokens "
        f"of {args.data.name}"
    )
    print("\n| model | read by | size MiB | perplexity | load + eval s |\n|---|---|---|---|---|")
    for name, reader, mib, ppl, seconds in rows:
        print(f"| {name} | {reader} | {mib:.1f} | {ppl:.3f} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
