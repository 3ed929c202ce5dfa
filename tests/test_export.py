"""hf_ptq.export, `hf-ptq export`, `push_to_hub(format=...)`: choosing a format, errors before anything is written,
staged output folders, and what reaches the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, VOCAB
from test_hub import hub  # noqa: F401  (the Hub replaced by a recorder)
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ptq
from hf_ptq import PtqConfig, SmoothQuantConfig
from hf_ptq.cli import main


@pytest.fixture
def saved(tiny_llama_with_tokenizer_dir, tmp_path) -> Path:
    """A tiny Llama quantized by hf_ptq (w4 g32 sym) and saved with SmolLM2's tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_with_tokenizer_dir, quantization_config=PtqConfig(group_size=32, sym=True)
    )
    model.save_pretrained(tmp_path / "q")
    AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer_dir).save_pretrained(tmp_path / "q")
    return tmp_path / "q"


def test_formats_are_listed():
    assert hf_ptq.format_names() == ["compressed-tensors", "gguf", "gptq"]


def test_bad_arguments_name_what_is_supported(tmp_path: Path) -> None:
    model = hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(group_size=32))
    with pytest.raises(ValueError, match="format='onnx' is unknown. Supported formats: 'compressed-tensors'.*'gptq'"):
        hf_ptq.export(model, tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gguf_type'\]; its options: none"):
        hf_ptq.export(model, tmp_path / "x", format="compressed-tensors", gguf_type="q4_0")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gguf_type'\]; its options: checkpoint_format"):
        hf_ptq.export(model, tmp_path / "x", format="gptq", gguf_type="q4_0")
    assert not list(tmp_path.iterdir())


@pytest.mark.extra("gguf")
def test_export_from_a_saved_folder_stages_and_replaces_only_with_overwrite(saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "gguf"
    assert hf_ptq.export(str(saved), out, format="gguf") == out
    assert sorted(p.name for p in out.iterdir()) == ["model-Q4_0.gguf"]
    before = (out / "model-Q4_0.gguf").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="out_dir=.* exists and is not empty"):
        hf_ptq.export(str(saved), out, format="gguf")
    with pytest.raises(ValueError, match="gguf_type must be one of"):
        hf_ptq.export(str(saved), out, format="gguf", gguf_type="q2_k", overwrite=True)
    assert (out / "model-Q4_0.gguf").stat().st_mtime_ns == before  # a failed export left the folder as it was
    hf_ptq.export(str(saved), out, format="compressed-tensors", overwrite=True)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".gguf-*"))  # no staging or old folder left behind


@pytest.mark.extra("gguf")
def test_cli_export(saved: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(saved), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    assert "Exported" in capsys.readouterr().out
    config = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["sym"] is True
    assert main(["export", str(saved), "--format", "gguf", "--gguf-type", "q8_0"]) == 0
    assert (Path(f"{saved}-gguf") / "model-Q8_0.gguf").exists()


@pytest.mark.extra("gguf")
def test_cli_export_fails_in_one_line_before_writing(saved: Path, tmp_path: Path, capsys) -> None:
    int8 = tmp_path / "int8"
    hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(method="int8")).save_pretrained(int8)
    AutoTokenizer.from_pretrained(saved).save_pretrained(int8)
    assert main(["export", str(int8), "--format", "gguf", "--gguf-type", "q4_0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'q8_0'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert main(["export", str(tmp_path / "missing"), "--format", "gguf"]) == 2
    assert "missing: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(saved), "--format", "onnx"])


@pytest.mark.extra("gguf")
def test_push_to_hub_with_a_format(saved: Path, hub, tmp_path: Path) -> None:  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    model.push_to_hub("me/tiny-gguf", tokenizer=tokenizer, format="gguf", gguf_type="q8_0")
    files = hub.files()
    assert set(files) == {"model-Q8_0.gguf", "README.md"}
    card = files["README.md"].decode()
    assert 'gguf_file="model-Q8_0.gguf"' in card and "llama-cli -hf me/tiny-gguf" in card
    assert "gguf" in hub.readme_yaml[0]["tags"] and ", gguf" in hub.commits[0]["message"]

    hf_ptq.push_to_hub(model, "me/tiny-ct", format="compressed-tensors")  # the tokenizer saved with the model
    files = hub.files()
    assert json.loads(files["config.json"])["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "tokenizer.json" in files and "pip install compressed-tensors" in files["README.md"].decode()
    assert "import hf_ptq" not in files["README.md"].decode()


def test_push_to_hub_refuses_before_creating_the_repo(hub) -> None:  # noqa: F811
    model = hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(method="int8"))
    with pytest.raises(ValueError, match="found none saved with the model"):
        model.push_to_hub("me/x", format="gguf")
    assert hub.repos == [] and hub.commits == []


@pytest.mark.extra("hqq", "bnb")
def test_layers_the_formats_cannot_hold_are_refused(tmp_path: Path) -> None:
    hqq = hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(method="hqq", bits=4, group_size=32))
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ValueError, match=f"float zero points .HQQ., and {fmt} stores integer zero points only"):
            hf_ptq.export(hqq, tmp_path / "out", format=fmt)
    nf4 = AutoModelForCausalLM.from_pretrained(
        FAMILIES["llama"].build().save_pretrained(tmp_path / "f") or tmp_path / "f",
        quantization_config=PtqConfig(method="nf4"),
    )
    with pytest.raises(ValueError, match="method='nf4' keeps its weights in the bitsandbytes package's modules"):
        hf_ptq.export(nf4, tmp_path / "out", format="compressed-tensors")
    assert not (tmp_path / "out").exists()


def test_w8a8_goes_to_compressed_tensors_only(hub, tmp_path: Path) -> None:  # noqa: F811
    """gptq and gguf hold weight-only models: a W8A8 model is refused before its tokenizer is looked for or anything
    is written (or uploaded), naming the format that holds it and the methods they take."""
    calibration = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = SmoothQuantConfig(dataset=calibration, num_samples=4, seq_len=16)
    model = hf_ptq.quantize(FAMILIES["llama"].build(), cfg)
    for fmt in ("gptq", "gguf"):
        with pytest.raises(ValueError) as info:
            hf_ptq.export(model, tmp_path / "out", format=fmt)
        message = str(info.value)
        assert f"export(format='{fmt}') writes weight-only quantized models" in message
        assert "methods awq, gptq, hqq, int8, rtn" in message
        assert message.endswith("Supported for W8A8: format='compressed-tensors'.")
    with pytest.raises(ValueError, match="has W8A8 layers"):
        hf_ptq.push_to_hub(model, "me/w8a8-gptq", format="gptq")
    assert not list(tmp_path.iterdir()) and hub.repos == []
    hf_ptq.push_to_hub(model, "me/w8a8-ct", format="compressed-tensors")
    files = hub.files()
    assert json.loads(files["config.json"])["quantization_config"]["format"] == "int-quantized"
    assert "smoothquant w8a8" in files["README.md"].decode()
