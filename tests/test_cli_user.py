"""The CLI as a user meets it: help without torch, `--method auto` / `smoothquant`, one-line errors for models that
cannot be found (no network retries), default outputs in hf_ptq's cache with the usual permissions, and the
embedded model's default."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import hf_ptq
from hf_ptq.cli import build_parser, choices, main, models
from hf_ptq.cli.common import config_from_args
from hf_ptq.cli.quantize import EMBEDDED_DEFAULTS, _with_embedded_defaults, embedded_flags
from hf_ptq.formats.save import saved_hf_ptq_config

HF_PTQ = Path(sys.executable).parent / "hf-ptq"
HEAVY = ("torch", "transformers")


def imported_modules(*command: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `command` under `python -X importtime`: the result and the top-level names of every imported module."""
    run = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True, timeout=120)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in run.stderr.splitlines() if "|" in line}
    return run, names


@pytest.mark.parametrize(
    "command",
    [
        (str(HF_PTQ), "--help"),
        (str(HF_PTQ), "quantize", "--help"),
        (str(HF_PTQ), "export", "--help"),
        ("-m", "hf_ptq.cli", "eval", "--help"),
    ],
    ids=["hf-ptq", "quantize", "export", "python-m"],
)
def test_help_imports_neither_torch_nor_transformers(command):
    run, names = imported_modules(*command)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage: hf-ptq") and "hf_ptq" in names
    assert not names & set(HEAVY), f"--help imported {sorted(names & set(HEAVY))}"


def test_usage_errors_are_answered_without_torch():
    run, names = imported_modules(str(HF_PTQ), "quantize", "--method", "fancy")
    assert run.returncode == 2 and "invalid choice: 'fancy'" in run.stderr
    assert not names & set(HEAVY)


