"""`compare`: quantize one model several ways, measure each against the unquantized model, and write
`report.md`, `comparison.png` and `results.json`."""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils.logging import tqdm

from ..core.install import extra_install
from ..folders import check_output_folder, staged_folder
from .memory import checkpoint_bytes
from .report import comparison_markdown, machine_line
from .result import EvalResult, ModelStats, Thresholds
from .run import EvalOptions, Evaluator, load_model, model_device, resolve_tokenizer

logger = logging.getLogger("hf_ptq")

REPORT, PLOT, RESULTS = "report.md", "comparison.png", "results.json"


@dataclass
class Comparison:
    """`compare`'s result: the reference's measurements, one `EvalResult` per config, and the files written."""

    reference: ModelStats
    results: dict[str, EvalResult]
    thresholds: Thresholds = field(default_factory=Thresholds)
    markdown: str = ""
    out_dir: Path | None = None

    @property
    def report_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / REPORT

    @property
    def plot_path(self) -> Path | None:
        path = None if self.out_dir is None else self.out_dir / PLOT
        return path if path is not None and path.exists() else None

    def __str__(self) -> str:
        return self.markdown


def config_name(config: Any) -> str:
    """A label for a quantization config: its one-line summary when it has one, else its class name."""
    describe = getattr(config, "describe", None)
    return describe() if callable(describe) else type(config).__name__


def named_configs(configs: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """{name: config} from a mapping, a list of configs, or a list of (name, config) pairs; names must be unique."""
    items = (
        list(configs.items())
        if isinstance(configs, Mapping)
        else [c if isinstance(c, tuple) else (config_name(c), c) for c in configs]
    )
    if not items:
        raise ValueError("compare(configs=[]): pass at least one quantization config")
    out: dict[str, Any] = {}
    for name, cfg in items:
        if not hasattr(cfg, "to_dict") or not hasattr(cfg, "quant_method"):
            raise TypeError(f"compare(): {name!r} is a {type(cfg).__name__}, not a transformers quantization config")
        if name in out:
            raise ValueError(f"compare(): two configs are named {name!r}; pass (name, config) pairs or a dict")
        out[name] = cfg
    return out


def quantize_and_reload(source: Any, name: str, config: Any, dtype: torch.dtype | None) -> tuple[Any, ModelStats]:
    """Quantize `source` on load (timed), save to a temporary folder (size), reload from it (timed)."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    quantized = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=dtype)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="hf_ptq-compare-") as folder:
        quantized.save_pretrained(folder)
        del quantized
        gc.collect()
        model, stats = load_model(folder, dtype)
        stats.checkpoint_bytes = checkpoint_bytes(folder)
    stats.name, stats.quantize_seconds = name, seconds
    return model, stats


def setup_line(model: Any, evaluator: Evaluator, results: dict[str, EvalResult], reference: Any) -> str:
    """What was measured, how, and where: the report's first paragraph."""
    o = evaluator.options
    text = f"Model: `{model}`. Evaluation: {evaluator.data_description}"
    first = next((r for r in results.values() if r.windows), None)
    if first is not None:
        text += f"; {first.windows} windows of up to {o.max_length} tokens (stride {o.stride or o.max_length})"
        text += f", {first.tokens_scored} tokens scored"
    if o.speed:
        text += f"; decode: batch 1, {o.new_tokens} new tokens, best of {o.speed_repeats}"
    return text + f". Measured on {machine_line(model_device(reference))}."


def compare(
    configs: Sequence[Any] | Mapping[str, Any],
    model: Any = None,
    *,
    out_dir: str | Path | None = "hf_ptq-comparison",
    overwrite: bool = False,
    tokenizer: Any = None,
    thresholds: Thresholds | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    plot: bool = True,
    **eval_options: Any,
) -> Comparison:
    """Quantize `model` with each config, and measure every result against the unquantized model.

    Each config: quantize on load (timed), save, reload from the saved folder (load time, checkpoint size), then
    `evaluate`'s measurements on the same data and windows, against the reference measured once. A config that
    fails is reported as an error row; the others still run.

    Args:
        configs: quantization configs (`PtqConfig`, or any transformers quantization config), as a list (named
            by their summary), a list of (name, config) pairs, or a {name: config} dict.
        model: folder or Hub id of the unquantized model (default: the embedded SmolLM2-135M-Instruct, offline).
        out_dir: folder for `report.md`, `comparison.png` (with matplotlib installed) and `results.json`, written
            all at once (an interrupted run leaves nothing); None writes nothing.
        thresholds: the checklist's targets (default `Thresholds()`).
        plot: draw `comparison.png` (needs matplotlib: the `plot` extra).
        eval_options: `evaluate`'s `data`, `text_column`, `max_length`, `stride`, `max_windows`, `speed`,
            `new_tokens`, `speed_repeats`, `tasks`, `task_limit`.
    """
    options = EvalOptions(**eval_options)
    named = named_configs(configs)
    thresholds = thresholds or Thresholds()
    if out_dir is not None:
        check_output_folder(out_dir, overwrite, field="out_dir")
    if model is None:
        from ..default_model import smollm2_checkpoint

        model = str(smollm2_checkpoint())
    tokenizer = resolve_tokenizer(tokenizer, model)
    reference, ref_stats = load_model(model, dtype)
    ref_stats.name = f"unquantized ({str(dtype).removeprefix('torch.') if dtype else 'as saved'})"
    evaluator = Evaluator(tokenizer, reference, ref_stats, options)
    evaluator.measure_reference(reference)
    results: dict[str, EvalResult] = {}
    for name, config in tqdm(named.items(), desc="hf_ptq compare", unit="config"):
        try:
            quantized, stats = quantize_and_reload(model, name, config, dtype)
            results[name] = evaluator.measure(quantized, stats)
            del quantized
        except Exception as err:  # noqa: BLE001  (one failing config must not lose the others' numbers)
            logger.error("hf_ptq compare: %s failed: %s: %s", name, type(err).__name__, err)
            results[name] = EvalResult(ModelStats(name, error=f"{type(err).__name__}: {err}"), ref_stats)
        gc.collect()

    setup = setup_line(model, evaluator, results, reference)
    title = f"Quantization comparison: {Path(str(model)).name}"
    comparison = Comparison(ref_stats, results, thresholds)
    if out_dir is None:
        comparison.markdown = comparison_markdown(title, setup, ref_stats, results, thresholds, None)
        return comparison
    with staged_folder(out_dir, overwrite, "out_dir") as staging:
        plot_name = None
        if plot:
            try:
                from .plot import plot_comparison

                plot_comparison([ref_stats] + [r.model for r in results.values()], staging / PLOT, title)
                plot_name = PLOT
            except ImportError:
                logger.warning("hf_ptq compare: matplotlib is not installed, no plot (%s)", extra_install("plot"))
        comparison.markdown = comparison_markdown(title, setup, ref_stats, results, thresholds, plot_name)
        (staging / REPORT).write_text(comparison.markdown + "\n", encoding="utf-8")
        payload = {"model": str(model), "reference": ref_stats.__dict__, "setup": setup}
        payload["results"] = {name: r.to_dict() for name, r in results.items()}
        (staging / RESULTS).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    comparison.out_dir = Path(out_dir)
    return comparison
