"""Every accepted value finishes, and bad input fails early: bounded fields, token ids and positions checked before
any weight is read, non-finite weights refused with the layer's name, modules_to_not_convert validated, calibration
files, numpy scalars, one-line CLI errors, and the saved format version / quant_method checked on reload."""

from __future__ import annotations

import errno
import importlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, VOCAB, input_ids
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto
from transformers.quantizers.quantizers_utils import should_convert_module

import hf_ptq
import hf_ptq.registration
from hf_ptq import PtqConfig, SmoothQuantConfig
from hf_ptq.calibration import describe
from hf_ptq.calibration.data import calibration_batches
from hf_ptq.calibration.limits import DATA_FREE_MAX_TOKENS, MAX_CALIBRATION_TOKENS
from hf_ptq.calibration.self_generated import sample_from_model
from hf_ptq.cli import main
from hf_ptq.config_base import FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS
from hf_ptq.core.finite import NonFiniteError, NonFiniteWeights, require_finite_weight
from hf_ptq.formats.save import saved_hf_ptq_config
from hf_ptq.methods import method_spec
from hf_ptq.methods.gptq import DAMP_FLOOR, MAX_DAMP, damping_schedule, inverse_hessian_factor
from hf_ptq.methods.options import MAX_AWQ_GRID
from hf_ptq.nn import QuantLinear
from hf_ptq.pipeline.sequential import quantize_group

TEXT = "A ferry crossed the bay twice a day, carrying bread, post and the doctor to the island. " * 40


@pytest.fixture
def no_weight_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading any checkpoint weight fails the test: the error under test must come before."""
    import transformers.modeling_utils as modeling_utils

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the input was checked")

    monkeypatch.setattr(modeling_utils, "convert_and_load_state_dict_in_model", no_loading)


def save_family(name: str, folder: Path) -> Path:
    FAMILIES[name].build().save_pretrained(folder)
    return folder


def gptq(**kwargs) -> PtqConfig:
    return PtqConfig(**{"method": "gptq", "bits": 4, "group_size": 32, "num_samples": 2, "seq_len": 8, **kwargs})


# --- 1. bounds -------------------------------------------------------------------------------------------------
def test_awq_grid_is_bounded() -> None:
    with pytest.raises(ValueError, match=rf"PtqConfig\.grid=1000000 is invalid.*from 1 to {MAX_AWQ_GRID}"):
        PtqConfig(method="awq", grid=10**6)
    assert PtqConfig(method="awq", grid=MAX_AWQ_GRID).grid == MAX_AWQ_GRID


@pytest.mark.parametrize("cls", [PtqConfig, SmoothQuantConfig])
def test_calibration_token_budget_is_bounded(cls) -> None:
    method = {"method": "gptq"} if cls is PtqConfig else {}
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.num_samples=4096 with seq_len=512.*lower num_samples"):
        cls(**method, dataset=[TEXT], num_samples=4096, seq_len=512)
    assert cls(**method, dataset=[TEXT], num_samples=MAX_CALIBRATION_TOKENS // 512, seq_len=512).num_samples == 2048


@pytest.mark.parametrize("cls", [PtqConfig, SmoothQuantConfig])
def test_data_free_seq_len_is_bounded_at_construction(cls) -> None:
    method = {"method": "gptq"} if cls is PtqConfig else {}
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.seq_len=1000000 is invalid with dataset=None.*16384"):
        cls(**method, num_samples=1, seq_len=10**6)
    cls(**method, dataset=[TEXT], num_samples=1, seq_len=10**6)  # with data the budget alone applies
    cls(**method, num_samples=1, seq_len=DATA_FREE_MAX_TOKENS)
    PtqConfig(method="rtn", num_samples=1, seq_len=10**6)  # no calibration: nothing is sampled


def test_data_free_sampling_refuses_one_sample_beyond_the_cap() -> None:
    model = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match="seq_len=10000000: data-free calibration samples at most 16384"):
        sample_from_model(model, num_samples=1, seq_len=10**7)


def test_saved_config_with_long_text_samples_reloads() -> None:
    """A saved config has dataset=None and a description: the data-free bound must not refuse it."""
    cfg = gptq(dataset=[TEXT], num_samples=1, seq_len=DATA_FREE_MAX_TOKENS * 2)
    assert PtqConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("family", "kwargs", "match"),
    [
        ("gpt2", {"seq_len": 65}, r"PtqConfig\.seq_len=65 is longer than the model's n_positions=64"),
        ("opt", {"seq_len": 80}, r"PtqConfig\.seq_len=80 is longer than the model's max_position_embeddings=64"),
        ("gpt2", {"dataset": torch.ones(2, 70, dtype=torch.long)}, r"PtqConfig\.dataset: .*70 tokens.*n_positions=64"),
    ],
)
def test_samples_beyond_the_model_positions_fail_before_weights(
    family: str, kwargs: dict, match: str, tmp_path: Path, no_weight_loading
) -> None:
    folder = save_family(family, tmp_path / family)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=gptq(**kwargs))


def test_in_memory_quantize_checks_positions_and_leaves_the_model_alone() -> None:
    model = FAMILIES["gpt2"].build()
    with pytest.raises(ValueError, match="seq_len=100 is longer than the model's n_positions=64"):
        hf_ptq.quantize(model, gptq(seq_len=100))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


# --- 2. token ids ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dataset", "match"),
    [
        (torch.full((2, 8), VOCAB, dtype=torch.long), rf"dataset: .*token id {VOCAB}, outside .*\[0, {VOCAB}\)"),
        ([[5, 6, -3, 7]], r"dataset: .*negative token id -3"),
    ],
)
def test_bad_token_ids_fail_before_weights(dataset, match: str, tiny_llama_dir: Path, no_weight_loading) -> None:
    with pytest.raises(ValueError, match=match) as info:
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=gptq(dataset=dataset))
    assert "model's own tokenizer" in str(info.value)


def test_bad_token_ids_in_memory_quantize() -> None:
    model = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match=rf"token id {VOCAB + 5}"):
        hf_ptq.quantize(model, gptq(dataset=torch.full((1, 8), VOCAB + 5, dtype=torch.long)))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_tokenizer_larger_than_the_model_fails_before_weights(
    tiny_llama_dir: Path, tiny_llama_with_tokenizer_dir: Path, no_weight_loading
) -> None:
    """SmolLM2's tokenizer (49152 tokens) against a model with a 128-row embedding."""
    cfg = gptq(dataset=[TEXT], tokenizer=str(tiny_llama_with_tokenizer_dir))
    with pytest.raises(ValueError, match=rf"PtqConfig\.tokenizer has \d+ tokens but the model's embedding has {VOCAB}"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)