def test_importing_hf_ptq_as_a_library_still_registers():
    code = (
        "import sys, hf_ptq; from transformers.quantizers import auto; print('hf_ptq' in auto.AUTO_QUANTIZER_MAPPING)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr[-2000:]


def test_parser_choices_match_the_code():
    from hf_ptq.auto_method import DEPLOY_TARGETS, PREFERENCES
    from hf_ptq.core.embeddings import EMBEDDING_FORMATS
    from hf_ptq.evaluation import Thresholds
    from hf_ptq.formats.gguf_types import EMBEDDING_TYPES, GGUF_TYPES
    from hf_ptq.methods.options import ACTIVATIONS, WEIGHT_METHODS

    assert choices.METHODS == tuple(hf_ptq.method_names())
    assert choices.EXPORT_FORMATS == tuple(hf_ptq.format_names())
    assert (choices.GGUF_TYPES, choices.GGUF_EMBEDDINGS) == (tuple(GGUF_TYPES), tuple(EMBEDDING_TYPES))
    assert choices.EMBEDDING_FORMATS == tuple(EMBEDDING_FORMATS)
    assert (choices.PREFERENCES, choices.DEPLOY_TARGETS) == (PREFERENCES, DEPLOY_TARGETS)  # read, not mirrored
    assert (choices.ACTIVATIONS, choices.WEIGHT_METHODS) == (ACTIVATIONS, WEIGHT_METHODS)
    assert Thresholds(**choices.THRESHOLDS) == Thresholds()


def config(*argv: str, embedded: bool = False):
    args = build_parser().parse_args(["quantize", *argv])
    if embedded:
        args = _with_embedded_defaults(args)
    return config_from_args(args.method or "rtn", args, embedded)


def test_method_auto_takes_its_inputs():
    cpu = config("--method", "auto", "--deploy", "cpu")
    assert (cpu.method, cpu.auto_choice["inputs"]["deploy"]) == ("int8", "cpu")
    latency = config("--method", "auto", "--prefer", "latency", "--dataset", "wikitext2", embedded=True)
    assert (latency.method, latency.group_size) == ("awq", 64)  # the embedded model's group size, after the choice
    assert config("--method", "auto", "--finetune").method == "nf4"


def test_method_smoothquant_builds_a_w8a8_config():
    cfg = config("--method", "smoothquant", "--alpha", "0.8", "--activations", "static", "--weight-method", "gptq")
    assert isinstance(cfg, hf_ptq.SmoothQuantConfig)
    assert (cfg.alpha, cfg.activations, cfg.weight_method) == (0.8, "static", "gptq")
    assert config("--method", "smoothquant", "--alpha", "auto", "--set", "true_sequential=true").alpha == "auto"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "rtn", "--alpha", "0.5"], "--alpha apply only to --method smoothquant"),
        (["--method", "gptq", "--prefer", "latency"], "--prefer apply only to --method auto"),
        (["--method", "smoothquant", "--deploy", "cpu"], "--deploy apply only to --method auto"),
        (["--method", "smoothquant", "--bits", "4"], "--bits do not apply to --method smoothquant"),
        (["--method", "smoothquant", "--alpha", "2"], "alpha"),
    ],
)
def test_method_flags_of_another_method_are_refused(tmp_path, capsys, argv, message):
    assert main(["quantize", str(tmp_path), *argv, "--out", str(tmp_path / "q")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_smoothquant_from_the_command_line(tiny_llama_with_tokenizer_dir, tmp_path):
    out = tmp_path / "w8a8"
    argv = ["quantize", str(tiny_llama_with_tokenizer_dir), "--method", "smoothquant", "--alpha", "0.7"]
    assert main(argv + ["--num-samples", "2", "--seq-len", "16", "--out", str(out), "--no-eval"]) == 0
    saved = saved_hf_ptq_config(json.loads((out / "config.json").read_text())["quantization_config"])
    assert (saved["quant_method"], saved["alpha"]) == ("hf_ptq_smoothquant", 0.7)


@pytest.mark.parametrize("command", ["quantize", "eval", "compare", "export", "push", "verify"])
def test_a_mistyped_folder_fails_in_one_line(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "_cached_snapshot", lambda repo: pytest.fail("looked in the Hub cache"))
    typo = str(tmp_path / "no-such-folder")
    argv = {"export": ["--format", "gguf"], "push": ["me/repo"]}.get(command, [])
    out = ["--out", str(tmp_path / "o")] if command in ("quantize", "compare") else []
    assert main([command, typo, *argv, *out]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {typo}: no such folder\n"


@pytest.mark.parametrize("typo", ["./model", "~/no-such-hf-ptq-model", "a/b/c"])
def test_path_like_arguments_are_not_hub_ids(typo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", typo]) == 2
    assert capsys.readouterr().err == f"error: {typo}: no such folder\n"


def test_a_typo_inside_an_existing_folder_is_a_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["eval", "runs/q4"]) == 2
    assert capsys.readouterr().err == "error: runs/q4: no such folder\n"


def test_an_uncached_hub_id_offline_fails_at_once(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda *a, **k: pytest.fail("asked the Hub"))
    assert main(["eval", "nobody/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: nobody/no-such-model: no such folder, and not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in err and err.count("\n") == 1
    assert main(["eval", str(tmp_path), "--reference", "nobody/ref"]) == 2  # an empty folder, a missing reference
    assert capsys.readouterr().err.startswith("error: --reference nobody/ref: no such folder, and not in the")


def test_an_unreachable_hub(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def unreachable(self, repo_id, timeout=None, **kwargs):
        calls.append(timeout)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", unreachable)
    monkeypatch.setattr(models, "_cached_snapshot", lambda repo: None)
    assert main(["quantize", "org/model", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert (
        err == "error: org/model: no such folder, and the Hub is unreachable ([Errno -2] Name or service not known)\n"
    )
    assert calls == [models.HUB_TIMEOUT]  # one look-up, no retries
    monkeypatch.setattr(models, "_cached_snapshot", lambda repo: str(tmp_path))
    assert models.resolve_model("org/model") == str(tmp_path)  # cached: loaded from the cache
    assert "using the cached org/model" in capsys.readouterr().err


def test_default_output_goes_to_the_cache_with_the_usual_permissions(
    tiny_llama_with_tokenizer_dir, tmp_path, monkeypatch, capsys
):
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_PTQ_CACHE", str(cache))
    argv = ["quantize", str(tiny_llama_with_tokenizer_dir), "--group-size", "32", "--no-eval"]
    previous = os.umask(0o027)
    try:
        assert main(argv) == 0
        out = cache / "quantized" / f"{tiny_llama_with_tokenizer_dir.name}-rtn-w4-g32-asym"
        assert stat.S_IMODE(out.stat().st_mode) == 0o750  # 0o777 & ~umask, not mkdtemp's 0o700
        os.umask(0o022)
        assert main(argv + ["--bits", "8"]) == 0
        out8 = out.with_name(out.name.replace("w4", "w8"))
        assert stat.S_IMODE(out8.stat().st_mode) == 0o755
    finally:
        os.umask(previous)
    assert main(argv) == 0  # the cache's folder is replaced by the next run, no --overwrite needed
    printed = capsys.readouterr().out
    assert f"Saved to {out}\n" in printed and f"Saved to {out8}\n" in printed
    assert saved_hf_ptq_config(json.loads((out / "config.json").read_text())["quantization_config"])["bits"] == 4
    assert list(work.iterdir()) == []  # nothing in the current folder


def test_the_embedded_default_is_the_measured_one():
    cfg = config(embedded=True)
    assert {k: getattr(cfg, k) for k in EMBEDDED_DEFAULTS} == EMBEDDED_DEFAULTS
    assert cfg.group_size == 64
    assert config("--seq-len", "128", embedded=True).seq_len == 128  # a flag replaces its field's default
    rtn = config("--method", "rtn", embedded=True)  # --method replaces them all
    assert (rtn.method, rtn.embeddings, rtn.group_size) == ("rtn", None, 64)
    assert config("--embeddings", "none", embedded=True).embeddings is None
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["quantize"].format_help().split())
    assert embedded_flags() in help_text  # the defaults are documented in --help


def test_method_options_have_flags_of_their_own():
    """`--no-desc-act --damp-percent 0.05` reach GPTQOptions; the help is the declaration's; a flag the method does
    not read is refused naming the methods that do, and `compare` drops it for the methods that do not."""
    from hf_ptq.methods.options import GPTQOptions

    cfg = config("--method", "gptq", "--no-desc-act", "--damp-percent", "0.05", "--block-size", "64")
    assert cfg.options == GPTQOptions(desc_act=False, damp_percent=0.05, block_size=64)
    assert config("--method", "awq", "--grid", "10", "--no-duo-scaling").options.grid == 10
    assert config("--method", "rtn", "--sym", "--full-range").scheme.full_range is True
    assert config("--method", "smoothquant", "--weight-method", "gptq", "--clip").options.gptq.clip is True
    with pytest.raises(ValueError, match=r"PtqConfig\.duo_scaling=False does not apply to method='gptq'.*'awq'"):
        config("--method", "gptq", "--no-duo-scaling")
    args = build_parser().parse_args(["compare", "--methods", "rtn,gptq", "--no-desc-act"])
    assert config_from_args("rtn", args, embedded=False, lenient=True).desc_act is None
    assert config_from_args("gptq", args, embedded=False, lenient=True).desc_act is False
    run, names = imported_modules(str(HF_PTQ), "quantize", "--help")  # made from the declarations, without torch
    help_text = " ".join(run.stdout.split())
    assert "--desc-act, --no-desc-act" in help_text and not names & set(HEAVY)
    assert GPTQOptions.__dataclass_fields__["damp_percent"].metadata["help"] in help_text


def test_every_keyword_option_of_ptqconfig_has_a_flag():
    """The flags are made from a list of options classes: a method option missing from it would have no flag."""
    from hf_ptq.cli.common import method_option_fields
    from hf_ptq.config import option_owners

    auto_inputs = {n for n, users in option_owners().items() if users == ["auto"]}  # --prefer, --deploy, --finetune
    assert set(method_option_fields()) == set(option_owners()) - auto_inputs
