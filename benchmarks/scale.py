"""Cost and speed of every method at real model sizes, on synthetic checkpoints (random weights, real shapes).

    .venv/bin/python benchmarks/scale.py --models llama-3.2-1b --methods bf16,rtn,int8,hqq
    .venv/bin/python benchmarks/scale.py --models llama-3.1-8b --methods bf16,rtn,int8,hqq --results /tmp/r.md
    .venv/bin/python benchmarks/scale.py --models llama-3.1-8b --methods gptq --blocks 2   # first 2 blocks only

Each checkpoint is built once by `hf_ptq.evaluation.synthetic` (written shard by shard) under `--cache`
(default `$HF_PTQ_CACHE/synthetic`). Every measurement runs in a fresh subprocess, whose peak RSS is `VmHWM`
(reset between phases with /proc/self/clear_refs):
1. quantize worker: load + quantize on load (calibrated methods: load, then calibrate on `--calib-samples` x
   `--calib-len` random token ids; seconds per block split into statistics, method math and the rest), peak RSS,
   then save_pretrained: seconds, peak RSS, checkpoint bytes.
2. reload worker: from_pretrained of the saved folder (seconds, peak RSS), prefill tok/s (`--prefill` tokens),
   decode tok/s (batch 1, `--new-tokens`), the output of three Linears (first block, last block, lm_head) against
   their float weights on random inputs, and the last 16 positions' logits against the bf16 model's on the same
   input (relative error, top-1 agreement). Both are sanity checks, random weights give no quality figure; and a
   random deep model amplifies any perturbation, so its logits move far even under int8 (the per-layer errors
   are the check that packing, loading and kernels are right at full size).
The bf16 row loads the float checkpoint in the reload worker. Quality figures mean nothing here; see
benchmarks/README.md ("scale.py").
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))  # bandwidth.py (benchmarks/ is not a package)

GB = 1e9
SANITY_POSITIONS = 16  # last positions of the sanity input whose logits are compared
SANITY_LEN = 128


def quantization_config(method: str, calibration, embeddings: str | None):
    """The config of one row (None: bf16)."""
    import hf_ptq

    extra = {} if embeddings is None else {"embeddings": embeddings}
    configs = {
        "bf16": lambda: None,
        "rtn": lambda: hf_ptq.PtqConfig(method="rtn", bits=4, group_size=128, **extra),
        "rtn-g32-sym": lambda: hf_ptq.PtqConfig(method="rtn", bits=4, group_size=32, sym=True, **extra),
        "int8": lambda: hf_ptq.PtqConfig(method="int8", **extra),
        "hqq": lambda: hf_ptq.PtqConfig(method="hqq", bits=4, group_size=64, **extra),
        "nf4": lambda: hf_ptq.PtqConfig(method="nf4", group_size=64),
        "gptq": lambda: hf_ptq.PtqConfig(method="gptq", bits=4, group_size=128, dataset=calibration, **extra),
        "gptq-noact": lambda: hf_ptq.PtqConfig(
            method="gptq", bits=4, group_size=128, desc_act=False, dataset=calibration, **extra
        ),
        "awq": lambda: hf_ptq.PtqConfig(method="awq", bits=4, group_size=128, dataset=calibration, **extra),
        "w8a8": lambda: hf_ptq.SmoothQuantConfig(dataset=calibration, **extra),
    }
    if method not in configs:
        raise SystemExit(f"unknown method {method!r}: choose from {', '.join(configs)}")
    return configs[method]()


CALIBRATED = {"gptq", "gptq-noact", "awq", "w8a8"}
SMOOTHED = ("awq", "w8a8")  # input channels scaled into the norm before: layer outputs differ from the float's


def _timed_phases(phases: dict[str, float]):
    """Wrap the calibrated pipeline's statistics and method steps to add their seconds to `phases`."""
    from hf_ptq.pipeline import run, sequential, stacks

    def wrap(fn, key):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - start

        return timed

    sequential.collect = wrap(sequential.collect, "statistics")
    sequential.quantize_group = wrap(sequential.quantize_group, "method")
    stacks.capture_inputs = wrap(stacks.capture_inputs, "capture")  # each stack's capture calls it from there
    run.quantize_blocks = wrap(run.quantize_blocks, "blocks_total")


