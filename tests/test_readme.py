"""The README's usage example runs as written (on the embedded SmolLM2 model, offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import hf_ptq

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_block() -> str:
    text = README.read_text()
    section = text.split("## Usage", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_usage_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(usage_block(), str(README), "exec"), namespace)
    assert "paris" in capsys.readouterr().out.lower()
    assert isinstance(namespace["reloaded"].model.layers[0].self_attn.q_proj, hf_ptq.QuantLinear)
    assert sorted(p.suffix for p in (tmp_path / "smollm2-rtn-w4").iterdir()) == [".json", ".json", ".safetensors"]
    ids = namespace["inputs"]["input_ids"]
    with torch.no_grad():
        assert torch.equal(namespace["model"](ids).logits, namespace["reloaded"](ids).logits)


def section_block(title: str) -> str:
    section = README.read_text().split(f"## {title}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_compare_example_runs(tmp_path, monkeypatch, capsys):
    """README's "Measure and compare" block on the embedded SmolLM2 (data-free: one window of its own text)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(section_block("Measure and compare"), str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "## Validation checklist" in printed and "| int8 w8 per-channel sym |" in printed
    assert sorted(p.name for p in (tmp_path / "smollm2-comparison").iterdir()) == [
        "comparison.png",
        "report.md",
        "results.json",
    ]
    int8 = namespace["result"]
    assert int8.top1_agreement > 0.9 and int8.ppl_increase < 0.05 and 1.5 < int8.compression_ratio < 1.8


def test_configuration_table_matches_the_code() -> None:
    """Every method and every PtqConfig argument appears in the README's configuration table."""
    import inspect

    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    method_row = next(row for row in rows if row.startswith("| `method` |"))
    for name in [*hf_ptq.method_names(), "auto"]:
        assert f'`"{name}"`' in method_row, name
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row.split(" | ")[0])}
    arguments = set(inspect.signature(hf_ptq.PtqConfig).parameters) - {"quant_method", "saved"}
    assert arguments <= documented, arguments - documented
