"""Downstream task accuracy through EleutherAI's lm-evaluation-harness (`pip install lm-eval`), when it is
installed and its task data can be fetched; otherwise the tasks are skipped with the reason, never an error."""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

logger = logging.getLogger("hf_ptq")

_PREFERRED_METRICS = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def task_score(metrics: dict[str, Any]) -> float | None:
    """The task's headline number from lm-eval's metrics dict: normalized accuracy, accuracy or exact match."""
    for key in _PREFERRED_METRICS:
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None


def run_tasks(
    model: Any, tokenizer: Any, tasks: list[str], limit: int | None = None, batch_size: int = 1
) -> tuple[dict[str, float], str | None]:
    """({task: score in [0, 1]}, None) or ({}, why the tasks were skipped)."""
    if importlib.util.find_spec("lm_eval") is None:
        return {}, "lm-eval is not installed (pip install lm-eval)"
    if _offline():
        return {}, "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set): lm-eval needs to download task data"
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    except Exception as err:  # noqa: BLE001  (no network, missing task data, lm-eval API changes: skip, say why)
        reason = f"lm-eval failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        logger.warning("hf_ptq: downstream tasks skipped: %s", reason)
        return {}, reason
    results = (output or {}).get("results", {})
    scores = {task: task_score(results.get(task, {})) for task in tasks}
    missing = [task for task, score in scores.items() if score is None]
    if missing:
        return {t: s for t, s in scores.items() if s is not None}, f"no accuracy reported for {', '.join(missing)}"
    return scores, None