def test_tokenizer_ids_beyond_the_vocabulary_name_the_tokenizer() -> None:
    def tokenizer(text: str, **kwargs) -> dict:  # a plain callable: no len(), so its ids are checked
        return {"input_ids": [VOCAB + 1] * len(text.split())}

    model = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match=rf"PtqConfig\.tokenizer: .*token id {VOCAB + 1}.*own tokenizer"):
        hf_ptq.quantize(model, gptq(dataset=[TEXT]), tokenizer=tokenizer)


# --- 3. non-finite weights -------------------------------------------------------------------------------------
def test_require_finite_weight_names_the_layer_and_counts() -> None:
    w = torch.ones(4, 8, dtype=torch.bfloat16)
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("nan"), float("-inf")
    with pytest.raises(NonFiniteError, match=r"weight of model\.layers\.3\.mlp\.up_proj holds 2 NaN and 1 inf") as e:
        require_finite_weight(w, "model.layers.3.mlp.up_proj")
    assert "modules_to_not_convert=['model.layers.3.mlp.up_proj']" in str(e.value)
    require_finite_weight(torch.ones(2, 2), "fine")  # finite: nothing raised


@pytest.mark.parametrize(
    "cfg",
    [
        gptq(dataset=input_ids(2, 8)),
        PtqConfig(method="awq", group_size=32, dataset=input_ids(2, 8), num_samples=2),
        SmoothQuantConfig(dataset=input_ids(2, 8), num_samples=2),
    ],
    ids=["gptq", "awq", "smoothquant"],
)
def test_calibrated_methods_refuse_a_non_finite_weight(cfg) -> None:
    model = FAMILIES["llama"].build()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, :5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.down_proj holds 0 NaN and 5 inf value\(s\)"):
        hf_ptq.quantize(model, cfg)


def test_non_finite_norm_is_named_by_the_block_check() -> None:
    model = FAMILIES["llama"].build()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"after block model\.layers\.0 .*post_attention_layernorm\.weight"):
        hf_ptq.quantize(model, SmoothQuantConfig(dataset=input_ids(2, 8), num_samples=2))


def test_non_finite_embedding_is_found_before_the_first_block() -> None:
    model = FAMILIES["llama"].build()
    ids = input_ids(2, 8)
    with torch.no_grad():
        model.model.embed_tokens.weight[ids[0, 0]] = float("nan")
    with pytest.raises(NonFiniteError, match=r"layers before model\.layers\.0 .*model\.embed_tokens\.weight"):
        hf_ptq.quantize(model, gptq(dataset=ids))


