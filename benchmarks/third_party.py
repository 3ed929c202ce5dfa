"""Checkpoints in other tools' formats on hf_ptq's kernels: load time, peak RSS while loading, prefill / decode
tok/s and perplexity of one SmolLM2-135M 4-bit model stored as hf_ptq's own checkpoint, GPTQ v1, GPTQ v2 and AWQ
GEMM, and the GPTQ v2 file run by gptqmodel's own loader when its virtualenv is given.

    .venv/bin/python benchmarks/third_party.py [--gptqmodel-python /work/gptqmodel-venv/bin/python]

The quantized model is RTN w4 g64 asymmetric (data-free, so the table is about the loaders, not the method); the AWQ
GEMM file is written from the same integers by `write_awq`, AutoAWQ's layout as `hf_ptq.formats.third_party.awq`
reads it. Each folder is loaded in a fresh process. Perplexity: the first `--windows` windows of 512 tokens of
wikitext-2 test.txt (SmolLM2's published weights are Q4_1, so only the rows' agreement means anything).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_parts_mb() -> dict[str, float]:
    """Resident memory now, split as /proc reports it: anonymous (the model's own tensors and every allocation) and
    file-backed (pages of the memory-mapped checkpoint that loading read, which the kernel may drop)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) / 1024
    return fields


def checkpoint_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def write_awq(model, folder: Path) -> None:
    """AutoAWQ's GEMM checkpoint of `model`'s hf_ptq 4-bit layers (same integers, scales and zero points)."""
    import torch
    from safetensors.torch import save_file

    from hf_ptq import QuantLinear
    from hf_ptq.formats.third_party.awq import pack_awq

    tensors = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    tied = "lm_head.weight" if model.config.tie_word_embeddings else None  # stored once, as the embedding
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in layers and key != tied:
            tensors[key] = value.contiguous()
    for name, layer in layers.items():
        qw = layer.quantized_weight()
        tensors[f"{name}.qweight"] = pack_awq((qw.q.to(torch.int16) + 8).t().contiguous())
        tensors[f"{name}.qzeros"] = pack_awq((qw.zero_point.to(torch.int16) + 8).t().contiguous())
        tensors[f"{name}.scales"] = qw.scale.t().contiguous().to(torch.float16)
    folder.mkdir(parents=True)
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": layer.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def build(work: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ptq
    from hf_ptq.default_model import smollm2_checkpoint

    source = smollm2_checkpoint()
    config = hf_ptq.PtqConfig(method="rtn", bits=4, group_size=64, sym=False)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, quantization_config=config)
    tokenizer = AutoTokenizer.from_pretrained(source)
    folders = {"hf_ptq": work / "hf_ptq", "gptq-v1": work / "gptq-v1", "gptq-v2": work / "gptq-v2", "awq": work / "awq"}
    model.save_pretrained(folders["hf_ptq"])
    hf_ptq.export(model, folders["gptq-v1"], format="gptq")
    hf_ptq.export(model, folders["gptq-v2"], format="gptq", checkpoint_format="gptq_v2")
    write_awq(model, folders["awq"])
    for folder in folders.values():
        tokenizer.save_pretrained(folder)
    return folders


