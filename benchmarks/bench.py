"""Benchmark hf_ptq against bf16 and bitsandbytes on SmolLM2-135M-Instruct (protocol: shared/DESIGN.md).

    .venv/bin/python benchmarks/bench.py                      # all rows, about 10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench.py --quick              # smoke run
    .venv/bin/python benchmarks/bench.py --methods bf16,rtn-w4 --windows 8 --results /tmp/r.md

The parent process runs every method in its own fresh subprocess (`--worker METHOD --json FILE`), so peak RSS
(`ru_maxrss`) covers one load + quantization only. Each worker measures, in this order: load+quantize time and
RSS, the model's bytes, save_pretrained size, prefill and decode speed (best over rounds spread in time; rounds
disturbed by other processes are repeated), then perplexity on the evaluation windows and KL / top-1 agreement
against the bf16 model (loaded in the worker after the memory numbers are taken).
The parent prints one markdown table and the acceptance ratios, each from numbers of this same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2"
DECODE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
MB = 1e6
CONTENDED = 0.25  # cores used by other processes above which a timing round is repeated


@dataclass(frozen=True)
class Method:
    label: str
    hf_ptq: bool  # an hf_ptq row on hf_ptq's own kernels (the acceptance targets apply)
    calibrated: bool = False  # quantizes with the protocol's calibration data
    external: str | None = None  # run by another library's worker in its own virtualenv (llm-compressor)
    baseline: str | None = None  # the llm-compressor row this calibrated row is timed against
    time_target: float = 0.5  # load+quantize time / the baseline's, at most
    w8a8: bool = False  # int8 weights and activations (SmoothQuant): the W8A8 targets apply
    same_as: str | None = None  # a row computing the same model through the library directly (ppl ratio ~ 1)
    embeddings: str | None = None  # PtqConfig.embeddings: the embedding and lm_head quantized too


METHODS = {
    "bf16": Method("bf16", False),
    "rtn-w4": Method("hf_ptq rtn w4 g64", True),
    "rtn-w4-emb8": Method("hf_ptq rtn w4 g64, embeddings int8", True, embeddings="int8"),
    "rtn-w4-emb4": Method("hf_ptq rtn w4 g64, embeddings int4 (g64 asym)", True, embeddings="int4"),
    "int8": Method("hf_ptq int8", True),
    "gptq-w4": Method("hf_ptq gptq w4 g64 (defaults: act-order, clip)", True, calibrated=True, baseline="llmc-gptq"),
    "gptq-w4-static": Method("hf_ptq gptq w4 g64 act-order static groups", True, calibrated=True, baseline="llmc-gptq"),
    "gptq-w4-noact": Method("hf_ptq gptq w4 g64 without act-order", True, calibrated=True, baseline="llmc-gptq"),
    "llmc-gptq": Method("llm-compressor gptq w4 g64", False, calibrated=True, external="gptq"),
    "awq-w4": Method("hf_ptq awq w4 g64", True, calibrated=True, baseline="llmc-awq", time_target=0.25),
    "llmc-awq": Method("llm-compressor awq w4 g64", False, calibrated=True, external="awq"),
    "w8a8": Method("hf_ptq smoothquant w8a8 dynamic (α 0.5, rtn)", True, True, baseline="llmc-sq", w8a8=True),
    "w8a8-auto": Method("hf_ptq smoothquant w8a8 dynamic (α auto, rtn)", True, True, baseline="llmc-sq", w8a8=True),
    "w8a8-static": Method("hf_ptq smoothquant w8a8 static (α 0.8, rtn)", True, True, baseline="llmc-sq", w8a8=True),
    "w8a8-gptq": Method("hf_ptq smoothquant w8a8 dynamic (α 0.5, gptq)", True, True, baseline="llmc-sq", w8a8=True),
    "llmc-sq": Method(
        "llm-compressor smoothquant 0.8 + gptq w8a8", False, calibrated=True, external="smoothquant-w8a8", w8a8=True
    ),
    "bnb-nf4": Method("bnb nf4", False),
    "bnb-int8": Method("bnb int8", False),
    "hf-nf4": Method("hf_ptq nf4 g64 (bitsandbytes)", False, same_as="bnb-nf4"),
    "hf-llm_int8": Method("hf_ptq llm_int8 (bitsandbytes)", False, same_as="bnb-int8"),
    "hf-hqq": Method("hf_ptq hqq w4 g64", True, same_as="hqq-lib"),
    "hqq-lib": Method("hqq HQQLinear w4 g64 (hqq package)", False),
}
DEFAULT_METHODS = [m for m in METHODS if not METHODS[m].external]  # llm-compressor runs with --llmc-python


def quantization_config(method: str, calibration=None):
    """The `quantization_config` passed to `from_pretrained` for a row (None for bf16).

    `calibration`: LongTensor [num_samples, seq_len] of the protocol (calibrated rows only).
    """
    import torch
    from transformers import BitsAndBytesConfig

    import hf_ptq

    def calibrated(method: str, **options):
        n, seq = calibration.shape
        return hf_ptq.PtqConfig(
            method=method, bits=4, group_size=64, sym=False, dataset=calibration, num_samples=n, seq_len=seq, **options
        )

    def smoothquant(**options):
        n, seq = calibration.shape
        return hf_ptq.SmoothQuantConfig(dataset=calibration, num_samples=n, seq_len=seq, **options)

    return {
        "bf16": lambda: None,
        "rtn-w4": lambda: hf_ptq.PtqConfig(method="rtn", bits=4, group_size=64, sym=False),
        "rtn-w4-emb8": lambda: hf_ptq.PtqConfig(method="rtn", bits=4, group_size=64, embeddings="int8"),
        "rtn-w4-emb4": lambda: hf_ptq.PtqConfig(method="rtn", bits=4, group_size=64, embeddings="int4"),
        "int8": lambda: hf_ptq.PtqConfig(method="int8"),
        "gptq-w4": lambda: calibrated("gptq"),
        "gptq-w4-static": lambda: calibrated("gptq", desc_act=True, static_groups=True),
        "gptq-w4-noact": lambda: calibrated("gptq", desc_act=False),
        "awq-w4": lambda: calibrated("awq"),
        "w8a8": lambda: smoothquant(),
        "w8a8-auto": lambda: smoothquant(alpha="auto"),
        "w8a8-static": lambda: smoothquant(activations="static", alpha=0.8),
        "w8a8-gptq": lambda: smoothquant(weight_method="gptq"),
        "bnb-nf4": lambda: BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
        "bnb-int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
        "hf-nf4": lambda: hf_ptq.PtqConfig(method="nf4", group_size=64),
        "hf-llm_int8": lambda: hf_ptq.PtqConfig(method="llm_int8"),
        "hf-hqq": lambda: hf_ptq.PtqConfig(method="hqq", bits=4, group_size=64),
        "hqq-lib": lambda: None,  # quantized after loading by `hqq_library_quantize`
    }[method]()


def hqq_library_quantize(model) -> None:
    """The hqq package's own path (its `HQQLinear`, default settings, bf16 compute) on every decoder Linear: what
    transformers' `HqqConfig` did before transformers 5 dropped it; the reference for the hf_ptq hqq row."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    quant_config = BaseQuantizeConfig(nbits=4, group_size=64)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            layer = HQQLinear(module, quant_config, compute_dtype=torch.bfloat16, device="cpu", del_orig=True)
            model.model.layers.set_submodule(name, layer)


