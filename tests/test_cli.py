"""`hf-ptq quantize` on a tiny model: output folder, config errors before any work, no partial output."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_ptq
from hf_ptq.cli import main
from hf_ptq.default_model import smollm2_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_quantize_writes_a_reloadable_folder_and_reports_quality(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity, quantized" in printed and "top-1 agreement" in printed
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (saved["method"], saved["bits"], saved["group_size"]) == ("rtn", 4, 32)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[1].mlp.up_proj, hf_ptq.QuantLinear)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # the staging folder is gone


def test_bad_field_fails_before_work_and_writes_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--bits", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bits" in err and "2, 3, 4, 8" in err
    assert main(["quantize", str(tiny_dir), "--group-size", "48", "--out", str(out), "--no-eval"]) == 2
    assert "group_size=48" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_without_flag(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", str(tiny_dir), "--group-size", "32", "--out", str(out), "--no-eval"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