def test_gptq_singular_hessian_names_the_layer() -> None:
    scope = torch.nn.Module()
    scope.proj = torch.nn.Linear(32, 16, bias=False)

    class NotAHessian:
        hessian = -torch.eye(32)  # negative definite: no damping helps

    with pytest.raises(
        ValueError, match=r"model\.layers\.3\.proj: gptq: the Hessian stays singular.*0\.01, 0\.1, 1, 10"
    ):
        quantize_group(
            scope, ["proj"], NotAHessian(), method_spec("gptq"), gptq(), torch.float32, prefix="model.layers.3."
        )


def test_gptq_damping_retries_start_from_the_floor(caplog: pytest.LogCaptureFixture) -> None:
    assert damping_schedule(0.01) == pytest.approx([0.01, 0.1, 1.0, 10.0])
    assert damping_schedule(1e-6) == pytest.approx([1e-6, DAMP_FLOOR, 0.1, 1.0, MAX_DAMP])
    assert damping_schedule(1.0) == pytest.approx([1.0, 10.0])
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.005]))  # needs damp · mean(diag) > 0.005: damp > 0.0067
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        _, damp = inverse_hessian_factor(h, 1e-9)
    assert damp == DAMP_FLOOR  # not 1e-8, 1e-7, ... (the old ladder ran out before reaching 0.01)
    assert "damp_percent=1e-09; used 0.01" in caplog.text
    with pytest.raises(ValueError, match="holds 4 NaN and 0 inf value"):
        inverse_hessian_factor(torch.full((2, 2), float("nan")), 0.01)


# --- 4. modules_to_not_convert ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["mlp.(", "a)|(b", "[", "*proj", "lm_head", r"model\.layers\.\d+\.mlp", "a{2"])
def test_module_patterns_are_validated_as_transformers_matches_them(pattern: str) -> None:
    try:
        should_convert_module("model.layers.0.mlp.down_proj", [pattern])
        transformers_accepts = True
    except Exception:  # noqa: BLE001  (re.error, whatever transformers' regex raises)
        transformers_accepts = False
    if transformers_accepts:
        assert PtqConfig(modules_to_not_convert=[pattern]).modules_to_not_convert == [pattern]
    else:
        with pytest.raises(ValueError, match=r"PtqConfig\.modules_to_not_convert=.* is not a valid regex"):
            PtqConfig(modules_to_not_convert=[pattern])
        with pytest.raises(ValueError, match=r"SmoothQuantConfig\.modules_to_not_convert=.* is not a valid regex"):
            SmoothQuantConfig(modules_to_not_convert=[pattern])


def test_empty_module_name_is_refused() -> None:
    with pytest.raises(ValueError, match=r"modules_to_not_convert=\[''\].*empty one matches every module"):
        PtqConfig(modules_to_not_convert=[""])


