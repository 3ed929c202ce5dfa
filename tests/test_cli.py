"""`hf-ptq` (and `optimum-cli ptq`) on a tiny model: outputs, checklist, errors before work, no partial output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_hub import hub  # noqa: F401  (the Hub replaced by a recorder)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import hf_ptq
from hf_ptq.cli import build_parser, main
from hf_ptq.formats.save import saved_hf_ptq_config

TEXT = "The orchard was quiet in the early light; pickers moved between the rows with baskets on their backs. " * 8
FAST = ["--max-length", "64", "--new-tokens", "4", "--speed-repeats", "1"]


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def quantized_dir(tiny_llama_with_tokenizer_dir, tmp_path) -> Path:
    out = tmp_path / "q"
    assert (
        main(["quantize", str(tiny_llama_with_tokenizer_dir), "--group-size", "32", "--out", str(out), "--no-eval"])
        == 0
    )
    return out


def test_quantize_writes_a_reloadable_folder_and_prints_the_checklist(
    tiny_llama_with_tokenizer_dir, tmp_path, text_file, capsys
):
    tiny, out = tiny_llama_with_tokenizer_dir, tmp_path / "q"
    args = ["quantize", str(tiny), "--bits", "4", "--group-size", "32", "--out", str(out), "--data", str(text_file)]
    assert main(args + FAST) == 0
    printed = capsys.readouterr().out
    for text in ("| perplexity |", "| KL(reference ‖ model)", "| decode tokens/s |", "| check | measured |"):
        assert text in printed
    assert "| perplexity increase | +" in printed or "| perplexity increase | -" in printed
    saved = saved_hf_ptq_config(json.loads((out / "config.json").read_text())["quantization_config"])
    assert (saved["method"], saved["bits"], saved["group_size"]) == ("rtn", 4, 32)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[1].mlp.up_proj, hf_ptq.QuantLinear)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.txt", "q"]  # the staging folder is gone


def test_gptq_flags_reach_the_config(tiny_llama_with_tokenizer_dir, tmp_path, text_file):
    out = tmp_path / "g"
    args = ["quantize", str(tiny_llama_with_tokenizer_dir), "--method", "gptq", "--group-size", "32", "--out", str(out)]
    args += ["--dataset", str(text_file), "--num-samples", "2", "--seq-len", "32", "--set", "desc_act=false"]
    assert main(args + ["--set", "damp_percent=0.05", "--no-eval"]) == 0
    saved = saved_hf_ptq_config(json.loads((out / "config.json").read_text())["quantization_config"])
    assert (saved["method"], saved["desc_act"], saved["damp_percent"], saved["num_samples"]) == ("gptq", False, 0.05, 2)
    assert saved["dataset_description"]["source"] == "file"


def test_bad_input_fails_before_work_and_writes_nothing(tiny_llama_with_tokenizer_dir, tmp_path, capsys):
    tiny, out = str(tiny_llama_with_tokenizer_dir), str(tmp_path / "q")
    assert main(["quantize", tiny, "--bits", "7", "--out", out]) == 2
    assert "bits must be one of 2, 3, 4, 5, 6, 8" in capsys.readouterr().err
    assert main(["quantize", tiny, "--group-size", "48", "--out", out, "--no-eval"]) == 2
    assert "group_size=48" in capsys.readouterr().err
    assert main(["quantize", tiny, "--set", "colour=blue", "--out", out]) == 2
    assert "unknown field(s) ['colour']" in capsys.readouterr().err
    assert main(["quantize", tiny, "--data", "missing.txt", "--out", out]) == 2
    assert "--data missing.txt: no such file" in capsys.readouterr().err
    assert main(["compare", tiny, "--methods", "rtn,fancy", "--out", out]) == 2
    assert "unknown method 'fancy': choose from" in capsys.readouterr().err
    assert main(["eval", tiny, "--max-length", "0"]) == 2
    assert "max_length must be a positive integer" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_without_flag(tiny_llama_with_tokenizer_dir, tmp_path, capsys):
    tiny, out = tiny_llama_with_tokenizer_dir, tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", str(tiny), "--group-size", "32", "--out", str(out), "--no-eval"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_while_saving_leaves_no_partial_folder(tiny_llama_with_tokenizer_dir, tmp_path, monkeypatch, existing):
    out = tmp_path / "q"
    if existing:
        out.mkdir()
        (out / "README.md").write_text("mine")  # a model folder's file: --overwrite may replace the folder

    def interrupted(self, folder, *args, **kwargs):
        (Path(folder) / "tokenizer.json").write_text("{")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
    args = ["quantize", str(tiny_llama_with_tokenizer_dir), "--group-size", "32", "--out", str(out), "--no-eval"]
    assert main(args + ["--overwrite"] * existing) == 130
    assert [p.name for p in tmp_path.iterdir()] == (["q"] if existing else [])
    if existing:
        assert [p.name for p in out.iterdir()] == ["README.md"]


def test_eval_json_and_strict(tiny_llama_with_tokenizer_dir, quantized_dir, text_file, tmp_path, capsys):
    args = ["eval", str(quantized_dir), "--reference", str(tiny_llama_with_tokenizer_dir), "--data", str(text_file)]
    args += ["--max-length", "64", "--no-speed", "--json", str(tmp_path / "r.json"), "--strict"]
    assert main(args) == 1  # tiny model: the embeddings dominate, memory ratio ~0.98 > 1/3
    assert "| memory vs reference | 0.98" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["model"]["checkpoint_bytes"] == sum(f.stat().st_size for f in quantized_dir.glob("*.safetensors"))
    n_tokens = AutoTokenizer.from_pretrained(quantized_dir)(TEXT, return_tensors="pt").input_ids.numel()
    assert 0 < saved["kl_divergence"] and saved["windows"] == -(-n_tokens // 64) > 1
    assert main(args + ["--max-memory-ratio", "1.0"]) == 0  # thresholds are flags


@pytest.mark.extra("plot")  # comparison.png
def test_compare_command(tiny_llama_with_tokenizer_dir, text_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_llama_with_tokenizer_dir), "--methods", "rtn,int8", "--group-size", "32"]
    args += ["--data", str(text_file), "--max-length", "64", "--no-speed", "--out", str(out)]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "| rtn w4 g32 asym |" in report and "| int8 w8 per-channel sym |" in report  # int8 ignores group size
    assert (out / "comparison.png").exists() and f"Wrote {out / 'report.md'}" in capsys.readouterr().out


def test_push_uploads_the_folder_with_metrics(quantized_dir, tmp_path, hub):  # noqa: F811
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"wikitext-2 perplexity": 21.5}))
    assert main(["push", str(quantized_dir), "me/tiny-q", "--metrics", str(metrics), "--private"]) == 0
    assert hub.repos == [{"repo_id": "me/tiny-q", "private": True, "exist_ok": True}]
    files = hub.files()
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
    assert b"wikitext-2 perplexity" in files["README.md"] and b"21.5" in files["README.md"]
    assert files["model.safetensors"] == (quantized_dir / "model.safetensors").read_bytes()


def test_target_bits_prints_each_layers_scheme_and_layer_schemes_pin(
    tiny_llama_with_tokenizer_dir, tmp_path, text_file, capsys
):
    out = tmp_path / "m"
    args = ["quantize", str(tiny_llama_with_tokenizer_dir), "--method", "rtn", "--group-size", "32", "--out", str(out)]
    args += ["--dataset", str(text_file), "--num-samples", "2", "--seq-len", "32", "--target-bits", "4.5"]
    assert main(args + ["--layer-schemes", '{"mlp.down_proj": {"bits": 8}}', "--no-eval"]) == 0
    printed = capsys.readouterr().out
    assert "mixed precision: 14 layers" in printed and "model.layers.1.mlp.down_proj" in printed
    assert "w8 g32 asym (pinned)" in printed and "error" in printed
    saved = saved_hf_ptq_config(json.loads((out / "config.json").read_text())["quantization_config"])
    assert saved["target_bits"] == 4.5 and saved["layer_schemes"] == {"mlp.down_proj": {"bits": 8}}
    assert saved["chosen_schemes"]


def test_quantize_push_to_hub_uploads_with_measured_metrics(tiny_llama_with_tokenizer_dir, tmp_path, text_file, hub):  # noqa: F811
    args = ["quantize", str(tiny_llama_with_tokenizer_dir), "--group-size", "32", "--out", str(tmp_path / "q")]
    args += ["--data", str(text_file), "--no-speed", "--max-length", "64", "--push-to-hub", "me/tiny-rtn"]
    assert main(args) == 0
    card = hub.files()["README.md"].decode()
    assert "rtn w4 g32 asym" in card and "| top-1 agreement with the unquantized model |" in card
    assert hub.files()["model.safetensors"] == (tmp_path / "q" / "model.safetensors").read_bytes()


def test_push_rejects_a_float_folder(tiny_llama_with_tokenizer_dir, capsys, hub):  # noqa: F811
    assert main(["push", str(tiny_llama_with_tokenizer_dir), "me/x"]) == 2
    assert "holds no quantized model" in capsys.readouterr().err and hub.commits == []


def optimum_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "optimum-cli"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=timeout)


def test_optimum_cli_ptq_is_registered(tiny_llama_with_tokenizer_dir, tmp_path):
    top = optimum_cli("--help")
    assert top.returncode == 0 and "ptq" in top.stdout
    help_ = optimum_cli("ptq", "--help")
    assert help_.returncode == 0 and help_.stdout.startswith("usage: optimum-cli ptq")
    for command in ("quantize", "eval", "compare", "push"):
        assert command in help_.stdout
    sub = optimum_cli("ptq", "quantize", "--help")
    assert sub.returncode == 0 and "--group-size" in sub.stdout
    out = tmp_path / "q"
    run = optimum_cli(
        "ptq", "quantize", str(tiny_llama_with_tokenizer_dir), "--group-size", "32", "--out", str(out), "--no-eval"
    )
    assert run.returncode == 0, run.stderr
    assert saved_hf_ptq_config(json.loads((out / "config.json").read_text())["quantization_config"])["group_size"] == 32


def test_every_command_has_its_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"quantize", "eval", "compare", "push"} <= set(commands)
    assert all(p.description for p in commands.values())


@pytest.mark.slow
def test_default_quantize_is_offline_and_prints_the_checklist(tmp_path, capsys):
    """README command one: `hf-ptq quantize` with no model (embedded SmolLM2, its measured default: data-free GPTQ
    on 32 x 256 sampled tokens, int8 embeddings), the evaluation shortened here."""
    out = tmp_path / "smollm2"
    assert main(["quantize", "--out", str(out), "--max-windows", "2", "--new-tokens", "8", "--speed-repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "gptq w4 g64 asym act-order embeddings=int8" in printed
    assert "text written by the reference model itself" in printed
    for check in ("perplexity increase", "downstream accuracy drop", "decode speed-up", "memory vs reference"):
        assert f"| {check} |" in printed
    ratio = float(printed.split("| compression ratio | ")[1].split("x")[0])
    assert 2.8 < ratio < 3.5  # 4-bit Linears, int8 embedding (tied)
    assert "| memory vs reference | 0.3" in printed and f"Saved to {out}" in printed
