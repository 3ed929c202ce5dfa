"""`report.md` of a comparison: one table of measurements (the reference first) and the checklist per config."""

from __future__ import annotations

import platform

import torch

from .result import MB, EvalResult, ModelStats, Thresholds, _fmt


def machine_line(device: torch.device) -> str:
    """Where the numbers were measured (timings only compare within one machine)."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}"


def comparison_table(reference: ModelStats, results: dict[str, EvalResult]) -> str:
    head = (
        "| config | quantize s | load s | checkpoint MiB | compression | memory MiB | peak MiB | perplexity | "
        "ppl increase | KL | top-1 | prefill tok/s | decode tok/s | decode speed-up |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(s: ModelStats, r: EvalResult | None) -> str:
        if s.error:
            return f"| {s.name} | error: {s.error} |" + " — |" * 12
        cells = [
            s.name,
            _fmt(s.quantize_seconds, ".1f"),
            _fmt(s.load_seconds, ".1f"),
            _fmt(s.checkpoint_bytes, ".1f", MB),
            "1.00x" if r is None else _fmt(r.compression_ratio, ".2f", unit="x"),
            _fmt(s.memory_bytes, ".1f", MB),
            _fmt(s.peak_memory_bytes, ".1f", MB),
            _fmt(s.perplexity, ".3f"),
            "—" if r is None else _fmt(r.ppl_increase, "+.1%"),
            "—" if r is None else _fmt(r.kl_divergence, ".4f"),
            "—" if r is None else _fmt(r.top1_agreement, ".1%"),
            _fmt(s.prefill_tokens_per_s, ".0f"),
            _fmt(s.decode_tokens_per_s, ".1f"),
            "1.00x" if r is None else _fmt(r.speedup, ".2f", unit="x"),
        ]
        return "| " + " | ".join(cells) + " |"

    lines.append(row(reference, None))
    lines += [row(r.model, r) for r in results.values()]
    return "\n".join(lines)


def checklist_table(results: dict[str, EvalResult], thresholds: Thresholds) -> str:
    """One row per config, one column per check: PASS / FAIL / n/a with the measured value."""
    names = [f"{c.name} {c.target}" for c in EvalResult(ModelStats("")).checklist(thresholds)]
    lines = ["| config | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name, result in results.items():
        if result.model.error:
            lines.append(f"| {name} |" + " error |" * len(names))
            continue
        cells = [f"{c.verdict} ({c.value})" for c in result.checklist(thresholds)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    whys = [
        f"- {name}, {c.name}: {c.why}"
        for name, result in results.items()
        if not result.model.error
        for c in result.checklist(thresholds)
        if c.why
    ]
    return "\n".join(lines + ([""] + whys if whys else []))


def comparison_markdown(
    title: str,
    setup: str,
    reference: ModelStats,
    results: dict[str, EvalResult],
    thresholds: Thresholds,
    plot_name: str | None,
) -> str:
    parts = [f"# {title}", "", setup, ""]
    if plot_name:
        parts += [f"![perplexity vs size, tokens/s]({plot_name})", ""]
    parts += [comparison_table(reference, results), "", "## Validation checklist", ""]
    parts += [checklist_table(results, thresholds), ""]
    skipped = {r.downstream_skipped for r in results.values() if r.downstream_skipped}
    if skipped:
        parts += [f"Downstream tasks skipped: {'; '.join(sorted(skipped))}.", ""]
    return "\n".join(parts)