def quantize_worker(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_ptq.evaluation.memory import checkpoint_bytes, current_rss_bytes, high_water_rss_bytes, reset_high_water_rss

    torch.manual_seed(0)
    overrides = {} if job["blocks"] is None else {"num_hidden_layers": job["blocks"]}
    calibration = None
    if job["method"] in CALIBRATED:
        calibration = torch.randint(0, job["vocab"], (job["calib_samples"], job["calib_len"]), generator=_gen(1))
    cfg = quantization_config(job["method"], calibration, job["embeddings"])
    phases: dict[str, float] = {}
    _timed_phases(phases)
    res = {"rss_before": current_rss_bytes()}
    reset_high_water_rss()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        job["checkpoint"], dtype=torch.bfloat16, quantization_config=cfg, **overrides
    )
    res["quantize_s"] = time.perf_counter() - start
    res["quantize_peak"] = high_water_rss_bytes()
    res["phases"] = phases
    res["blocks"] = model.config.num_hidden_layers
    if job["out"]:
        reset_high_water_rss()
        res["rss_before_save"] = current_rss_bytes()
        start = time.perf_counter()
        model.save_pretrained(job["out"])
        res["save_s"] = time.perf_counter() - start
        res["save_peak"] = high_water_rss_bytes()
        res["size"] = checkpoint_bytes(job["out"])
    return res


def _gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def reload_worker(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import hf_ptq  # noqa: F401  (registers the quantizer for the reload)
    from hf_ptq.evaluation.memory import checkpoint_bytes, current_rss_bytes, high_water_rss_bytes, reset_high_water_rss
    from hf_ptq.evaluation.speed import decode_tokens_per_s, prefill_tokens_per_s

    folder = job["folder"]
    overrides = {} if job["blocks"] is None else {"num_hidden_layers": job["blocks"]}
    res = {"rss_before": current_rss_bytes()}
    reset_high_water_rss()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **overrides)
    res["load_s"] = time.perf_counter() - start
    res["load_peak"] = high_water_rss_bytes()
    res["checkpoint_size"] = checkpoint_bytes(folder)
    model.eval()
    vocab = model.config.vocab_size
    sanity = torch.randint(0, vocab, (1, SANITY_LEN), generator=_gen(2))
    with torch.inference_mode():
        logits = model(sanity, logits_to_keep=SANITY_POSITIONS).logits[0].float()
    reference = Path(job["reference"])
    if job["method"] == "bf16":
        torch.save(logits, reference)
    elif reference.exists():
        ref = torch.load(reference)
        res["logit_rel_err"] = ((logits - ref).norm() / ref.norm()).item()
        res["top1_agree"] = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    if job["method"] not in ("bf16", *SMOOTHED):  # smoothed layers take x / s: their float weight is not comparable
        res["layer_rel_err"] = layer_errors(model, Path(job["float_checkpoint"]))
    if job["prefill"]:
        ids = torch.randint(0, vocab, (1, job["prefill"]), generator=_gen(3))
        res["prefill_tok_s"] = prefill_tokens_per_s(model, ids, repeats=job["repeats"])
    if job["new_tokens"]:
        prompt = torch.randint(0, vocab, (1, 16), generator=_gen(4))
        res["decode_tok_s"] = decode_tokens_per_s(model, prompt, job["new_tokens"], repeats=job["repeats"])
        res["decode_bytes"] = decode_step_bytes(model)
    res["peak_in_use"] = high_water_rss_bytes()
    return res