def test_unmatched_module_names_warn_once_before_weights(
    tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture, no_weight_loading
) -> None:
    cfg = gptq(dataset=input_ids(2, 8), modules_to_not_convert=["lm_head", "mlp.dwn_proj", "layers.9", "up_proj"])
    with caplog.at_level(logging.WARNING, logger="hf_ptq"), pytest.raises(AssertionError, match="weights were read"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    warnings = [r.getMessage() for r in caplog.records if "match no module" in r.getMessage()]
    assert len(warnings) == 1
    assert "['mlp.dwn_proj', 'layers.9']" in warnings[0]


# --- 5. calibration files, numpy scalars, unused data -------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "detail"),
    [(b"weights\x00\x01\x02" * 10, "a NUL byte at offset 7: binary data"), ("café".encode("latin-1"), "invalid UTF-8")],
    ids=["binary", "latin-1"],
)
def test_binary_or_non_utf8_file_fails_at_construction(content: bytes, detail: str, tmp_path: Path) -> None:
    path = tmp_path / "calib.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"PtqConfig\.dataset='.*calib\.bin' is not a UTF-8 text file \({detail}"):
        gptq(dataset=str(path))


def test_non_utf8_past_the_checked_head_fails_while_tokenizing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(describe, "TEXT_CHECK_BYTES", 64)
    path = tmp_path / "calib.txt"
    path.write_bytes(TEXT.encode() + b"\xff\xfe" + TEXT.encode())
    cfg = gptq(dataset=str(path), num_samples=1, seq_len=4096)  # the first 64 bytes are text: accepted

    def tokenizer(text: str, **kwargs) -> dict:
        return {"input_ids": [1] * len(text.split())}

    with pytest.raises(ValueError, match=r"calib\.txt' is not a UTF-8 text file \(invalid UTF-8"):
        calibration_batches(cfg, tokenizer=tokenizer)


NUMPY_FIELDS = [
    (PtqConfig, {"bits": np.int64(3), "group_size": np.int32(32), "num_samples": np.int16(4), "seq_len": np.uint16(8)}),
    (PtqConfig, {"batch_size": np.int64(2), "sym": np.bool_(True)}),
    (PtqConfig, {"method": "gptq", "damp_percent": np.float64(0.05), "block_size": np.int64(64)}),
    (PtqConfig, {"method": "awq", "grid": np.int8(10)}),
    (PtqConfig, {"method": "llm_int8", "outlier_threshold": np.float32(4.5)}),
    (SmoothQuantConfig, {"alpha": np.float32(0.75), "num_samples": np.int64(4), "seq_len": np.int64(16)}),
    (SmoothQuantConfig, {"weight_method": "gptq", "damp_percent": np.float64(0.1), "block_size": np.int32(32)}),
]


@pytest.mark.parametrize(("cls", "kwargs"), NUMPY_FIELDS)
def test_numpy_scalars_are_accepted_as_python_numbers(cls, kwargs: dict) -> None:
    cfg = cls(**kwargs)
    plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in kwargs.items()}
    for field, value in plain.items():
        assert type(getattr(cfg, field)) is type(value) and getattr(cfg, field) == value, field
    data = json.loads(json.dumps(cfg.to_dict()))  # JSON-safe
    assert cls(**data) == cfg == cls(**plain)


def test_numpy_scalars_still_get_the_value_checks() -> None:
    with pytest.raises(ValueError, match=r"PtqConfig\.bits=7 is invalid"):
        PtqConfig(bits=np.int64(7))
    with pytest.raises(ValueError, match=r"SmoothQuantConfig\.alpha=1.5 is invalid"):
        SmoothQuantConfig(alpha=np.float64(1.5))


@pytest.mark.parametrize("method", ["rtn", "int8", "hqq", "nf4"])
def test_dataset_for_a_calibration_free_method_warns_once(method: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        PtqConfig(method=method, dataset=[TEXT])
    assert [r.getMessage() for r in caplog.records if "dataset is unused" in r.getMessage()] == [
        f"hf_ptq: PtqConfig.dataset is unused: method={method!r} needs no calibration data. Drop dataset, or choose "
        "a calibrated method ('gptq', 'awq')."
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        gptq(dataset=[TEXT])
    assert "dataset is unused" not in caplog.text


# --- 6. the CLI ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/c.txt"),
            "/data/c.txt: No such file or directory",
        ),
        (PermissionError(errno.EACCES, "Permission denied", "/root/out"), "/root/out: Permission denied"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp/x"), "/tmp/x: Is a directory"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/file/b"), "/a/file/b: Not a directory"),
        (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "/a -> /b: Invalid cross-device link"),
        (FileExistsError("--out='q' holds files: pass --overwrite"), "--out='q' holds files: pass --overwrite"),
        (ImportError("needs the `hqq` package"), "needs the `hqq` package"),
        (NonFiniteError("the weight of x holds 1 NaN"), "the weight of x holds 1 NaN"),
        (ValueError("first line\n  second line"), "first line second line"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else "",
)
def test_cli_user_errors_print_one_line_and_exit_2(error: BaseException, line: str, monkeypatch, capsys) -> None:
    def failing(args) -> int:
        raise error

    monkeypatch.setattr("hf_ptq.cli.quantize.run", failing)
    assert main(["quantize"]) == 2
    assert capsys.readouterr().err == f"error: {line}\n"  # one line, no traceback


def test_cli_bug_keeps_its_traceback(monkeypatch) -> None:
    def failing(args) -> int:
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr("hf_ptq.cli.quantize.run", failing)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        main(["quantize"])


def test_cli_real_user_errors(tiny_llama_with_tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    binary = tmp_path / "calib.bin"
    binary.write_bytes(b"\x00\x01" * 100)
    tiny, out = str(tiny_llama_with_tokenizer_dir), str(tmp_path / "q")
    assert main(["quantize", tiny, "--method", "gptq", "--dataset", str(binary), "--out", out]) == 2
    assert "not a UTF-8 text file" in capsys.readouterr().err
    assert main(["quantize", tiny, "--method", "awq", "--set", "grid=1000000", "--out", out]) == 2
    assert "PtqConfig.grid=1000000 is invalid" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "no-such-model"), "--out", out, "--no-eval"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.bin"]


