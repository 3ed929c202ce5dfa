"""LoRA training on quantized SmolLM2-135M: tokens per second of a training step and peak memory, per base format.

Rows (`--rows`): `bf16` (LoRA on the float bf16 model: the baseline), `gptq-w4` (GPTQ w4 g64, act-order, static
groups), `gptq-w4-dyn` (act-order with dynamic groups: `weight_g_idx`), `rtn-w4` (g64 asym), `int8`, `hqq-w4`
(g64), `nf4` (bitsandbytes through `PtqConfig(method="nf4")`, peft's own bnb LoRA layer). Every row trains the same
adapter: peft LoRA r=16, alpha 32, no dropout, on q/k/v/o/gate/up/down, AdamW lr 1e-4, batch `--batch` x `--seq`
tokens of WikiText-2 `valid.txt` after the calibration tokens (speed and memory only: the loss is not an
evaluation), the base model bf16 and frozen (no fp32 upcast, so every row keeps the dtype it
loaded in), the adapter fp32 (peft's default).

The hf_ptq rows are quantized once and saved into `--work` (not timed; GPTQ calibrates on 64 x 512 tokens of
`valid.txt`), then each row runs in a fresh interpreter that loads its checkpoint, attaches the adapter, runs
`--warmup` steps and times `--steps` more (forward, backward, optimizer step). Peak memory is the worker's `VmHWM`
(its whole life: load, adapter, training), its growth over the RSS before loading, and what the loaded model and
its adapter hold before the first step ("loaded": RSS after `get_peft_model` minus RSS before loading).

    .venv/bin/python benchmarks/finetune.py --results /tmp/finetune.md
    .venv/bin/python benchmarks/finetune.py --rows bf16,gptq-w4 --steps 3 --checkpointing
    .venv/bin/python benchmarks/finetune.py --model llama-3.2-1b --rows bf16,rtn-w4,int8,nf4 --checkpointing

`--model` takes a synthetic checkpoint of a real model's shapes instead (`scale.py`'s builder, random weights): at
SmolLM2's size the activations and the 49k-vocabulary logits of a step outweigh the weights, at 1B the weights show.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DATA = REPO.parent / "shared" / "data" / "wikitext-2"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = ("bf16", "gptq-w4", "gptq-w4-dyn", "rtn-w4", "int8", "hqq-w4", "nf4")
CALIBRATION_TOKENS = 64 * 512  # GPTQ calibrates on the first 64 x 512 tokens of valid.txt; training reads on
SAVED_ROWS = {"gptq-w4", "gptq-w4-dyn", "rtn-w4", "int8", "hqq-w4"}  # quantized once, reloaded by the worker


def quantization_config(row: str, calibration=None):
    import hf_ptq

    gptq = dict(method="gptq", bits=4, group_size=64, sym=False, dataset=calibration)
    return {
        "gptq-w4": lambda: hf_ptq.PtqConfig(**gptq, desc_act=True, static_groups=True),
        "gptq-w4-dyn": lambda: hf_ptq.PtqConfig(**gptq, desc_act=True),
        "rtn-w4": lambda: hf_ptq.PtqConfig(method="rtn", bits=4, group_size=64, sym=False),
        "int8": lambda: hf_ptq.PtqConfig(method="int8"),
        "hqq-w4": lambda: hf_ptq.PtqConfig(method="hqq", bits=4, group_size=64),
        "nf4": lambda: hf_ptq.PtqConfig(method="nf4", group_size=64),
    }[row]()


def token_ids(tokenizer, file: Path, start: int, count: int):
    """Token ids `start : start + count` of `file` (read only as far as needed), int64 [count]."""
    import torch

    text, ids = "", []
    with open(file, encoding="utf-8") as f:
        while len(ids) < start + count:
            chunk = f.read(1 << 20)
            if not chunk:
                raise SystemExit(f"{file} holds fewer than {start + count} tokens")
            text += chunk
            ids = tokenizer(text)["input_ids"]
    return torch.tensor(ids[start : start + count])


def float_checkpoint(args: argparse.Namespace) -> str:
    """The float model: SmolLM2-135M-Instruct, or a synthetic checkpoint of a real model's shapes (`scale.py`'s
    builder, random weights: for memory and speed at that size) built into `--work` on first use."""
    from hf_ptq.default_model import smollm2_checkpoint

    if args.model == "smollm2":
        return str(smollm2_checkpoint())
    from scale import build_checkpoint

    return str(build_checkpoint(args.model, Path(args.work) / "synthetic")[0])


def prepare(rows: list[str], args: argparse.Namespace) -> dict[str, str]:
    """Quantize and save the rows that reload a checkpoint; {row: folder}. Cached in `--work`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ptq.default_model import smollm2_checkpoint

    ckpt = float_checkpoint(args)
    folders = {"checkpoint": ckpt}
    calibration = None
    for row in rows:
        folder = Path(args.work) / args.model / row
        folders[row] = str(folder)
        if row not in SAVED_ROWS or (folder / "config.json").exists():
            continue
        if row.startswith("gptq") and calibration is None:
            tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())  # synthetic models: SmolLM2's ids
            calibration = token_ids(tokenizer, Path(args.data) / "valid.txt", 0, CALIBRATION_TOKENS)
            calibration = calibration.reshape(64, 512)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, quantization_config=quantization_config(row, calibration), dtype=torch.bfloat16
        )
        model.save_pretrained(folder)
        print(f"{row}: quantized and saved in {time.perf_counter() - start:.0f} s", flush=True)
        del model
    return folders