def token_windows(tokenizer, windows: int, length: int = 512):
    import torch

    ids = tokenizer((DATA / "test.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * length : (i + 1) * length] for i in range(windows)])


def worker(folder: Path, windows: int) -> dict:
    """Load `folder` with hf_ptq, then time prefill / decode and score perplexity (runs in a fresh process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ptq
    from hf_ptq import evaluation as ev

    before, parts_before = rss_mb(), rss_parts_mb()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    parts = {k: v - parts_before[k] for k, v in rss_parts_mb().items()}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = token_windows(tokenizer, windows)
    ev.wait_for_idle_cpu(60)
    prefill = ev.prefill_tokens_per_s(model, ids[:1], repeats=5)
    decode = ev.decode_tokens_per_s(model, ids[:1, :16], 64, repeats=3)
    losses = []
    with torch.inference_mode():
        for window in ids:
            logits = model(window[None]).logits.float()
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], window[1:]))
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    return {
        "load_s": load_s,
        "load_rss_mb": peak - before,
        "anon_mb": parts["RssAnon"],
        "ckpt_mb": checkpoint_mb(folder),
        "prefill_tps": prefill,
        "decode_tps": decode,
        "ppl": float(torch.stack(losses).mean().exp()),
        "module": type(layer).__name__,
        "quant_method": model.config.quantization_config.quant_method,
        "hf_ptq": hf_ptq.__version__,
    }


GPTQMODEL_WORKER = """
import json, sys, time, resource, torch
from gptqmodel import BACKEND, GPTQModel
from transformers import AutoTokenizer
folder, windows, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start = time.perf_counter()
model = GPTQModel.load(folder, backend=BACKEND.TORCH, device="cpu", dtype=torch.bfloat16)
load_s = time.perf_counter() - start
tok = AutoTokenizer.from_pretrained(folder)
text = open(sys.argv[4], encoding="utf-8").read()
ids = tok(text, return_tensors="pt").input_ids[0][: 512 * windows].view(windows, 512)
def best(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)
with torch.inference_mode():
    model.model(ids[:1], use_cache=True, logits_to_keep=1)
    prefill = 512 / best(lambda: model.model(ids[:1], use_cache=True, logits_to_keep=1), 3)
    kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, attention_mask=torch.ones_like(ids[:1, :16]))
    model.model.generate(ids[:1, :16], **(kw | dict(max_new_tokens=8, min_new_tokens=8)))
    decode = 64 / best(lambda: model.model.generate(ids[:1, :16], **kw), 2)
    losses = [torch.nn.functional.cross_entropy(model.model(w[None]).logits.float()[0, :-1], w[1:]) for w in ids]
json.dump({"load_s": load_s, "prefill_tps": prefill, "decode_tps": decode,
           "ppl": float(torch.stack(losses).mean().exp()), "module": "gptqmodel TorchLinear"}, open(out, "w"))
"""


def run_gptqmodel(python: str, folder: Path, windows: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")
        done = subprocess.run(
            [python, "-c", GPTQMODEL_WORKER, str(folder), str(windows), out.name, str(DATA / "test.txt")],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode:
            return {"error": done.stderr.strip().splitlines()[-1][:160]}
        return json.loads(Path(out.name).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gptqmodel-python", default=os.environ.get("HF_PTQ_GPTQMODEL_PYTHON"))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.worker[1]).write_text(json.dumps(worker(Path(args.worker[0]), args.windows)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folders = build(Path(tmp))
        rows = {}
        for name, folder in folders.items():
            out = Path(tmp) / f"{name}.json"
            subprocess.run(
                [sys.executable, __file__, "--windows", str(args.windows), "--worker", str(folder), str(out)],
                check=True,
            )
            rows[name] = json.loads(out.read_text())
        if args.gptqmodel_python:
            rows["gptqmodel (v2 file)"] = run_gptqmodel(args.gptqmodel_python, folders["gptq-v2"], args.windows)
            rows["gptqmodel (v1 file)"] = run_gptqmodel(args.gptqmodel_python, folders["gptq-v1"], args.windows)
    base = rows["hf_ptq"]
    columns = ["checkpoint", "module", "ckpt MB", "load s", "peak RSS rise MB (x ckpt)", "anon RSS rise MB (x ckpt)"]
    columns += ["prefill tok/s (x own)"]
    columns += ["decode tok/s (x own)", "ppl"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | refused: {r['error']} |" + " |" * (len(columns) - 2))
            continue
        rss = f"{r['load_rss_mb']:.0f} ({r['load_rss_mb'] / r['ckpt_mb']:.2f}x)" if "load_rss_mb" in r else "-"
        anon = f"{r['anon_mb']:.0f} ({r['anon_mb'] / r['ckpt_mb']:.2f}x)" if "anon_mb" in r else "-"
        ckpt = f"{r['ckpt_mb']:.1f}" if "ckpt_mb" in r else "-"
        print(
            f"| {name} | {r['module']} | {ckpt} | {r['load_s']:.2f} | {rss} | {anon} | {r['prefill_tps']:.0f} "
            f"({r['prefill_tps'] / base['prefill_tps']:.2f}x) | {r['decode_tps']:.1f} "
            f"({r['decode_tps'] / base['decode_tps']:.2f}x) | {r['ppl']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
