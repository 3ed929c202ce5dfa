"""`evaluate`: perplexity, divergence from a reference model, speed, memory, size and load time in one call.

An `Evaluator` holds what several measurements share (the tokenized data, its windows, the reference model and
the reference's own measurements, taken once), so that `compare` measures the reference once for all configs.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils.logging import tqdm

from .data import data_ids, describe_data, self_written_ids
from .divergence import DivergenceMeter
from .downstream import run_tasks
from .memory import PeakMemory, checkpoint_bytes, full_precision_weights, model_bytes, state_dict_bytes
from .perplexity import causal_lm_logits, nll_sum, sliding_windows
from .result import EvalResult, ModelStats
from .speed import CpuMonitor, decode_tokens_per_s, prefill_tokens_per_s

DECODE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

ModelSource = Any  # a loaded transformers model, or a folder / Hub id to load one from


def _positive(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"evaluate({name}={value!r}): {name} must be a positive integer" + (" or None" * optional))


@dataclass(frozen=True)
class EvalOptions:
    """What and how `evaluate` / `compare` measure (see `evaluate` for each field); validated at construction,
    before any model is loaded."""

    data: Any = None
    text_column: str = "text"
    max_length: int = 512
    stride: int | None = None
    max_windows: int | None = None
    speed: bool = True
    new_tokens: int = 64
    speed_repeats: int = 3
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None

    def __post_init__(self) -> None:
        _positive("max_length", self.max_length)
        _positive("stride", self.stride, optional=True)
        _positive("max_windows", self.max_windows, optional=True)
        _positive("new_tokens", self.new_tokens)
        _positive("speed_repeats", self.speed_repeats)
        _positive("task_limit", self.task_limit, optional=True)
        if self.stride is not None and self.stride > self.max_length:
            raise ValueError(f"evaluate(stride={self.stride}): stride must be at most max_length={self.max_length}")
        tasks = self.tasks or ()
        if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
            raise ValueError(
                f"evaluate(tasks={tasks!r}): tasks must be a list of lm-eval task names, e.g. ['hellaswag']"
            )
        object.__setattr__(self, "tasks", tuple(tasks))
        describe_data(self.data, self.text_column)  # rejects unsupported data types now


def is_source(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_name(model: torch.nn.Module, source: ModelSource = None) -> str:
    """A short label: the folder / repo name, with the quantization config's summary when it has one."""
    base = Path(str(source or getattr(model, "name_or_path", "") or type(model).__name__).rstrip("/")).name
    describe = getattr(getattr(model.config, "quantization_config", None), "describe", None)
    return f"{base} ({describe()})" if callable(describe) and source is None else base