def decode_step_bytes(model) -> int:
    """Bytes of the tensors one decode step reads: every parameter and buffer once, except an input embedding that
    the output head does not share (a lookup reads one row of it). Kernel layouts copy the packed weights, so their
    size is the packed tensors' (the copy is read instead of the original, not beside it)."""
    from hf_ptq.nn import TiedQuantHead

    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    float_in, float_out = inp._parameters.get("weight"), None if out is None else out._parameters.get("weight")
    tied = isinstance(out, TiedQuantHead) or (
        float_in is not None and float_out is not None and float_in.data_ptr() == float_out.data_ptr()
    )
    skip = set() if tied else {t.data_ptr() for t in inp.state_dict().values()}
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        ptr = tensor.data_ptr()
        if ptr not in seen and ptr not in skip:
            seen.add(ptr)
            total += tensor.numel() * tensor.element_size()
    return total


def layer_errors(model, float_folder: Path) -> dict[str, float]:
    """Relative output error of a few quantized Linears (first and last block) against the float weights read from
    the bf16 checkpoint, on random inputs: where the whole model's logits are chaotic (random weights amplify any
    perturbation over many blocks), this checks each layer's packing, loading and kernels at full size."""
    import torch
    from safetensors import safe_open

    index = float_folder / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.exists() else None
    last = model.config.num_hidden_layers - 1
    names = ["model.layers.0.self_attn.q_proj", f"model.layers.{last}.mlp.down_proj", "lm_head"]
    errors = {}
    for name in names:
        key = name + ".weight"
        file = float_folder / (files.get(key, "") if files else "model.safetensors")
        if files is not None and key not in files:
            continue
        with safe_open(file, "pt") as f:
            weight = f.get_tensor(key).float()
        module = model.get_submodule(name)
        x = torch.randn(4, weight.shape[1], generator=_gen(5)).bfloat16()
        with torch.inference_mode():
            got = module(x).float()
        want = x.float() @ weight.t()
        errors[name] = ((got - want).norm() / want.norm()).item()
    return errors


