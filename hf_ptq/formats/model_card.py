"""The model card written next to a quantized checkpoint: method, bits, group size, how to load, measured figures."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

_TEMPLATE = """---
{card_data}
---

# {title}

This model was quantized with [hf_ptq](https://pypi.org/project/hf-ptq/): **{summary}**.

| setting | value |
|---|---|
| method | `{method}` |
| bits | {bits} |
| group size | {group_size} |
| symmetric | {sym} |
| layers kept in full precision | {skipped} |
| base model | {base_model} |

## How to load

```bash
pip install hf-ptq
```

```python
import hf_ptq  # registers the quantization format with transformers: without it the weights load as garbage
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
```
{metrics}"""


def _group_text(group_size: int) -> str:
    return {-1: "per-channel (-1)", 0: "per-tensor (0)"}.get(group_size, str(group_size))


def build_model_card(model, repo_id: str, metrics: dict[str, Any] | None = None) -> ModelCard:
    """A `ModelCard` for a model quantized by hf_ptq; `metrics` (name -> value) are listed as measured."""
    cfg = model.config.quantization_config
    base = getattr(model.config, "_name_or_path", "") or "unknown"
    metric_text = ""
    if metrics:
        rows = "\n".join(f"| {name} | {value} |" for name, value in metrics.items())
        metric_text = f"\n## Measured quality\n\n| metric | value |\n|---|---|\n{rows}\n"
    data = ModelCardData(library_name="transformers", tags=["hf-ptq", "quantized", f"{cfg.bits}-bit", cfg.method])
    text = _TEMPLATE.format(
        card_data=data.to_yaml(),
        title=f"{repo_id.split('/')[-1]}",
        summary=cfg.describe(),
        method=cfg.method,
        bits=cfg.bits,
        group_size=_group_text(cfg.group_size),
        sym=cfg.sym,
        skipped=", ".join(f"`{m}`" for m in sorted(getattr(model.hf_quantizer, "modules_to_not_convert", []) or []))
        or "none",
        base_model=base,
        repo_id=repo_id,
        metrics=metric_text,
    )
    return ModelCard(text)
