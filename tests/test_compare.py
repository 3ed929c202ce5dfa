"""hf_ptq.compare on a tiny model: report.md, comparison.png and results.json, error rows, safe output folder."""

from __future__ import annotations

import json
import sys

import pytest
from transformers import AutoModelForCausalLM

import hf_ptq

TEXT = "A quiet harbour town wakes early: boats go out, gulls follow them, and the bakery opens at five. " * 8
FAST = {"max_length": 64, "speed": False}


@pytest.mark.extra("plot")
def test_compare_writes_report_plot_and_json(tiny_llama_with_tokenizer_dir, tmp_path):
    configs = [
        hf_ptq.PtqConfig(method="rtn", bits=4, group_size=32),
        ("int8", hf_ptq.PtqConfig(method="int8")),
        ("bad group", hf_ptq.PtqConfig(method="rtn", group_size=48)),
    ]
    out = tmp_path / "report"
    result = hf_ptq.compare(configs, tiny_llama_with_tokenizer_dir, out_dir=out, data=TEXT, **FAST)
    assert sorted(p.name for p in out.iterdir()) == ["comparison.png", "report.md", "results.json"]
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no staging folder left
    report = (out / "report.md").read_text()
    assert "![perplexity vs size, tokens/s](comparison.png)" in report and "## Validation checklist" in report
    assert "| rtn w4 g32 asym | PASS" in report and "| int8 | PASS" in report
    assert "| bad group | error: ValueError: PtqConfig.group_size=48 does not divide in_features=64" in report
    rtn, int8 = result.results["rtn w4 g32 asym"], result.results["int8"]
    assert rtn.checkpoint_bytes < int8.checkpoint_bytes < result.reference.checkpoint_bytes
    assert rtn.model.quantize_seconds > 0 and rtn.load_seconds > 0 and 0 < rtn.kl_divergence
    assert rtn.reference is result.reference and result.reference.perplexity == int8.reference.perplexity
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["int8"]["compression_ratio"] == pytest.approx(int8.compression_ratio)
    assert saved["results"]["bad group"]["model"]["error"].startswith("ValueError")
    # the same numbers as evaluating the saved quantized model directly
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_with_tokenizer_dir, quantization_config=configs[0])
    direct = hf_ptq.evaluate(model, reference=tiny_llama_with_tokenizer_dir, data=TEXT, **FAST)
    assert direct.perplexity == pytest.approx(rtn.perplexity, rel=1e-6)
    assert direct.kl_divergence == pytest.approx(rtn.kl_divergence, rel=1e-4)


def test_existing_output_fails_before_any_work(tiny_llama_with_tokenizer_dir, tmp_path, monkeypatch):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "keep.md").write_text("mine")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(FileExistsError, match="out_dir=.* exists and is not empty: pass overwrite"):
        hf_ptq.compare([hf_ptq.PtqConfig()], tiny_llama_with_tokenizer_dir, out_dir=tmp_path / "report")
    with pytest.raises(ValueError, match="two configs are named 'rtn w4 g128 asym'"):
        hf_ptq.compare([hf_ptq.PtqConfig(), hf_ptq.PtqConfig()], tiny_llama_with_tokenizer_dir, out_dir=None)
    with pytest.raises(TypeError, match="'x' is a dict, not a transformers quantization config"):
        hf_ptq.compare({"x": {"bits": 4}}, tiny_llama_with_tokenizer_dir, out_dir=None)
    assert (tmp_path / "report" / "keep.md").read_text() == "mine"


def test_interrupted_compare_leaves_the_old_report(tiny_llama_with_tokenizer_dir, tmp_path, monkeypatch):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("old report")

    def interrupted(*args, **kwargs):
        (args[1].parent / "report.md").write_text("half")  # something was written in the staging folder
        raise KeyboardInterrupt

    monkeypatch.setattr("hf_ptq.evaluation.plot.plot_comparison", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hf_ptq.compare(
            [hf_ptq.PtqConfig(group_size=32)],
            tiny_llama_with_tokenizer_dir,
            out_dir=out,
            overwrite=True,
            data=TEXT,
            **FAST,
        )
    assert [p.name for p in tmp_path.iterdir()] == ["report"] and (out / "report.md").read_text() == "old report"


def test_without_matplotlib_the_report_has_no_plot(tiny_llama_with_tokenizer_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.delitem(sys.modules, "hf_ptq.evaluation.plot", raising=False)
    result = hf_ptq.compare(
        [hf_ptq.PtqConfig(group_size=32)], tiny_llama_with_tokenizer_dir, out_dir=tmp_path / "r", data=TEXT, **FAST
    )
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.md", "results.json"]
    assert result.plot_path is None and "comparison.png" not in result.markdown
    assert 'pip install -e ".[plot]"' in caplog.text