def load_model(source: ModelSource, dtype: torch.dtype | None = torch.bfloat16, **kwargs: Any):
    """(model, ModelStats with load time and checkpoint size) for a folder or Hub id."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).eval()
    stats = ModelStats(model_name(model, source), load_seconds=time.perf_counter() - start)
    folder = Path(source)
    stats.checkpoint_bytes = checkpoint_bytes(folder) if folder.is_dir() else state_dict_bytes(model)
    return model, stats


def resolve_tokenizer(tokenizer: Any, *sources: Any) -> Any:
    """`tokenizer`, or the tokenizer of the first source (folder, Hub id or model's `name_or_path`) that has one."""
    if tokenizer is not None and not is_source(tokenizer):
        return tokenizer
    from transformers import AutoTokenizer

    candidates = [tokenizer] if tokenizer is not None else []
    candidates += [s if is_source(s) else getattr(s, "name_or_path", None) for s in sources]
    errors = []
    for candidate in filter(None, candidates):
        try:
            return AutoTokenizer.from_pretrained(candidate)
        except Exception as err:  # noqa: BLE001  (try the next source)
            errors.append(f"{candidate}: {type(err).__name__}")
    raise ValueError(
        f"evaluate(): no tokenizer given and none could be loaded ({'; '.join(errors) or 'no source'}); "
        "pass tokenizer=..."
    )


class Evaluator:
    """Measures models on one evaluation set against one (optional) reference model."""

    def __init__(
        self,
        tokenizer: Any,
        reference: torch.nn.Module | None = None,
        reference_stats: ModelStats | None = None,
        options: EvalOptions | None = None,
    ) -> None:
        self.tokenizer, self.reference = tokenizer, reference
        self.reference_stats = reference_stats if reference is not None else None
        if reference is not None and self.reference_stats is None:
            self.reference_stats = ModelStats(model_name(reference), checkpoint_bytes=state_dict_bytes(reference))
        self.options = options or EvalOptions()
        self.data_description = describe_data(self.options.data, self.options.text_column)
        self._ids: torch.Tensor | None = None
        self._reference_measured = False
        self.downstream_skipped: str | None = None

    def ids(self, fallback: torch.nn.Module) -> torch.Tensor:
        """The evaluation tokens, 1-D (data-free: written by the reference, else by `fallback`)."""
        if self._ids is None:
            if self.options.data is None:
                writer = self.reference if self.reference is not None else fallback
                self._ids = self_written_ids(writer, self.tokenizer)  # shows its own progress, in tokens
                if self.reference is None:
                    self.data_description = "text written by the model itself (no data needed)"
            else:
                self._ids = data_ids(self.options.data, self.tokenizer, self.options.text_column)
        return self._ids

    def _check_model(self, model: torch.nn.Module, ids: torch.Tensor) -> None:
        """Errors that would otherwise surface as an index error or garbage: the tokenizer does not match the
        model (token ids beyond its embedding), or windows longer than its context."""
        vocab = model.get_input_embeddings().num_embeddings
        if ids.numel() and int(ids.max()) >= vocab:
            raise ValueError(
                f"evaluate(): token id {int(ids.max())} is outside the model's vocabulary of {vocab}: the tokenizer "
                "does not match the model (pass the model's own tokenizer; see docs/troubleshooting.md)."
            )
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit is not None and self.options.max_length > limit:
            raise ValueError(
                f"evaluate(max_length={self.options.max_length}) exceeds the model's context of {limit} tokens: pass "
                f"max_length <= {limit}."
            )

    def measure_speed_and_memory(self, model: torch.nn.Module, stats: ModelStats) -> None:
        """Memory held, prefill tokens/s over the first window, decode tokens/s, and the peak memory of running."""
        stats.memory_bytes = model_bytes(model)
        stats.full_precision, stats.full_precision_dtype = full_precision_weights(model)
        if not self.options.speed:
            return
        prefill = self.ids(model)[: self.options.max_length].reshape(1, -1)
        prompt = self.tokenizer(DECODE_PROMPT, return_tensors="pt").input_ids
        repeats, new_tokens = self.options.speed_repeats, self.options.new_tokens
        bar = tqdm(total=2 * (1 + repeats), desc=f"hf_ptq speed {stats.name}", unit="run")  # warm-up + repeats, twice
        monitor = CpuMonitor().start()
        with bar, PeakMemory(model_device(model)) as peak:
            bar.set_postfix_str(f"prefill {prefill.numel()} tokens")
            stats.prefill_tokens_per_s = prefill_tokens_per_s(model, prefill, repeats=repeats, step=bar.update)
            bar.set_postfix_str(f"decode {new_tokens} tokens")
            stats.decode_tokens_per_s = decode_tokens_per_s(model, prompt, new_tokens, repeats=repeats, step=bar.update)
        stats.peak_memory_bytes = stats.memory_bytes + peak.bytes
        stats.busy_cores = monitor.stop()

    def measure_reference(self, fallback: torch.nn.Module) -> None:
        """The reference's speed, memory and tasks (once)."""
        if self.reference is None or self._reference_measured:
            return
        self.ids(fallback)
        self.measure_speed_and_memory(self.reference, self.reference_stats)
        self.reference_stats.downstream = self._tasks(self.reference)
        self._reference_measured = True

    def _tasks(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.options.tasks:
            return {}
        scores, self.downstream_skipped = run_tasks(model, self.tokenizer, self.options.tasks, self.options.task_limit)
        return scores

    @torch.inference_mode()
    def measure(self, model: torch.nn.Module, stats: ModelStats) -> EvalResult:
        """Every measurement of `model` (and, once, of the reference), as an `EvalResult`."""
        ids = self.ids(model)
        for checked in (model, self.reference):
            if checked is not None:
                self._check_model(checked, ids)
        self.measure_reference(model)
        self.measure_speed_and_memory(model, stats)
        windows = sliding_windows(
            ids.numel(),
            self.options.max_length,
            self.options.stride or self.options.max_length,
            self.options.max_windows,
        )
        meter = DivergenceMeter()
        nll, ref_nll, count = 0.0, 0.0, 0
        for w in tqdm(windows, desc=f"hf_ptq eval {stats.name}", unit="window"):
            window = ids[w.begin : w.end].reshape(1, -1)
            logits = causal_lm_logits(model, window)
            window_nll, n = nll_sum(logits, window, w.first)
            nll, count = nll + window_nll, count + n
            if self.reference is not None:
                ref_logits = causal_lm_logits(self.reference, window).to(logits.device)
                ref_nll += nll_sum(ref_logits, window, w.first)[0]
                meter.update(ref_logits[:, w.first - 1 : -1], logits[:, w.first - 1 : -1])
                del ref_logits
            del logits
        stats.perplexity = float(torch.tensor(nll / count).exp())
        stats.downstream = self._tasks(model)
        result = EvalResult(stats, self.reference_stats, tokens_scored=count, windows=len(windows))
        result.data, result.downstream_skipped = self.data_description, self.downstream_skipped
        if self.reference is not None:
            self.reference_stats.perplexity = float(torch.tensor(ref_nll / count).exp())
            result.kl_divergence, result.top1_agreement = meter.kl, meter.top1
        return result


def evaluate(
    model: ModelSource,
    tokenizer: Any = None,
    *,
    reference: ModelSource = None,
    data: Any = None,
    text_column: str = "text",
    max_length: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    speed: bool = True,
    new_tokens: int = 64,
    speed_repeats: int = 3,
    tasks: list[str] | None = None,
    task_limit: int | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
) -> EvalResult:
    """Measure a (quantized) causal LM, and compare it with a reference model when one is given.

    Args:
        model: a loaded model, or a folder / Hub id to load (its load time and checkpoint size are then measured;
            `import hf_ptq` is done, so hf_ptq checkpoints reload packed).
        tokenizer: default: the tokenizer saved with `model` (or with `reference`).
        reference: the model to compare with (usually the unquantized one): a model or a folder / Hub id. Adds
            its perplexity, KL divergence and top-1 agreement of next-token distributions (no labels needed),
            the speed-up, memory and compression ratios, and the checklist.
        data: evaluation text: a text file path, a string, a list of strings, a `datasets.Dataset` (its
            `text_column`, rows joined by blank lines), token ids, or None: text the reference (else the model)
            writes itself from a few prompts, so no dataset or network is needed.
        max_length, stride, max_windows: perplexity windows of `max_length` tokens every `stride` tokens (default:
            `max_length`, non-overlapping), at most `max_windows` of them (default: the whole text).
        speed, new_tokens, speed_repeats: measure prefill tokens/s (one forward over `max_length` tokens) and decode
            tokens/s (greedy, batch 1, `new_tokens` new tokens), best of `speed_repeats` runs after a warm-up.
        tasks, task_limit: lm-eval task names (e.g. `["hellaswag"]`) and examples per task; run when lm-eval is
            installed and online, else skipped (`result.downstream_skipped` says why).
        dtype: dtype for models loaded from a folder or Hub id.

    Returns an `EvalResult`; `print(result)` shows the numbers and the checklist.
    """
    options = EvalOptions(
        data=data,
        text_column=text_column,
        max_length=max_length,
        stride=stride,
        max_windows=max_windows,
        speed=speed,
        new_tokens=new_tokens,
        speed_repeats=speed_repeats,
        tasks=tuple(tasks) if isinstance(tasks, (list, tuple)) else tasks or (),
        task_limit=task_limit,
    )
    tokenizer = resolve_tokenizer(tokenizer, model, reference)
    if is_source(model):
        model, stats = load_model(model, dtype)
    else:
        stats = ModelStats(model_name(model), checkpoint_bytes=state_dict_bytes(model))
    ref_stats = None
    if is_source(reference):
        reference, ref_stats = load_model(reference, dtype)
    evaluator = Evaluator(tokenizer, reference, ref_stats, options)
    result = evaluator.measure(model, stats)
    gc.collect()
    return result
