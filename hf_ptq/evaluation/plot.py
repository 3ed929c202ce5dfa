"""The comparison plot: perplexity against checkpoint size, and prefill / decode tokens/s bars (matplotlib, an
optional extra `plot`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from .result import MB, ModelStats


def plot_comparison(rows: list[ModelStats], path: str | Path, title: str = "") -> Path:
    """Write a PNG with three panels for `rows` (the reference first); rows without a number are left out of
    that panel. Uses matplotlib's object API (no global backend or pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    colors = {r.name: f"C{i}" for i, r in enumerate(rows)}
    ax = fig.add_subplot(1, 3, 1)
    for i, r in enumerate(rows):
        if r.perplexity is not None and r.checkpoint_bytes:
            ax.scatter(r.checkpoint_bytes / MB, r.perplexity, color=colors[r.name], s=40, zorder=3)
            ax.annotate(
                r.name,
                (r.checkpoint_bytes / MB, r.perplexity),
                fontsize=8,
                xytext=(4, 4 if i % 2 else -11),
                textcoords="offset points",
            )
    ax.margins(x=0.3, y=0.15)  # room for the labels
    ax.set_xlabel("checkpoint size (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("perplexity vs size")
    ax.grid(alpha=0.3)
    for i, (key, label) in enumerate((("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode")), 2):
        ax = fig.add_subplot(1, 3, i)
        shown = [r for r in rows if getattr(r, key) is not None]
        values = [getattr(r, key) for r in shown]
        bars = ax.bar(range(len(shown)), values, color=[colors[r.name] for r in shown])
        ax.bar_label(bars, fmt="%.0f" if label == "prefill" else "%.1f", fontsize=8)
        ax.set_xticks(range(len(shown)), [textwrap.fill(r.name, 14) for r in shown], fontsize=8)
        ax.set_ylabel("tokens/s (higher is better)")
        ax.set_title(f"{label} tokens/s")
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path