def write_calibration(args: argparse.Namespace, path: Path) -> None:
    """Tokenize the protocol's calibration set once, in the parent, for the calibrated workers."""
    import torch
    from transformers import AutoTokenizer

    from hf_ptq.default_model import smollm2_checkpoint

    torch.save(calibration_ids(AutoTokenizer.from_pretrained(smollm2_checkpoint()), args).clone(), path)
    args.calib_file = path


def calibration_ids(tokenizer, args: argparse.Namespace):
    """The protocol's calibration set: the first `--calib-samples` consecutive `--calib-len`-token chunks of the
    tokenized `valid.txt`, LongTensor [samples, len]."""
    from hf_ptq import evaluation as ev

    ids = tokenizer((_data_dir(args) / "valid.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    return ev.token_windows(ids, args.calib_len, args.calib_samples)


# --------------------------------------------------------------------------------------------------------------
# worker: one method, one fresh process
# --------------------------------------------------------------------------------------------------------------
def run_worker(method: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import hf_ptq  # noqa: F401  (registers the hf_ptq quantizer)
    from hf_ptq import evaluation as ev
    from hf_ptq.default_model import smollm2_checkpoint

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ckpt = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    # tokenized by the parent: tokenizing valid.txt here would raise this worker's RSS before it is measured
    calibration = None
    if METHODS[method].calibrated and not args.load_from:
        calibration = torch.load(args.calib_file) if args.calib_file else calibration_ids(tok, args)
    cfg = None if args.load_from else quantization_config(method, calibration)  # a saved checkpoint: as saved
    res: dict = {"method": method, "errors": {}, "threads": torch.get_num_threads()}
    res["kernel_max_rows"] = os.environ.get("HF_PTQ_KERNEL_MAX_ROWS", "default")

    # 1. load (+ quantize): wall time and RSS, nothing else allocated yet
    source = Path(args.load_from) if args.load_from else ckpt
    kwargs = {"dtype": torch.bfloat16} | ({} if cfg is None or args.load_from else {"quantization_config": cfg})
    res["rss_before"], res["peak_before"] = ev.current_rss_bytes(), ev.peak_rss_bytes()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()
    if method == "hqq-lib":
        hqq_library_quantize(model)
    res["load_s"] = time.perf_counter() - start
    res["peak_load"], res["rss_loaded"] = ev.peak_rss_bytes(), ev.current_rss_bytes()
    res["model_bytes"] = ev.model_bytes(model)

    # 2. checkpoint size on disk; Linear bytes against the bf16 checkpoint's
    if method == "hqq-lib":  # transformers 5 cannot reload HQQLinear checkpoints (HqqConfig is not available)
        res["errors"]["save"] = "not saved: transformers 5 cannot reload it"
    elif not args.speed_only:
        try:
            with tempfile.TemporaryDirectory(prefix="bench-save-") as tmp:
                save_dir = Path(args.save_dir or tmp)  # the parent keeps it for the kernel sweep
                model.save_pretrained(save_dir)
                sizes, ref_sizes = ev.safetensors_sizes(save_dir), ev.safetensors_sizes(ckpt)
            linears = [n for n, m in model.named_modules() if n and _is_linear_like(m)]
            linears = [n for n in linears if ev.linear_weight_bytes(ref_sizes, [n]) > 0]  # lm_head is tied
            res["ckpt_bytes"] = sum(sizes.values())
            res["linear_bytes"] = ev.linear_weight_bytes(sizes, linears)
            res["linear_bf16_bytes"] = ev.linear_weight_bytes(ref_sizes, linears)
            res["linears_quantized"] = sum(
                ev.linear_weight_bytes(sizes, [n]) < ev.linear_weight_bytes(ref_sizes, [n]) for n in linears
            )
            res["linears"] = len(linears)
        except Exception as exc:  # noqa: BLE001  (reported in the table)
            res["errors"]["save"] = _short(exc)

    # 3. speed: prefill and decode, interleaved over rounds (best of all), after warm-up
    text = ev.read_text(args.data)
    ids = tok(text, return_tensors="pt").input_ids[0]
    windows = ev.token_windows(ids, args.window, args.windows)
    prompt = tok(DECODE_PROMPT, return_tensors="pt").input_ids
    try:
        res |= measure_speed(model, windows[0][None], prompt, args)
    except Exception as exc:  # noqa: BLE001
        res["errors"]["speed"] = _short(exc)
    res["rss_after_inference"] = ev.current_rss_bytes()
    res["peak_used"] = ev.peak_rss_bytes()  # the model loaded and run (weights resident), before the KL reference
    if args.speed_only:
        return res

    # 4. perplexity on all windows; KL / top-1 against bf16 on the first --kl-windows windows
    try:
        reference = None
        if method != "bf16" and args.kl_windows > 0:
            reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
        meter, nll, count = ev.DivergenceMeter(), 0.0, 0
        for i, window in enumerate(windows):
            logits = ev.causal_lm_logits(model, window[None])
            window_nll, n = ev.nll_sum(logits, window[None])
            nll, count = nll + window_nll, count + n
            if i < args.kl_windows:
                ref_logits = logits if reference is None else ev.causal_lm_logits(reference, window[None])
                meter.update(ref_logits, logits)
            del logits
        res["ppl"] = float(torch.tensor(nll / count).exp())
        res["kl"], res["top1"], res["kl_positions"] = meter.kl, meter.top1, meter.count
    except Exception as exc:  # noqa: BLE001
        res["errors"]["quality"] = _short(exc)
    res["windows"] = len(windows)
    return res


def measure_speed(model, prefill_ids, prompt, args: argparse.Namespace) -> dict:
    """Best prefill / decode tokens/s over `args.rounds` rounds (each: prefill x2, decode x1).

    Machine noise comes in phases of seconds, so rounds spread the runs out in time; a round during which other
    processes used more than `CONTENDED` cores is discarded and run again (at most `args.rounds` extra times).
    """
    from hf_ptq import evaluation as ev

    best: dict[str, float] = {}
    loads: list[float] = []
    done = attempts = 0
    while done < args.rounds and attempts < 2 * args.rounds:
        first = attempts == 0
        if args.wait_idle > 0:
            ev.wait_for_idle_cpu(args.wait_idle if first else min(args.wait_idle, 15.0))
        monitor = ev.CpuMonitor().start()
        warm = 1 if first else 0
        speeds = {"prefill_tps": ev.prefill_tokens_per_s(model, prefill_ids, repeats=args.prefill_repeats, warmup=warm)}
        for rows in args.prefill_rows:
            speeds[f"prefill_tps_{rows}"] = ev.prefill_tokens_per_s(model, prefill_ids[:, :rows], repeats=3, warmup=1)
        speeds["decode_tps"] = ev.decode_tokens_per_s(model, prompt, args.new_tokens, repeats=1, warmup=warm)
        load = monitor.stop()
        attempts += 1
        if load is not None and load > CONTENDED and attempts < 2 * args.rounds:
            continue
        done += 1
        loads.append(load if load is not None else 0.0)
        best = {k: max(v, best.get(k, 0.0)) for k, v in speeds.items()}
    return best | {"others_cpu": max(loads) if loads else None, "speed_rounds": done, "speed_attempts": attempts}


def _is_linear_like(module) -> bool:
    """nn.Linear, its bitsandbytes subclasses, hf_ptq's QuantLinear and HQQLinear (duck-typed: in/out_features);
    not a quantized embedding (`embeddings=`), which has them too."""
    linear = hasattr(module, "in_features") and hasattr(module, "out_features") and not list(module.children())
    return linear and not hasattr(module, "num_embeddings")


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]


# --------------------------------------------------------------------------------------------------------------
# parent: one subprocess per row, then the table and the acceptance ratios
# --------------------------------------------------------------------------------------------------------------
def run_json_worker(method: str, command: Callable[[Path], list[str]], env_extra: dict[str, str] | None = None) -> dict:
    """Run `command(result_path)` in a subprocess; the JSON it wrote there plus `worker_s`, or
    {"method": ..., "errors": {"worker": last stderr line}} when it failed."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "result.json"
        env = os.environ | {"TOKENIZERS_PARALLELISM": "false"} | (env_extra or {})
        start = time.perf_counter()
        proc = subprocess.run(command(out), env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not out.exists():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            print(proc.stderr[-3000:], file=sys.stderr)
            return {"method": method, "errors": {"worker": lines[-1][:160] if lines else f"exit {proc.returncode}"}}
        res = json.loads(out.read_text())
    res["worker_s"] = wall
    return res


def spawn(method: str, args: argparse.Namespace, extra: list[str], env_extra: dict[str, str] | None = None) -> dict:
    """Run one worker in a fresh interpreter; its JSON result, or {"errors": {"worker": ...}}."""
    script = str(Path(__file__).resolve())
    return run_json_worker(
        method, lambda out: [sys.executable, script, "--worker", method, "--json", str(out), *extra], env_extra
    )


def spawn_external(method: str, args: argparse.Namespace) -> dict:
    """Run another library's worker (`llmcompressor_worker.py`) with its own virtualenv's python; its result
    mapped onto this script's keys, or {"errors": ...} when that virtualenv is missing or the run fails."""
    from hf_ptq.default_model import smollm2_checkpoint

    python = args.llmc_python
    if python is None or not Path(python).exists():
        return {"method": method, "errors": {"worker": "llm-compressor not installed (see benchmarks/README.md)"}}
    cmd = [python, str(Path(__file__).resolve().parent / "llmcompressor_worker.py"), "--method"]
    cmd += [METHODS[method].external, "--model", str(smollm2_checkpoint()), "--data", str(_data_dir(args))]
    cmd += ["--num-samples", str(args.calib_samples), "--seq-len", str(args.calib_len), "--windows", str(args.windows)]
    ext = run_json_worker(method, lambda out: [*cmd, "--json-out", str(out)])
    if "errors" in ext:
        return ext
    return {
        "method": method,
        "errors": {},
        "external": ext,
        "worker_s": ext["worker_s"],
        "load_s": ext["load_s"] + ext["quant_s"],
        "quant_s": ext["quant_s"],
        "peak_load": ext["peak_rss_mb"] * 2**20,  # ru_maxrss of the whole run (load, quantization, evaluation)
        "ppl": ext["ppl"],
    }


def _data_dir(args: argparse.Namespace) -> Path:
    return args.data if args.data.is_dir() else args.data.parent


def worker_args(args: argparse.Namespace) -> list[str]:
    out = ["--data", str(args.data), "--windows", str(args.windows), "--kl-windows", str(args.kl_windows)]
    out += ["--new-tokens", str(args.new_tokens), "--wait-idle", str(args.wait_idle)]
    out += ["--prefill-repeats", str(args.prefill_repeats), "--rounds", str(args.rounds)]
    if args.calib_file:
        out += ["--calib-file", str(args.calib_file)]
    return out


def fmt(value, spec: str = ".2f", scale: float = 1.0) -> str:
    return "—" if value is None else format(value / scale, spec)


def cell(res: dict, key: str, spec: str = ".2f", scale: float = 1.0, phase: str | None = None) -> str:
    errors = res.get("errors", {})
    if key not in res:
        err = errors.get(phase) or errors.get("worker")
        return f"error: {err}" if err else "—"
    return fmt(res[key], spec, scale)


def results_table(results: dict[str, dict]) -> str:
    head = (
        "| method | load+quant s | peak RSS MB | peak RSS in use MB | RSS increase MB | model MB | RSS incr / model | "
        "ckpt MB | Linear bytes vs bf16 | ppl | KL vs bf16 | top-1 agree | prefill tok/s | decode tok/s | others' CPU |"
    )
    rows = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for method, r in results.items():
        incr = r["peak_load"] - r["rss_before"] if "peak_load" in r and "rss_before" in r else None
        ratio = incr / r["model_bytes"] if incr is not None and r.get("model_bytes") else None
        linear = r["linear_bytes"] / r["linear_bf16_bytes"] if r.get("linear_bf16_bytes") else None
        worker_err = r.get("errors", {}).get("worker")
        cells = [
            METHODS[method].label,
            cell(r, "load_s", ".1f"),
            cell(r, "peak_load", ".0f", MB),
            cell(r, "peak_used", ".0f", MB, "speed"),
            f"error: {worker_err}" if worker_err else fmt(incr, ".0f", MB),
            cell(r, "model_bytes", ".1f", MB),
            fmt(ratio, ".2f"),
            cell(r, "ckpt_bytes", ".1f", MB, "save"),
            "—" if linear is None else f"{linear:.3f} ({r['linears_quantized']}/{r['linears']} quantized)",
            cell(r, "ppl", ".3f", phase="quality"),
            cell(r, "kl", ".4f", phase="quality"),
            cell(r, "top1", ".3f", phase="quality"),
            cell(r, "prefill_tps", ".0f", phase="speed"),
            cell(r, "decode_tps", ".1f", phase="speed"),
            fmt(r.get("others_cpu"), ".2f"),
        ]
        if worker_err:
            cells = [cells[0]] + [f"error: {worker_err}"] + ["—"] * (len(cells) - 2)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# Perplexity targets of the calibrated rows on this protocol (issue targets; fp32 25.60, RTN 32.67): a number, or
# the row whose perplexity in the same run is the target (with the figure when that row is absent).
PPL_TARGETS = {"gptq-w4": 27.5, "awq-w4": ("llmc-awq", 29.63)}


def acceptance(results: dict[str, dict]) -> list[tuple[str, float | None, str, bool | None]]:
    """(description, measured ratio, target, passed) for every acceptance criterion this run can evaluate."""
    checks = []

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = results.get(a, {}).get(key), results.get(b, {}).get(key)
        return x / y if x is not None and y else None

    for m in (m for m in results if METHODS[m].same_as in results):
        label, ref = METHODS[m].label, METHODS[METHODS[m].same_as].label
        r = ratio(m, METHODS[m].same_as, "ppl")  # the same quantization: equal up to rounding of stored scales
        checks.append((f"perplexity {label} / {ref}", r, "<= 1.01", _le(r, 1.01)))
    for m in (m for m in results if METHODS[m].hf_ptq):
        label, res = METHODS[m].label, results[m]
        if METHODS[m].w8a8:
            checks += w8a8_acceptance(m, results)
            continue
        if METHODS[m].calibrated:
            ppl = res.get("ppl")
            if m in PPL_TARGETS:
                target, what = PPL_TARGETS[m], ""
                if isinstance(target, tuple):
                    row, target = target
                    if results.get(row, {}).get("ppl") is not None:
                        target, what = results[row]["ppl"], f" ({METHODS[row].label})"
                checks.append((f"perplexity, {label}", ppl, f"<= {target:.2f}{what}", _le(ppl, target)))
            if "rtn-w4" in results:
                r = ratio(m, "rtn-w4", "ppl")
                checks.append((f"perplexity {label} / hf_ptq rtn w4 g64", r, "< 1", _le(r, 1.0 - 1e-9)))
            base = METHODS[m].baseline
            if base in results:
                r, target = ratio(m, base, "load_s"), METHODS[m].time_target
                checks.append(
                    (f"load+quantize time {label} / {METHODS[base].label}", r, f"<= {target}", _le(r, target))
                )
            if "bf16" in results:  # the bf16 model in use: its weights resident, a 512-token prefill and decoding
                x, y = res.get("peak_load"), results["bf16"].get("peak_used")
                r = x / y if x is not None and y else None
                checks.append((f"peak RSS {label} / bf16 model's peak RSS in use", r, "<= 1.3", _le(r, 1.3)))
            continue
        for base, target in (("bf16", 1.5), ("bnb-nf4", 1.0)):
            if base in results:
                r = ratio(m, base, "decode_tps")
                checks.append((f"decode {label} / {METHODS[base].label}", r, f">= {target}", _ge(r, target)))
        if "bf16" in results:
            r = ratio(m, "bf16", "prefill_tps")
            checks.append((f"prefill {label} / bf16", r, ">= 0.9", _ge(r, 0.9)))
        r = (res["peak_load"] - res["rss_before"]) / res["model_bytes"] if "peak_load" in res else None
        checks.append((f"peak RSS increase while loading / model size, {label}", r, "<= 1.2", _le(r, 1.2)))
        if METHODS[m].embeddings and "bf16" in results:  # the checklist's memory check (hf_ptq.evaluation)
            r = ratio(m, "bf16", "model_bytes")
            checks.append((f"model memory {label} / bf16", r, "<= 1/3", _le(r, 1 / 3)))
        if m == "rtn-w4":
            r = res["linear_bytes"] / res["linear_bf16_bytes"] if res.get("linear_bf16_bytes") else None
            checks.append((f"quantized Linear bytes / bf16 bytes, {label}", r, "<= 0.3", _le(r, 0.3)))
    return checks


# SmolLM2-135M's perplexity on this protocol in fp32 (the W8A8 target is relative to it) and the W8A8 targets.
FP32_PPL = 25.60
W8A8_TARGETS = {"ppl_vs_fp32": 1.02, "prefill": 1.2, "decode": 1.5}


def w8a8_acceptance(m: str, results: dict[str, dict]) -> list[tuple[str, float | None, str, bool | None]]:
    """W8A8 rows: perplexity <= 1.02x fp32, prefill >= 1.2x and decode >= 1.5x the bf16 model of this run."""
    label, res, bf16 = METHODS[m].label, results[m], results.get("bf16", {})
    ppl = res.get("ppl")
    r = ppl / FP32_PPL if ppl is not None else None
    target = W8A8_TARGETS["ppl_vs_fp32"]
    checks = [(f"perplexity {label} / fp32 ({FP32_PPL})", r, f"<= {target}", _le(r, target))]
    llmc = results.get("llmc-sq", {})
    for key, name in (("ppl", "perplexity"), ("load_s", "load+quantize time")):
        x, y = res.get(key), llmc.get(key)
        r = x / y if x is not None and y else None
        if r is not None:
            checks.append((f"{name} {label} / {METHODS['llmc-sq'].label}", r, "(for reference)", None))
    for key, name in (("prefill_tps", "prefill"), ("decode_tps", "decode")):
        x, y = res.get(key), bf16.get(key)
        r = x / y if x is not None and y else None
        checks.append((f"{name} {label} / bf16", r, f">= {W8A8_TARGETS[name]}", _ge(r, W8A8_TARGETS[name])))
    r = res["linear_bytes"] / res["linear_bf16_bytes"] if res.get("linear_bf16_bytes") else None
    checks.append((f"quantized Linear bytes / bf16 bytes, {label}", r, "about 0.5", None if r is None else r < 0.52))
    x, y = res.get("ckpt_bytes"), bf16.get("ckpt_bytes")
    checks.append((f"checkpoint bytes {label} / bf16", x / y if x and y else None, "(for reference)", None))
    return checks


def _ge(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def _le(value: float | None, target: float) -> bool | None:
    return None if value is None else value <= target


def acceptance_text(checks) -> str:
    lines = []
    for desc, value, target, ok in checks:
        verdict = {True: "PASS", False: "FAIL", None: "N/A"}[ok]
        lines.append(f"- {verdict}  {desc}: {fmt(value, '.3f')} (target {target})")
    return "\n".join(lines)


def sweep_table(sweep: dict[str, dict[str, dict]], rows: list[int]) -> str:
    head = "| method | HF_PTQ_KERNEL_MAX_ROWS | decode tok/s | " + " | ".join(f"fwd {n} tok tok/s" for n in rows)
    head += " | prefill 512 tok/s | others' CPU |"
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for method, by_rows in sweep.items():
        for value, r in by_rows.items():
            if r.get("errors", {}).get("worker"):
                lines.append(f"| {METHODS[method].label} | {value} | error: {r['errors']['worker']} |")
                continue
            cells = [METHODS[method].label, value, cell(r, "decode_tps", ".1f", phase="speed")]
            cells += [cell(r, f"prefill_tps_{n}", ".0f", phase="speed") for n in rows]
            cells += [cell(r, "prefill_tps", ".0f", phase="speed"), fmt(r.get("others_cpu"), ".2f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(results: dict[str, dict], args: argparse.Namespace) -> str:
    import torch

    threads = next((r["threads"] for r in results.values() if "threads" in r), torch.get_num_threads())
    from hf_ptq.core.cpu import cpu_has_fast_bf16

    return (
        f"{_cpu_model() or platform.machine()}, {os.cpu_count()} CPUs, native bf16: "
        f"{'yes' if cpu_has_fast_bf16() else 'no'}, torch {torch.__version__} "
        f"({threads} threads); windows={args.windows}x{args.window} tokens, KL on {args.kl_windows} windows, "
        f"decode {args.new_tokens} new tokens, "
        f"HF_PTQ_KERNEL_MAX_ROWS={os.environ.get('HF_PTQ_KERNEL_MAX_ROWS', 'default')}"
    )


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), None)
    except OSError:
        return None


SPEED_KEYS = ("prefill_tps", "decode_tps", "others_cpu")


def merge_speed(result: dict, extra: dict) -> None:
    """Fold a speed-only pass into a row: best prefill / decode, worst others' CPU, every pass kept."""
    result.setdefault("speed_passes", []).append({k: extra.get(k) for k in SPEED_KEYS})
    for key in ("prefill_tps", "decode_tps"):
        if extra.get(key) is not None:
            result[key] = max(result.get(key) or 0.0, extra[key])
    loads = [p["others_cpu"] for p in result["speed_passes"] if p.get("others_cpu") is not None]
    result["others_cpu"] = max(loads) if loads else None


def passes_text(results: dict[str, dict]) -> str:
    """One line per row: prefill and decode tok/s of every pass (the table shows the best)."""
    lines = []
    for method, r in results.items():
        passes = r.get("speed_passes") or []
        prefill = " / ".join(fmt(p.get("prefill_tps"), ".0f") for p in passes)
        decode = " / ".join(fmt(p.get("decode_tps"), ".1f") for p in passes)
        lines.append(f"- {METHODS[method].label}: prefill {prefill}; decode {decode}")
    return "\n".join(lines)


def run_parent(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    start = time.perf_counter()
    results: dict[str, dict] = {}
    keep = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    if any(METHODS[m].calibrated and not METHODS[m].external for m in methods):
        write_calibration(args, keep / "calibration.pt")
    for method in methods:
        print(f"[bench] {method} ...", file=sys.stderr, flush=True)
        extra = worker_args(args) + ["--save-dir", str(keep / method)]
        external = METHODS[method].external
        results[method] = r = spawn_external(method, args) if external else spawn(method, args, extra)
        r["speed_passes"] = [{k: r.get(k) for k in SPEED_KEYS}]
        print(
            f"[bench] {method}: {r.get('worker_s', 0):.0f}s, errors={r.get('errors')}",
            file=sys.stderr,
            flush=True,
        )

    # extra speed-only passes, interleaved over the methods, so that a slow phase of the machine does not decide
    # one row's speed: every row keeps its best prefill / decode over all passes
    for n in range(1, args.speed_passes):
        timed = [m for m in methods if not METHODS[m].external and not results[m].get("errors", {}).get("worker")]
        for method in timed:
            print(f"[bench] speed pass {n + 1}: {method} ...", file=sys.stderr, flush=True)
            saved = keep / method  # reload what the first pass saved instead of quantizing again
            reload = ["--load-from", str(saved)] if (saved / "config.json").exists() else []
            merge_speed(results[method], spawn(method, args, worker_args(args) + ["--speed-only", *reload]))

    sweep: dict[str, dict[str, dict]] = {}
    if args.kernel_sweep:
        values = [v.strip() for v in args.kernel_sweep.split(",")]
        for method in (m for m in methods if METHODS[m].hf_ptq and (keep / m / "config.json").exists()):
            sweep[method] = {}
            for value in values:
                print(f"[bench] sweep {method} HF_PTQ_KERNEL_MAX_ROWS={value} ...", file=sys.stderr, flush=True)
                extra = worker_args(args) + ["--speed-only", "--load-from", str(keep / method), "--rounds", "2"]
                extra += ["--prefill-rows", *map(str, args.sweep_rows)]
                sweep[method][value] = spawn(method, args, extra, {"HF_PTQ_KERNEL_MAX_ROWS": value})

    elapsed = time.perf_counter() - start
    text = [
        f"Machine: {machine_line(results, args)}",
        "",
        results_table(results),
        "",
        "Acceptance (ratios from this run):",
        "",
        acceptance_text(acceptance(results)),
        "",
        f"Speed per pass (tok/s; the table keeps the best of {args.speed_passes} passes):",
        "",
        passes_text(results),
    ]
    if sweep:
        text += [
            "",
            "Kernel threshold sweep (reloaded saved checkpoints, speed only):",
            "",
            sweep_table(sweep, args.sweep_rows),
        ]
    text += ["", f"Total benchmark time: {elapsed / 60:.1f} min"]
    report = "\n".join(text)
    print(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"results": results, "sweep": sweep}, indent=1))
    if args.results:
        Path(args.results).write_text(f"# Benchmark results\n\nCommand: `{' '.join(sys.argv)}`\n\n{report}\n")
    import shutil

    shutil.rmtree(keep, ignore_errors=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated rows from {', '.join(METHODS)}"
    )
    p.add_argument("--calib-samples", type=int, default=64, help="calibration chunks from valid.txt")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration chunk")
    p.add_argument(
        "--llmc-python",
        default=os.environ.get("HF_PTQ_LLMC_PYTHON"),
        help="python of a virtualenv with llm-compressor: adds the llmc-gptq row (env HF_PTQ_LLMC_PYTHON)",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="wikitext-2 folder (test.txt) or a text file")
    p.add_argument("--windows", type=int, default=40, help="perplexity windows (non-overlapping)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (also the prefill length)")
    p.add_argument("--kl-windows", type=int, default=8, help="first windows used for KL / top-1 vs bf16")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated for the decode speed")
    p.add_argument("--prefill-repeats", type=int, default=2, help="prefill runs per timing round")
    p.add_argument("--rounds", type=int, default=4, help="timing rounds (prefill x repeats + one decode each)")
    p.add_argument("--speed-passes", type=int, help="speed measurements per row, a fresh process each (default 2)")
    p.add_argument("--wait-idle", type=float, default=60.0, help="seconds to wait for other processes to go quiet")
    p.add_argument("--kernel-sweep", default="", help="HF_PTQ_KERNEL_MAX_ROWS values to sweep, e.g. 0,1,8,16,64")
    p.add_argument("--sweep-rows", type=int, nargs="+", help="forward sizes timed in the sweep (1 8 16 ... 256)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 windows, 2 KL windows, 16 new tokens")
    p.add_argument("--results", type=Path, help="write the report as markdown here (e.g. benchmarks/RESULTS.md)")
    p.add_argument("--json-out", type=Path, help="write all raw measurements as JSON here")
    # worker-only options
    p.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--calib-file", type=Path, help=argparse.SUPPRESS)  # calibration ids written by the parent
    p.add_argument("--save-dir", help=argparse.SUPPRESS)
    p.add_argument("--load-from", help=argparse.SUPPRESS)
    p.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prefill-rows", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.llmc_python:  # the llm-compressor baselines of the calibrated rows asked for
        asked = args.methods.split(",")
        wanted = {METHODS[m].baseline for m in asked if m in METHODS and METHODS[m].baseline}
        args.methods = ",".join(asked + sorted(wanted - set(asked)))
    if args.quick:
        args.windows, args.kl_windows, args.new_tokens = min(args.windows, 4), min(args.kl_windows, 2), 16
        args.prefill_repeats, args.rounds, args.wait_idle = 1, 1, min(args.wait_idle, 5.0)
    if args.speed_passes is None:
        args.speed_passes = 1 if args.quick else 2
    if args.sweep_rows is None:
        args.sweep_rows = [1, 16, 64] if args.quick else [1, 8, 16, 32, 64, 128, 256]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args.worker, args)
        args.json.write_text(json.dumps(result, indent=1))
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
