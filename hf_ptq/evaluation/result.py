"""What `evaluate` measures (`ModelStats` per model, `EvalResult` for a model against its reference) and the
validation checklist: pass/fail against configurable `Thresholds`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

MB = 2**20
NO_REFERENCE = "needs a reference model (the unquantized one) to compare with"


@dataclass
class ModelStats:
    """Measurements of one model. `None`: not measured.

    memory_bytes: parameters and buffers the model holds. peak_memory_bytes: peak memory to load (when evaluate
    loaded it) and run it for the speed measurements (CUDA allocations on a GPU, process RSS on CPU).
    checkpoint_bytes: its safetensors files on disk (a model held in memory: the bytes `save_pretrained` writes).
    downstream: {lm-eval task: accuracy in [0, 1]}.
    full_precision: {part: bytes} of the weights kept in floating point (`full_precision_dtype`): "embedding",
    "lm_head", "N other layers". busy_cores: CPU cores other processes used while the speed was timed.
    """

    name: str
    perplexity: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    memory_bytes: int | None = None
    peak_memory_bytes: int | None = None
    checkpoint_bytes: int | None = None
    load_seconds: float | None = None
    quantize_seconds: float | None = None
    downstream: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    full_precision: dict[str, int] = field(default_factory=dict)
    full_precision_dtype: str = ""
    busy_cores: float | None = None


@dataclass(frozen=True)
class Thresholds:
    """The validation checklist's targets (defaults: the usual PTQ acceptance criteria).

    max_ppl_increase: perplexity may rise by at most this fraction of the reference's (0.10 = 10 %).
    max_downstream_drop: mean task accuracy may drop by at most this much (0.02 = 2 accuracy points).
    min_speedup: decode tokens/s at least this multiple of the reference's.
    max_memory_ratio: model memory at most this fraction of the reference's.
    """

    max_ppl_increase: float = 0.10
    max_downstream_drop: float = 0.02
    min_speedup: float = 1.5
    max_memory_ratio: float = 1 / 3


@dataclass(frozen=True)
class Check:
    """One checklist row; `passed` is None when it could not be measured. `why`: one line on what a FAIL or n/a
    comes from ("" on a PASS)."""

    name: str
    value: str
    target: str
    passed: bool | None
    why: str = ""

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class EvalResult:
    """`evaluate`'s result: the model's measurements, its reference's (when given) and how far apart they are.

    kl_divergence: mean KL(reference || model) of the next-token distributions over the scored positions, in
    nats. top1_agreement: fraction of those positions where both models' most likely token is the same.
    """

    model: ModelStats
    reference: ModelStats | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    tokens_scored: int = 0
    windows: int = 0
    data: str = ""
    downstream_skipped: str | None = None

    # --- the model's own numbers, for `result.perplexity` etc. ---------------------------------------------
    @property
    def perplexity(self) -> float | None:
        return self.model.perplexity

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self.model.prefill_tokens_per_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.model.decode_tokens_per_s

    @property
    def peak_memory_bytes(self) -> int | None:
        return self.model.peak_memory_bytes

    @property
    def checkpoint_bytes(self) -> int | None:
        return self.model.checkpoint_bytes

    @property
    def load_seconds(self) -> float | None:
        return self.model.load_seconds

    @property
    def downstream(self) -> dict[str, float]:
        return self.model.downstream

    # --- against the reference -------------------------------------------------------------------------------
    @property
    def compression_ratio(self) -> float | None:
        """Reference checkpoint bytes / this checkpoint's (4.0: four times smaller)."""
        return _ratio(self.reference and self.reference.checkpoint_bytes, self.model.checkpoint_bytes)

    @property
    def ppl_increase(self) -> float | None:
        """Relative perplexity increase over the reference (0.05 = 5 % higher)."""
        r = _ratio(self.model.perplexity, self.reference and self.reference.perplexity)
        return None if r is None else r - 1

    @property
    def speedup(self) -> float | None:
        """Decode tokens/s over the reference's."""
        return _ratio(self.model.decode_tokens_per_s, self.reference and self.reference.decode_tokens_per_s)

    @property
    def prefill_speedup(self) -> float | None:
        return _ratio(self.model.prefill_tokens_per_s, self.reference and self.reference.prefill_tokens_per_s)

    @property
    def memory_ratio(self) -> float | None:
        """Model memory over the reference's (0.3: under a third)."""
        return _ratio(self.model.memory_bytes, self.reference and self.reference.memory_bytes)

    @property
    def downstream_drop(self) -> float | None:
        """Mean over the tasks both models ran of (reference accuracy - model accuracy)."""
        if self.reference is None:
            return None
        common = [t for t in self.model.downstream if t in self.reference.downstream]
        if not common:
            return None
        return sum(self.reference.downstream[t] - self.model.downstream[t] for t in common) / len(common)

    def checklist(self, thresholds: Thresholds | None = None) -> list[Check]:
        """The four checks: perplexity increase, downstream drop, speed-up, memory; each miss says why."""
        t = thresholds or Thresholds()
        ppl, drop, speed, mem = self.ppl_increase, self.downstream_drop, self.speedup, self.memory_ratio
        return [
            Check(
                "perplexity increase",
                "—" if ppl is None else f"{100 * ppl:+.1f} %",
                f"< {100 * t.max_ppl_increase:g} %",
                None if ppl is None else ppl < t.max_ppl_increase,
                self._why_perplexity(ppl, t),
            ),
            Check(
                "downstream accuracy drop",
                "—" if drop is None else f"{100 * drop:.1f} points",
                f"< {100 * t.max_downstream_drop:g} points",
                None if drop is None else drop < t.max_downstream_drop,
                self._why_downstream(drop, t),
            ),
            Check(
                "decode speed-up",
                "—" if speed is None else f"{speed:.2f}x",
                f">= {t.min_speedup:g}x",
                None if speed is None else speed >= t.min_speedup,
                self._why_speed(speed, t),
            ),
            Check(
                "memory vs reference",
                "—" if mem is None else f"{mem:.3f}",
                f"<= {t.max_memory_ratio:.3g}",
                None if mem is None else mem <= t.max_memory_ratio,
                self._why_memory(mem, t),
            ),
        ]

    def _why_perplexity(self, ppl: float | None, t: Thresholds) -> str:
        if self.reference is None:
            return NO_REFERENCE
        if ppl is None:
            return "perplexity not measured"
        if ppl < t.max_ppl_increase:
            return ""
        return (
            f"perplexity {self.model.perplexity:.2f} against {self.reference.perplexity:.2f}: the grid loses too "
            "much; try more bits, a smaller group_size, or gptq / awq with calibration data"
        )

    def _why_downstream(self, drop: float | None, t: Thresholds) -> str:
        if self.reference is None:
            return NO_REFERENCE
        if drop is None:
            if self.downstream_skipped:
                reason = self.downstream_skipped
                return f"needs downstream data: {'offline' if reason.startswith('offline') else reason}"
            return "needs downstream data: no tasks given (tasks=[...], --tasks)"
        if drop < t.max_downstream_drop:
            return ""
        common = [k for k in self.model.downstream if k in self.reference.downstream]
        task = max(common, key=lambda k: self.reference.downstream[k] - self.model.downstream[k])
        before, after = self.reference.downstream[task], self.model.downstream[task]
        return f"largest drop on {task}: {100 * before:.1f} % -> {100 * after:.1f} %"

    def _why_speed(self, speed: float | None, t: Thresholds) -> str:
        if self.reference is None:
            return NO_REFERENCE
        if speed is None:
            return "speed not measured (speed=False)"
        if speed >= t.min_speedup:
            return ""
        why = f"decode {self.model.decode_tokens_per_s:.1f} against {self.reference.decode_tokens_per_s:.1f} tokens/s"
        busy = max((s.busy_cores or 0.0 for s in (self.model, self.reference)), default=0.0)
        if busy >= 0.5:
            why += f"; other processes used {busy:.1f} CPU cores while it was timed: measure on a quiet machine"
        return why

    def _why_memory(self, mem: float | None, t: Thresholds) -> str:
        if self.reference is None:
            return NO_REFERENCE
        if mem is None:
            return "memory not measured"
        if mem <= t.max_memory_ratio:
            return ""
        parts, dtype = self.model.full_precision, self.model.full_precision_dtype or "full precision"
        if not parts:
            return "the quantized weights themselves take this much: use fewer bits (4-bit takes about 0.27x)"
        names = " and ".join(parts)
        plural = len(parts) > 1 or " and " in names or names.endswith("layers")
        share = f"{sum(parts.values()) / MB:.1f} of {self.model.memory_bytes / MB:.1f} MiB"
        why = f"{names} stay{'' if plural else 's'} {dtype} ({share})"
        if any(p.startswith(("embedding", "lm_head")) for p in parts):
            why += ": try embeddings='int8'"
        return why

    def to_dict(self) -> dict:
        """JSON-safe numbers, including the derived ratios."""
        out = asdict(self)
        for name in ("compression_ratio", "ppl_increase", "speedup", "prefill_speedup", "memory_ratio"):
            out[name] = getattr(self, name)
        out["downstream_drop"] = self.downstream_drop
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        """Inverse of `to_dict` (derived ratios are recomputed, not read)."""
        fields = {
            k: data[k]
            for k in ("kl_divergence", "top1_agreement", "tokens_scored", "windows", "data", "downstream_skipped")
            if k in data
        }
        reference = ModelStats(**data["reference"]) if data.get("reference") else None
        return cls(ModelStats(**data["model"]), reference, **fields)

    def headline(self) -> dict[str, str]:
        """The numbers a model card shows: {metric name: formatted value}."""
        out = {"perplexity": _fmt(self.model.perplexity, ".3f")}
        if self.reference is not None:
            out["perplexity of the unquantized model"] = _fmt(self.reference.perplexity, ".3f")
            out["KL divergence from the unquantized model (nats/token)"] = _fmt(self.kl_divergence, ".4f")
            out["top-1 agreement with the unquantized model"] = _fmt(self.top1_agreement, ".1%")
        for task, score in self.model.downstream.items():
            out[f"{task} accuracy"] = _fmt(score, ".1%")
        if self.data:
            out["evaluation data"] = self.data
        return {k: v for k, v in out.items() if v != "—"}

    def to_markdown(self, thresholds: Thresholds | None = None) -> str:
        """The measurements (model and reference side by side) and the checklist, as markdown tables."""
        rows = metric_rows(self)
        head = "| metric | " + self.model.name + (f" | {self.reference.name} |" if self.reference else " |")
        lines = [head, "|---|---|" + ("---|" if self.reference else "")]
        for name, mine, ref in rows:
            lines.append(f"| {name} | {mine} |" + (f" {ref} |" if self.reference else ""))
        lines += ["", checklist_markdown(self.checklist(thresholds))]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _fmt(value: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value / scale, spec) + unit


