"""The model card written next to a quantized checkpoint: method, bits, group size, how to load, measured figures."""

from __future__ import annotations

import re
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
| embeddings and lm_head | {embeddings} |
| layers kept in full precision | {skipped} |
| base model | {base_model} |

{mixed}## How to load

{how_to_load}
{metrics}"""

# How to load each upload: hf_ptq's own checkpoint, or an export (see hf_ptq.export and docs/export.md).
_HOW_TO_LOAD = {
    None: """```bash
pip install hf-ptq  # not on the package index yet: pip install -e . in a checkout of hf_ptq
```

```python
import hf_ptq  # registers the quantization format with transformers: without it the weights load as garbage
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
```

{portability}""",
    "compressed-tensors": """Stored in the compressed-tensors format (no hf_ptq needed):

```bash
pip install compressed-tensors
```

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
```

or serve it with vLLM: `vllm serve {repo_id}`.""",
    "gptq": """Stored in the GPTQ format (v1 checkpoint: `qweight` / `qzeros` / `scales` / `g_idx`), read by gptqmodel,
vLLM and transformers' GPTQ integration (which needs gptqmodel):

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
```

or `vllm serve {repo_id}`.""",
    "gguf": """Stored as GGUF (`{gguf_file}`), for llama.cpp:

```bash
llama-cli -hf {repo_id}
```

or transformers (dequantizes while loading; needs `pip install gguf`):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", gguf_file="{gguf_file}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", gguf_file="{gguf_file}")
```""",
}


_PORTABLE = """Its config.json is a compressed-tensors block (hf_ptq's own settings nested under `"hf_ptq"`), so plain
transformers with `pip install compressed-tensors` also loads it correctly without hf_ptq (dequantizing the weights
to run float matmuls), and vLLM serves it. With `import hf_ptq` it runs on hf_ptq's packed kernels."""

_NOT_PORTABLE = """It needs hf_ptq: compressed-tensors cannot express it ({why}), so its config.json says
`quant_method: "hf_ptq"`, and transformers without hf_ptq would only warn and load random weights."""


def _portability(model) -> str:
    from .compressed_tensors import why_not_portable

    why = why_not_portable(model)
    if why is None:
        return _PORTABLE
    reason = re.sub(r"^export\(format='compressed-tensors'\):? ", "", why.split(". ")[0].rstrip("."))
    return _NOT_PORTABLE.format(why=reason)


def _embeddings_text(model, format: str | None) -> str:
    """The model card's line on the input embedding and the output head (`embeddings=`)."""
    from ..nn import QuantEmbedding, TiedQuantHead

    fmt = getattr(model.config.quantization_config, "embeddings", None)
    emb = next((m for m in model.modules() if isinstance(m, QuantEmbedding)), None)
    if not fmt or emb is None:
        return "full precision (the model's dtype)"
    grid = "one scale per row" if emb.group_size == -1 else f"groups of {emb.group_size}"
    text = f"`{fmt}` ({emb.bits}-bit, {grid}, {'symmetric' if emb.sym else 'asymmetric'}, RTN)"
    if isinstance(model.get_output_embeddings(), TiedQuantHead):
        text += "; lm_head tied to the embedding: one packed tensor"
    if format is not None:
        text += f"; this {format} export holds them dequantized"
    return text


def _kept(model) -> set[str]:
    """The modules left in full precision: the quantizer's skips, less a head that `embeddings=` quantized."""
    from .layers import quantized_embeddings

    skipped = set(getattr(model.hf_quantizer, "modules_to_not_convert", []) or [])
    return skipped - set(quantized_embeddings(model))


def _mixed_text(model) -> tuple[str | None, str]:
    """(the bits cell, the per-layer section) of a model whose quantized layers differ in scheme; (None, "") else.

    The table lists layer, scheme, stored bits per weight and, when this process chose the schemes (`target_bits`),
    each layer's share of the measured error."""
    from ..nn import QuantLinear

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if len({(m.bits, m.group_size) for _, m in layers}) < 2:
        return None, ""
    shares = {row[0]: row[3] for row in getattr(model.config.quantization_config, "_mixed_report", None) or []}
    stored = {n: m.stored_bits() for n, m in layers}
    weights = sum(m.in_features * m.out_features for _, m in layers)
    average = sum(stored.values()) / weights
    bits = sorted({m.bits for _, m in layers})
    rows = "\n".join(
        f"| `{n}` | {m.bits}-bit {_group_text(m.group_size)} | {stored[n] / (m.in_features * m.out_features):.3f} | "
        + (f"{shares[n]:.1%}" if n in shares else "-")
        + " |"
        for n, m in layers
    )
    section = (
        "## Mixed precision\n\nEach layer's scheme (bits per weight with its scales and zero points; error: its "
        "share of the summed output error measured when the schemes were chosen):\n\n<details>\n\n"
        f"| layer | scheme | bits/weight | error |\n|---|---|---|---|\n{rows}\n\n</details>\n\n"
    )
    return f"mixed, {'/'.join(map(str, bits))}-bit: {average:.3f} bits per weight", section


def _group_text(group_size: int) -> str:
    return {-1: "per-channel (-1)", 0: "per-tensor (0)"}.get(group_size, str(group_size))


def build_model_card(
    model, repo_id: str, metrics: dict[str, Any] | None = None, format: str | None = None, files: list[str] = ()
) -> ModelCard:
    """A `ModelCard` for a model quantized by hf_ptq; `metrics` (name -> value) are listed as measured. `format`: the
    export uploaded (None: hf_ptq's own checkpoint), whose `files` name the GGUF file."""
    cfg = model.config.quantization_config
    base = getattr(model.config, "_name_or_path", "") or "unknown"
    metric_text = ""
    if metrics:
        rows = "\n".join(f"| {name} | {value} |" for name, value in metrics.items())
        metric_text = f"\n## Measured quality\n\n| metric | value |\n|---|---|\n{rows}\n"
    mixed_bits, mixed = _mixed_text(model)
    bits_tag = "mixed-precision" if mixed_bits else f"{cfg.scheme.bits}-bit"
    tags = ["hf-ptq", "quantized", bits_tag, cfg.method] + ([format] if format else [])
    data = ModelCardData(library_name="transformers", tags=tags)
    gguf_file = next((f for f in files if f.endswith(".gguf")), "model.gguf")
    text = _TEMPLATE.format(
        card_data=data.to_yaml(),
        title=f"{repo_id.split('/')[-1]}",
        summary=cfg.describe(),
        method=cfg.method,
        bits=mixed_bits or cfg.scheme.bits,
        group_size="per layer (below)" if mixed_bits else _group_text(cfg.scheme.group_size),
        mixed=mixed,
        sym=cfg.scheme.sym,
        embeddings=_embeddings_text(model, format),
        skipped=", ".join(f"`{m}`" for m in sorted(_kept(model))) or "none",
        base_model=base,
        how_to_load=_HOW_TO_LOAD[format].format(
            repo_id=repo_id, gguf_file=gguf_file, portability=_portability(model) if format is None else ""
        ),
        metrics=metric_text,
    )
    return ModelCard(text)
