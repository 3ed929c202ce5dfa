"""Mixed precision (`target_bits`) against uniform bit widths at the same checkpoint size, SmolLM2 protocol.

    .venv/bin/python benchmarks/mixed_precision.py --work /tmp/mixed                # every row, then the table
    .venv/bin/python benchmarks/mixed_precision.py --work /tmp/mixed --methods rtn  # RTN rows only
    .venv/bin/python benchmarks/mixed_precision.py --work /tmp/mixed --speed        # decode tok/s (run it alone)
    .venv/bin/python benchmarks/mixed_precision.py --work /tmp/mixed --plot docs/images/mixed_precision.png

Each row runs in a fresh subprocess (peak RSS covers one load + quantization) and is kept as JSON in --work, so an
interrupted run resumes. Rows: uniform 2/3/4/8-bit g64 and mixed budgets, for RTN and GPTQ (defaults: act-order,
clip), calibrated on the protocol's 64 x 512 tokens of valid.txt (mixed RTN uses them only to measure sensitivity);
perplexity on the first 40 x 512-token windows of test.txt. A mixed row's `target_bits` is a uniform row's stored
bits per weight (`core.bit_budget.stored_bits` over the model's Linears, g_idx included for act-order), so "same
size" is exact; the table also gives each checkpoint's measured Linear bytes. SmolLM2's published weights are Q4_1
(4-bit, groups of 32): every row here is flattered alike at 4 bits and more.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "wikitext-2"
UNIFORM_BITS = (2, 3, 4, 8)
GROUP = 64
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _uniform(method: str, bits: int) -> str:
    return f"{method}-w{bits}"


def rows(methods: list[str]) -> list[str]:
    """Uniform rows, then mixed rows named by the uniform size they match (`gptq-mixed@w3`) or lie between
    (`gptq-mixed@w2.5`: halfway between the w2 and w3 sizes)."""
    out = []
    for m in methods:
        out += [_uniform(m, b) for b in UNIFORM_BITS]
        out += [f"{m}-mixed@w{x}" for x in ("2.5", "3", "3.5", "4", "6")]
    return out


def shapes() -> list[tuple[str, int, int]]:
    """(name, in, out) of the Linears hf_ptq quantizes in SmolLM2 (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_ptq.default_model import smollm2_checkpoint
    from hf_ptq.nn.replace import linear_shape, quantizable_linears

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_checkpoint()))
    return [(n, *linear_shape(m)) for n, m in quantizable_linears(model, ["lm_head"])]


def uniform_bits_per_weight(method: str, bits: int) -> float:
    """Stored bits per weight of the uniform row (what `target_bits` must equal for the same size)."""
    from hf_ptq import PtqConfig
    from hf_ptq.core.bit_budget import stored_bits

    cfg = PtqConfig(method=method, bits=bits, group_size=GROUP)
    layers = shapes()
    total = sum(stored_bits(i, o, cfg.scheme, act_order=cfg.act_order_modules) for _, i, o in layers)
    return total / sum(i * o for _, i, o in layers)


def target_of(row: str) -> float | None:
    method, _, rest = row.partition("-")
    if not rest.startswith("mixed@w"):
        return None
    x = float(rest.removeprefix("mixed@w"))
    lo, hi = int(x), (int(x) + 1 if x != int(x) else int(x))
    if x == 6:
        lo, hi = 4, 8
    a, b = uniform_bits_per_weight(method, lo), uniform_bits_per_weight(method, hi)
    return round((a + b) / 2 if lo != hi else a, 6)


def config_of(row: str, calibration):
    from hf_ptq import PtqConfig

    method, _, rest = row.partition("-")
    common = {"dataset": calibration, "num_samples": calibration.shape[0], "seq_len": calibration.shape[1]}
    if method == "rtn":
        common = {} if target_of(row) is None else common
    target = target_of(row)
    if target is None:
        return PtqConfig(method=method, bits=int(rest.removeprefix("w")), group_size=GROUP, **common)
    return PtqConfig(method=method, bits=4, group_size=GROUP, target_bits=target, **common)