def worker(job: dict) -> dict:
    """One row in this fresh process: load, attach LoRA, train; timings and memory."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ptq.default_model import smollm2_checkpoint
    from hf_ptq.evaluation.memory import current_rss_bytes, high_water_rss_bytes

    torch.manual_seed(0)
    ckpt = job["checkpoint"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())  # synthetic models take SmolLM2's ids too
    batch, seq, row = job["batch"], job["seq"], job["row"]
    steps, warmup = job["steps"], job["warmup"]
    count = (steps + warmup) * batch * seq
    ids = token_ids(tokenizer, Path(job["data"]) / "valid.txt", CALIBRATION_TOKENS, count)
    ids = ids.reshape(steps + warmup, batch, seq)
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    if row == "bf16":
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    elif row in SAVED_ROWS:
        model = AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quantization_config(row))
    load_s = time.perf_counter() - start
    model.requires_grad_(False)
    if job["checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, lora)
    wrapped = type(model.base_model.model.model.layers[0].mlp.down_proj).__name__
    rss_loaded = current_rss_bytes() - rss_before  # the model and its adapter, before any step
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses, times = [], []
    for step in range(steps + warmup):
        t0 = time.perf_counter()
        loss = model(input_ids=ids[step], labels=ids[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = times[warmup:]
    return {
        "row": row,
        "lora_layer": wrapped,
        "load_s": load_s,
        "step_s": sum(timed) / len(timed),
        "best_step_s": min(timed),
        "tokens_per_s": batch * seq * len(timed) / sum(timed),
        "peak_rss": high_water_rss_bytes(),
        "rss_growth": high_water_rss_bytes() - rss_before,
        "rss_loaded": rss_loaded,
        "losses": losses,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def spawn(job: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(job))
        cmd = [sys.executable, __file__, "--worker", str(job_file), str(out_file)]
        env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"row": job["row"], "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out_file.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"row": job["row"], "error": f"exit {proc.returncode}: " + " | ".join(tail)}
        return json.loads(out_file.read_text())


def table(results: list[dict], args: argparse.Namespace) -> str:
    base = next((r for r in results if r["row"] == "bf16" and "error" not in r), None)
    lines = [
        f"{args.model}: LoRA r=16 on q/k/v/o/gate/up/down, batch {args.batch} x {args.seq} tokens, {args.steps} "
        f"timed steps after "
        f"{args.warmup} warm-up, gradient checkpointing {'on' if args.checkpointing else 'off'}",
        "",
        "| row | LoRA layer | step s | tokens/s (× bf16) | peak RSS GB (× bf16) | RSS growth GB | loaded GB "
        "| load s | loss first → last |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error']} | | | | | | | |")
            continue
        speed = f"{r['tokens_per_s']:.0f}"
        memory = f"{r['peak_rss'] / 1e9:.2f}"
        if base is not None:
            speed += f" ({r['tokens_per_s'] / base['tokens_per_s']:.2f}×)"
            memory += f" ({r['peak_rss'] / base['peak_rss']:.2f}×)"
        lines.append(
            f"| {r['row']} | {r['lora_layer']} | {r['step_s']:.2f} | {speed} | {memory} | "
            f"{r['rss_growth'] / 1e9:.2f} | {r['rss_loaded'] / 1e9:.2f} | {r['load_s']:.1f} | "
            f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument(
        "--model", default="smollm2", help="smollm2 (default) or a synthetic shape of scale.py (e.g. llama-3.2-1b)"
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on every row")
    p.add_argument("--rounds", type=int, default=1, help="run every row this many times, interleaved; best kept")
    p.add_argument("--data", default=str(DATA), help="WikiText-2 folder (valid.txt)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "hf_ptq_finetune_bench"))
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--results", help="write the table (markdown) here")
    p.add_argument("--json-out", help="write the raw numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--worker":
        result = worker(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(result))
        return 0
    args = parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    folders = prepare(rows, args)
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for row in rows:
            job = dict(vars(args), row=row, folder=folders[row], checkpoint=folders["checkpoint"])
            result = spawn(job, args.timeout)
            print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
            previous = best.get(row)
            if previous is None or "error" in previous or result.get("tokens_per_s", 0) > previous["tokens_per_s"]:
                best[row] = result
    results = [best[row] for row in rows]
    text = table(results, args)
    print(text)
    if args.results:
        Path(args.results).write_text(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