# --- 7. format version and quant_method ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PtqConfig, SmoothQuantConfig])
def test_saved_format_version_is_checked(cls) -> None:
    data = cls().to_dict()
    assert data["format_version"] == FORMAT_VERSION and FORMAT_VERSION in SUPPORTED_FORMAT_VERSIONS
    newer = max(SUPPORTED_FORMAT_VERSIONS) + 1
    with pytest.raises(ValueError, match=rf"format_version={newer}: .*format version {newer}.*reads format_version 1"):
        cls(**{**data, "format_version": newer})
    with pytest.raises(ValueError, match="upgrade hf-ptq"):
        cls(**{**data, "format_version": newer})
    for bad in ("1", 1.0, None, True):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.format_version=.* is invalid: .*integer"):
            cls(**{**data, "format_version": bad})


@pytest.fixture(scope="module")
def saved_rtn(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved-rtn")
    FAMILIES["llama"].build().save_pretrained(folder / "float")
    q = AutoModelForCausalLM.from_pretrained(folder / "float", quantization_config=PtqConfig(group_size=32))
    q.save_pretrained(folder / "q")
    return folder / "q"


def edited_copy(saved: Path, target: Path, **changes) -> Path:
    """A copy of the checkpoint `saved` whose config.json's quantization_config has `changes` applied."""
    target.mkdir()
    for f in saved.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((target / "config.json").read_text())
    saved_hf_ptq_config(config["quantization_config"]).update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_checkpoint_with_a_newer_format_version_is_refused(saved_rtn: Path, tmp_path: Path) -> None:
    folder = edited_copy(saved_rtn, tmp_path / "v2", format_version=2)
    with pytest.raises(ValueError, match=r"format version 2.*reads format_version 1: upgrade hf-ptq"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("name", ["hf_ptq_v9", "hf_ptq_smoothquant2"])
def test_checkpoint_with_an_unknown_hf_ptq_method_is_refused(name: str, saved_rtn: Path, tmp_path: Path) -> None:
    folder = edited_copy(saved_rtn, tmp_path / name, quant_method=name)
    with pytest.raises(ValueError, match=rf"quant_method='{name}' is not one this hf_ptq reads.*upgrade hf-ptq"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_other_quant_methods_keep_transformers_behaviour() -> None:
    supports = auto.AutoHfQuantizer.supports_quant_method
    assert supports({"quant_method": "mystery_quant"}) is False  # transformers' warning path, unchanged
    assert supports({"quant_method": "hf_ptq"}) is True
    assert supports({"quant_method": "hf_ptq_smoothquant"}) is True
    with pytest.raises(ValueError, match="no `quant_method` attribute"):
        supports({})


def test_quant_method_guard_is_idempotent(saved_rtn: Path, tmp_path: Path) -> None:
    importlib.reload(hf_ptq.registration)
    hf_ptq.registration.register("hf_ptq", hf_ptq.PtqConfig, hf_ptq.PtqHfQuantizer)
    importlib.reload(hf_ptq)
    wrapper = auto.AutoHfQuantizer.__dict__["supports_quant_method"].__func__
    original = wrapper._hf_ptq_original
    assert not hasattr(original, "_hf_ptq_original")  # always wraps transformers' own function, once
    assert original.__module__ == "transformers.quantizers.auto"
    folder = edited_copy(saved_rtn, tmp_path / "v9", quant_method="hf_ptq_v9")
    with pytest.raises(ValueError, match="hf_ptq_v9"):
        AutoModelForCausalLM.from_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(saved_rtn)
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, QuantLinear)


def test_non_finite_weights_met_on_load_are_raised_together() -> None:
    """Quantize-on-load records bad layers (an exception inside a transformers conversion op would only become a
    generic RuntimeError after the load) and raises one ValueError listing them."""
    found = NonFiniteWeights()
    bad = torch.ones(2, 4)
    bad[0, 1] = float("nan")
    assert found.check(torch.ones(2, 4), "model.layers.0.mlp.up_proj") is True
    assert found.check(bad, "model.layers.1.self_attn.q_proj") is False
    with pytest.raises(NonFiniteError, match=r"q_proj: 1 NaN and 0 inf value\(s\) \(of 8\).*\['model\.layers\.1"):
        found.raise_if_any()
    found.raise_if_any()  # reported once, then forgotten