def metric_rows(result: EvalResult) -> list[tuple[str, str, str]]:
    """(metric, model's value, reference's value) for every measured metric."""
    m, r = result.model, result.reference or ModelStats("")
    rows = [
        ("perplexity", _fmt(m.perplexity, ".3f"), _fmt(r.perplexity, ".3f")),
        ("KL(reference ‖ model), nats/token", _fmt(result.kl_divergence, ".4f"), "0"),
        ("top-1 agreement", _fmt(result.top1_agreement, ".1%"), "100.0%"),
        ("prefill tokens/s", _fmt(m.prefill_tokens_per_s, ".0f"), _fmt(r.prefill_tokens_per_s, ".0f")),
        ("decode tokens/s", _fmt(m.decode_tokens_per_s, ".1f"), _fmt(r.decode_tokens_per_s, ".1f")),
        ("memory (weights)", _fmt(m.memory_bytes, ".1f", MB, " MiB"), _fmt(r.memory_bytes, ".1f", MB, " MiB")),
        ("peak memory", _fmt(m.peak_memory_bytes, ".1f", MB, " MiB"), _fmt(r.peak_memory_bytes, ".1f", MB, " MiB")),
        ("checkpoint", _fmt(m.checkpoint_bytes, ".1f", MB, " MiB"), _fmt(r.checkpoint_bytes, ".1f", MB, " MiB")),
        ("compression ratio", _fmt(result.compression_ratio, ".2f", unit="x"), "1.00x"),
        ("load time", _fmt(m.load_seconds, ".1f", unit=" s"), _fmt(r.load_seconds, ".1f", unit=" s")),
    ]
    if m.quantize_seconds is not None:
        rows.append(("quantization time", _fmt(m.quantize_seconds, ".1f", unit=" s"), "—"))
    for task in sorted(set(m.downstream) | set(r.downstream)):
        rows.append((f"{task} accuracy", _fmt(m.downstream.get(task), ".1%"), _fmt(r.downstream.get(task), ".1%")))
    if result.reference is None:
        rows = [row for row in rows if row[1] != "—" or row[0] == "perplexity"]
    return rows


def checklist_markdown(checks: list[Check]) -> str:
    lines = ["| check | measured | target | result | why |", "|---|---|---|---|---|"]
    lines += [f"| {c.name} | {c.value} | {c.target} | {c.verdict} | {c.why} |" for c in checks]
    return "\n".join(lines)