def spawn(kind: str, job: dict, timeout: float) -> dict:
    """Run one worker in a fresh interpreter; its JSON result, or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(job))
        cmd = [sys.executable, __file__, "--worker", kind, str(job_file), str(out_file)]
        env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out_file.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
        return json.loads(out_file.read_text())


def build_checkpoint(name: str, cache: Path) -> tuple[Path, object, int]:
    """(folder, config, parameters) of the synthetic checkpoint `name`, built on first use."""
    from hf_ptq.evaluation.synthetic import checkpoint_plan, checkpoint_size, real_config, write_synthetic_checkpoint

    config = real_config(name)
    plan = checkpoint_plan(config)
    folder = cache / name
    if not (folder / "config.json").exists():
        print(f"building {name}: {checkpoint_size(plan) / GB:.2f} GB of bf16 shards in {folder} ...", flush=True)
        start = time.perf_counter()
        write_synthetic_checkpoint(folder, config)
        print(f"  written in {time.perf_counter() - start:.0f} s", flush=True)
    return folder, config, sum(shape.numel() for shape in plan.values())


def run_model(name: str, args: argparse.Namespace) -> dict[str, dict]:
    from hf_ptq.evaluation.memory import checkpoint_bytes

    folder, config, params = build_checkpoint(name, args.cache)
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    reference = work / "bf16_logits.pt"
    rows: dict[str, dict] = {}
    base = {
        "blocks": args.blocks,
        "vocab": config.vocab_size,
        "embeddings": args.embeddings,
        "calib_samples": args.calib_samples,
        "calib_len": args.calib_len,
        "prefill": args.prefill,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "reference": str(reference),
    }
    for method in args.methods:
        print(f"[{name}] {method} ...", flush=True)
        res: dict = {"bf16_size": checkpoint_bytes(folder), "params": params, "bandwidth": args.bandwidth}
        if method == "bf16":
            res |= spawn("reload", base | {"method": method, "folder": str(folder)}, args.timeout)
        else:
            out = work / f"{method}{'-emb-' + args.embeddings if args.embeddings else ''}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            q = spawn("quantize", base | {"method": method, "checkpoint": str(folder), "out": str(out)}, args.timeout)
            res |= {"quantize": q}
            if "error" not in q and not args.no_reload:
                job = base | {"method": method, "folder": str(out), "float_checkpoint": str(folder)}
                res |= spawn("reload", job, args.timeout)
            if not args.keep:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
        rows[method] = res
        print("  " + json.dumps(res), flush=True)
    return rows


def _f(value, spec: str = ".2f", scale: float = 1.0) -> str:
    return "—" if value is None else format(value / scale, spec)


def table(name: str, rows: dict[str, dict]) -> str:
    bf16 = rows.get("bf16", {})
    head = (
        "| method | load+quantize s | peak RSS quantizing GB | checkpoint GB | save s | reload s | peak RSS reload GB "
        "| prefill tok/s (× bf16) | decode tok/s (× bf16) | layer rel. err (max) | logits rel. err | top-1 agree |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [f"### {name}", "", head]
    for method, r in rows.items():
        q = r.get("quantize", {})
        size = q.get("size", r.get("checkpoint_size"))
        err = r.get("error") or q.get("error")
        if err:
            lines.append(f"| {method} | error: {err[:200]} |" + " |" * 11)
            continue

        def rel(key, r=r):
            if key not in r:
                return "—"
            ratio = r[key] / bf16[key] if bf16.get(key) else None
            return f"{r[key]:.1f}" + ("" if ratio is None else f" ({ratio:.2f}×)")

        lines.append(
            f"| {method} | {_f(q.get('quantize_s'), '.0f')} | {_f(q.get('quantize_peak'), '.2f', GB)} "
            f"| {_f(size, '.2f', GB)} | {_f(q.get('save_s'), '.1f')} | {_f(r.get('load_s'), '.1f')} "
            f"| {_f(r.get('load_peak'), '.2f', GB)} | {rel('prefill_tok_s')} | {rel('decode_tok_s')} "
            f"| {_f(max(r['layer_rel_err'].values()) if r.get('layer_rel_err') else None, '.4f')} "
            f"| {_f(r.get('logit_rel_err'), '.3f')} | {_f(r.get('top1_agree'), '.2f')} |"
        )
    lines += ["", *memory_ratios(rows), *bandwidth_lines(rows), *phase_lines(rows)]
    return "\n".join(lines)


def memory_ratios(rows: dict[str, dict]) -> list[str]:
    """Peak RSS against the checkpoint it produced / loads: the streaming targets."""
    out = []
    for method, r in rows.items():
        q = r.get("quantize", {})
        if method == "bf16" or "size" not in q:
            continue
        size = q["size"]
        grew = q["quantize_peak"] - q["rss_before"]
        text = (
            f"- {method}: quantize peak RSS {q['quantize_peak'] / size:.2f}× its checkpoint, growth while loading "
            f"{grew / size:.2f}× ({grew / r['bf16_size']:.2f}× the bf16 checkpoint)"
        )
        if "load_peak" in r:
            text += (
                f"; reload peak RSS {r['load_peak'] / size:.2f}× the checkpoint, "
                f"growth {(r['load_peak'] - r['rss_before']) / size:.2f}×"
            )
        out.append(text)
    return out


def bandwidth_lines(rows: dict[str, dict]) -> list[str]:
    """Each decode row as the fraction of the machine's read bandwidth its bytes per token need."""
    out = []
    for method, r in rows.items():
        if "decode_tok_s" not in r or not r.get("bandwidth"):
            continue
        rate = r["decode_tok_s"] * r["decode_bytes"]
        out.append(
            f"- {method} decode: {r['decode_bytes'] / GB:.2f} GB read per token x {r['decode_tok_s']:.1f} tok/s = "
            f"{rate / 2**30:.1f} GiB/s, {rate / r['bandwidth']:.0%} of the measured {r['bandwidth'] / 2**30:.1f} GiB/s"
        )
    return out


