"""`hf-ptq quantize` on a tiny model: output folder, config errors before any work, no partial output."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq.cli import main


def test_quantize_writes_a_reloadable_folder_and_reports_quality(tiny_llama_with_tokenizer_dir, tmp_path, capsys):
    tiny, out = tiny_llama_with_tokenizer_dir, tmp_path / "q"
    assert main(["quantize", str(tiny), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity, quantized" in printed and "top-1 agreement" in printed
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (saved["method"], saved["bits"], saved["group_size"]) == ("rtn", 4, 32)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[1].mlp.up_proj, hf_ptq.QuantLinear)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # the staging folder is gone


def test_bad_field_fails_before_work_and_writes_nothing(tiny_llama_with_tokenizer_dir, tmp_path, capsys):
    tiny, out = tiny_llama_with_tokenizer_dir, tmp_path / "q"
    assert main(["quantize", str(tiny), "--bits", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bits" in err and "2, 3, 4, 8" in err
    assert main(["quantize", str(tiny), "--group-size", "48", "--out", str(out), "--no-eval"]) == 2
    assert "group_size=48" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_without_flag(tiny_llama_with_tokenizer_dir, tmp_path, capsys):
    tiny, out = tiny_llama_with_tokenizer_dir, tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", str(tiny), "--group-size", "32", "--out", str(out), "--no-eval"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
