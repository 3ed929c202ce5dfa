"""examples/ run as scripts on a tiny model that uses SmolLM2's tokenizer (offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["rtn", "int8"])
def test_quantize_and_push_example(tiny_llama_with_tokenizer_dir, tmp_path, method):
    result = load_example("quantize_and_push").main(
        [str(tiny_llama_with_tokenizer_dir), "--method", method, "--group-size", "32", "--out", str(tmp_path / "out")]
    )
    assert result["identical"]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_pipeline_and_training_example(tiny_llama_with_tokenizer_dir):
    result = load_example("pipeline_and_training").main([str(tiny_llama_with_tokenizer_dir), "--group-size", "32"])
    assert result["text"].startswith("The three primary colours are") and len(result["text"]) > 30
    assert result["last_loss"] < 0.5 * result["first_loss"]  # the head learns on the frozen quantized features


@pytest.mark.extra("plot")  # comparison.png
def test_compare_methods_example(tiny_llama_with_tokenizer_dir, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("Rain fell on the old stone bridge while the river carried leaves toward the sea. " * 10)
    args = [str(tiny_llama_with_tokenizer_dir), "--methods", "rtn,int8", "--group-size", "32", "--data", str(text)]
    comparison = load_example("compare_methods").main(
        args + ["--max-length", "64", "--no-speed", "--out", str(tmp_path / "r")]
    )
    assert list(comparison.results) == ["rtn w4 g32 asym", "int8 w8 per-channel sym"]
    assert (tmp_path / "r" / "report.md").exists() and (tmp_path / "r" / "comparison.png").exists()


@pytest.mark.extra("finetune")  # peft
def test_finetune_quantized_example(tiny_llama_with_tokenizer_dir, tmp_path):
    args = [str(tiny_llama_with_tokenizer_dir), "--group-size", "32", "--seq-len", "32", "--steps", "4", "--lr", "1e-2"]
    result = load_example("finetune_quantized").main(args + ["--out", str(tmp_path / "out")])
    assert result["after"] < result["before"]  # the adapter learned from the training text
    assert result["reloaded"] == pytest.approx(result["after"], rel=1e-4)
    assert result["exact_merged"] == pytest.approx(result["after"], rel=1e-3)
    assert result["merged"] == pytest.approx(result["after"], rel=0.05)  # rounded onto the grid: close, not exact
    for folder in ("base", "adapter", "merged"):
        assert (tmp_path / "out" / folder).is_dir()
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