def phase_lines(rows: dict[str, dict]) -> list[str]:
    out = []
    for method, r in rows.items():
        q = r.get("quantize", {})
        phases, blocks = q.get("phases"), q.get("blocks")
        if not phases or "blocks_total" not in phases:
            continue
        stats, math = phases.get("statistics", 0.0), phases.get("method", 0.0)
        rest = phases["blocks_total"] - stats - math - phases.get("capture", 0.0)
        out.append(
            f"- {method} per block ({blocks} blocks): statistics {stats / blocks:.1f} s, method {math / blocks:.1f} s, "
            f"forwards and rest {rest / blocks:.1f} s; input capture {phases.get('capture', 0.0):.1f} s; "
            f"load+quantize {q['quantize_s']:.0f} s in all"
        )
    return out


def plot_growth(files: list[Path], png: Path) -> None:
    """Load+quantize seconds and peak RSS against parameters, one line per method, from `--json-out` files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, list[tuple[float, float, float]]] = {}
    for file in files:
        for rows in json.loads(Path(file).read_text()).values():
            for method, r in rows.items():
                q = r.get("quantize", {})
                if method != "bf16" and "quantize_s" in q and q.get("blocks") == r.get("blocks", q.get("blocks")):
                    points.setdefault(method, []).append((r["params"] / 1e9, q["quantize_s"], q["quantize_peak"] / GB))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for method, pts in sorted(points.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        ax_t.plot(xs, [p[1] for p in pts], "o-", label=method)
        ax_m.plot(xs, [p[2] for p in pts], "o-", label=method)
    ax_t.set(xlabel="parameters (billions)", ylabel="load + quantize (s)", xscale="log", yscale="log")
    ax_m.set(xlabel="parameters (billions)", ylabel="peak RSS while quantizing (GB)", xscale="log", yscale="log")
    ax_t.legend()
    ax_t.grid(True, which="both", alpha=0.3)
    ax_m.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from hf_ptq.folders.cache import cache_root

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama-3.2-1b", help="comma-separated names of hf_ptq.evaluation.synthetic")
    p.add_argument("--methods", default="bf16,rtn,int8,hqq", help="comma-separated rows (see quantization_config)")
    p.add_argument("--embeddings", default=None, help="PtqConfig.embeddings for every quantized row")
    p.add_argument("--blocks", type=int, default=None, help="load only the first N blocks (a partial run)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill timing (0: skip)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode tokens (0: skip)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of prefill and decode (best is reported)")
    p.add_argument("--cache", type=Path, default=cache_root() / "synthetic", help="where checkpoints are built")
    p.add_argument("--work", type=Path, default=None, help="quantized folders (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the quantized folders")
    p.add_argument("--no-reload", action="store_true", help="skip the reload worker (no speed figures)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per worker")
    p.add_argument("--results", type=Path, default=None, help="append the markdown tables to this file")
    p.add_argument("--json-out", type=Path, default=None, help="write the raw numbers here")
    p.add_argument("--plot", nargs="+", type=Path, default=None, help="--json-out files to draw (then exit)")
    p.add_argument("--png", type=Path, default=REPO / "benchmarks" / "scale_growth.png", help="where --plot draws")
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.methods = args.methods.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        kind, job_file, out_file = argv[1:4]
        job = json.loads(Path(job_file).read_text())
        res = (quantize_worker if kind == "quantize" else reload_worker)(job)
        Path(out_file).write_text(json.dumps(res))
        return 0
    args = parse_args(argv)
    if args.plot:
        plot_growth(args.plot, args.png)
        return 0
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(
            prefix="hf_ptq-scale-", dir=args.cache.parent if args.cache.exists() else None
        )
        args.work = Path(tmp.name)
    args.bandwidth = None
    if args.new_tokens and not args.no_reload:  # the decode rows' physical limit (benchmarks/bandwidth.py)
        import torch
        from bandwidth import read_bandwidth

        args.bandwidth = read_bandwidth(torch.get_num_threads(), 1 << 30)
        print(f"read bandwidth: {args.bandwidth / 2**30:.1f} GiB/s", flush=True)
    results = {name: run_model(name, args) for name in args.models}
    text = "\n\n".join(table(name, rows) for name, rows in results.items())
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text + "\n")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