def worker(row: str, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import hf_ptq
    from hf_ptq import evaluation as ev
    from hf_ptq.default_model import smollm2_checkpoint

    hf_logging.set_verbosity_error()
    ckpt = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    valid = tok((DATA / "valid.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    calibration = ev.token_windows(valid, 512, 64).clone()
    cfg = config_of(row, calibration)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=cfg, dtype=torch.bfloat16).eval()
    res: dict = {"row": row, "target_bits": cfg.target_bits, "load_s": time.perf_counter() - start}
    res["peak_rss"] = ev.peak_rss_bytes()
    layers = [m for m in model.modules() if isinstance(m, hf_ptq.nn.QuantLinear)]
    res["bits_per_weight"] = sum(m.stored_bits() for m in layers) / sum(m.in_features * m.out_features for m in layers)
    res["schemes"] = sorted({f"w{m.bits} g{m.group_size}" for m in layers})
    out = work / f"ckpt-{row}"
    model.save_pretrained(out)
    names = [n for n, m in model.named_modules() if isinstance(m, hf_ptq.nn.QuantLinear)]
    res["linear_bytes"] = ev.linear_weight_bytes(ev.safetensors_sizes(out), names)
    ids = tok((DATA / "test.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    nll, count = 0.0, 0
    for window in ev.token_windows(ids, 512, 40):
        window_nll, n = ev.nll_sum(ev.causal_lm_logits(model, window[None]), window[None])
        nll, count = nll + window_nll, count + n
    res["ppl"] = float(torch.tensor(nll / count).exp())
    return res


def speed(work: Path, names: list[str], rounds: int = 3) -> dict[str, float]:
    """Best decode tok/s of saved rows, interleaved over rounds (run alone: timing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ptq  # noqa: F401
    from hf_ptq import evaluation as ev
    from hf_ptq.default_model import smollm2_checkpoint

    models = {n: AutoModelForCausalLM.from_pretrained(work / f"ckpt-{n}", dtype=torch.bfloat16).eval() for n in names}
    prompt = AutoTokenizer.from_pretrained(smollm2_checkpoint())(PROMPT, return_tensors="pt").input_ids
    best: dict[str, float] = {}
    for r in range(rounds):
        for n, model in models.items():
            tps = ev.decode_tokens_per_s(model, prompt, 64, repeats=1, warmup=1 if r == 0 else 0)
            best[n] = max(best.get(n, 0.0), tps)
    return best


def table(results: dict[str, dict]) -> str:
    lines = [
        "| row | target bits | bits/weight (stored) | Linear MB | schemes | PPL | quantize s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, r in results.items():
        target = "-" if r["target_bits"] is None else f"{r['target_bits']:.3f}"
        lines.append(
            f"| {row} | {target} | {r['bits_per_weight']:.3f} | {r['linear_bytes'] / 1e6:.2f} | "
            f"{', '.join(r['schemes'])} | {r['ppl']:.2f} | {r['load_s']:.0f} | {r['peak_rss'] / 1e9:.2f} |"
        )
    return "\n".join(lines)


def comparisons(results: dict[str, dict]) -> list[str]:
    """Mixed against uniform at the same size: perplexity, quantize time and peak RSS ratios."""
    out = []
    for row, r in results.items():
        method, _, rest = row.partition("-")
        if rest not in ("mixed@w3", "mixed@w4"):
            continue
        uni = results.get(_uniform(method, int(rest[-1])))
        if uni is None:
            continue
        better = r["ppl"] < uni["ppl"]
        out.append(
            f"{row}: PPL {r['ppl']:.2f} vs uniform {uni['ppl']:.2f} ({'lower' if better else 'NOT lower'}), "
            f"bits/weight {r['bits_per_weight']:.4f} vs {uni['bits_per_weight']:.4f}, quantize time "
            f"{r['load_s'] / uni['load_s']:.2f}x, peak RSS {r['peak_rss'] / uni['peak_rss']:.2f}x"
        )
    return out


def gguf_marks() -> dict[str, float]:
    """Bits per Linear weight of llama.cpp's presets on SmolLM2 as hf_ptq's GGUF export writes them (the types of
    `formats.gguf_types`, their block sizes from the gguf package)."""
    import gguf

    from hf_ptq.formats import gguf_types

    layers = shapes()
    blocks = 1 + max(int(n.split(".")[2]) for n, _, _ in layers)
    roles = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    marks = {}
    for preset in ("q4_k_m",):
        total = 0.0
        for name, i, o in layers:
            kind = gguf_types.layer_type(gguf_types.PRESETS[preset], roles[name.rsplit(".", 1)[1]],
                                         int(name.split(".")[2]), blocks)  # fmt: skip
            kind = gguf_types.fitted(kind, i)
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
            total += i * o * size * 8 / block
        marks[preset.upper()] = total / sum(i * o for _, i, o in layers)
    return marks


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, color in (("rtn", "tab:blue"), ("gptq", "tab:red")):
        for kind, marker, style in (("w", "o", "-"), ("mixed@", "s", "--")):
            pts = sorted(
                (r["bits_per_weight"], r["ppl"])
                for row, r in results.items()
                if row.startswith(f"{method}-{kind}") and (kind != "w" or "mixed" not in row)
            )
            if pts:
                label = f"{method} {'uniform 2/3/4/8-bit g64' if kind == 'w' else 'mixed (target_bits)'}"
                ax.plot(*zip(*pts, strict=True), style, marker=marker, color=color, label=label)
    top = 150.0  # 2-bit uniform RTN (perplexity in the hundreds of thousands) is named instead of drawn
    for row, r in results.items():
        if r["ppl"] > top:
            ax.annotate(f"{row}: {r['ppl']:.0f}", (r["bits_per_weight"], top), fontsize=7, va="top", rotation=90)
    ax.set_ylim(20, top)
    for name, bits in gguf_marks().items():
        ax.axvline(bits, color="gray", linestyle=":")
        ax.text(bits, top, f" {name} (as exported here)", va="top", fontsize=8, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per quantized weight (scales, zero points, g_idx counted)")
    ax.set_ylabel("WikiText-2 perplexity (40 x 512)")
    ax.set_title("SmolLM2-135M: mixed precision against uniform bit widths")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the rows' JSON and checkpoints")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--rows", help="comma-separated rows (default: all of --methods)")
    parser.add_argument("--speed", action="store_true", help="decode tok/s of w4 and mixed@w4 (run alone)")
    parser.add_argument("--plot", type=Path, help="write the perplexity / size plot here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        (args.work / f"{args.worker}.json").write_text(json.dumps(worker(args.worker, args.work)))
        return 0
    methods = args.methods.split(",")
    wanted = args.rows.split(",") if args.rows else rows(methods)
    for row in wanted:
        if not (args.work / f"{row}.json").exists():
            print(f"running {row} ...", flush=True)
            subprocess.run([sys.executable, __file__, "--work", str(args.work), "--worker", row], check=True)
    results = {r: json.loads((args.work / f"{r}.json").read_text()) for r in wanted}
    print(table(results))
    print()
    print("\n".join(comparisons(results)))
    if args.speed:
        names = [n for m in methods for n in (_uniform(m, 4), f"{m}-mixed@w4")]
        tps = speed(args.work, names)
        for m in methods:
            a, b = tps[_uniform(m, 4)], tps[f"{m}-mixed@w4"]
            print(f"decode {m}: uniform w4 {a:.1f} tok/s, mixed@w4 {b:.1f} tok/s ({b / a:.2f}x)")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
