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
