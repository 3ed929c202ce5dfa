"""method="auto": the decision tree as a pure function, its record in the config, and end-to-end loads."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, input_ids, model_output
from optional_extras import require_extra
from transformers import AutoModelForCausalLM

from hf_ptq import PtqConfig
from hf_ptq.auto_method import choose_method
from hf_ptq.nn import QuantLinear


def expected_method(finetune: bool, data: bool, prefer: str, deploy: str | None, cuda: bool) -> str:
    """The chapter's tree, written out independently as a table of rules in priority order."""
    rules = [
        (finetune, "nf4"),
        (deploy == "cpu", "int8"),
        (data and prefer == "latency", "awq"),
        (data, "gptq"),
        (deploy == "gpu", "nf4"),
        (deploy is None and cuda, "nf4"),
    ]
    return next((method for applies, method in rules if applies), "hqq")


@pytest.mark.parametrize(
    ("finetune", "data", "prefer", "deploy", "cuda"),
    list(itertools.product((False, True), (False, True), ("accuracy", "latency"), (None, "cpu", "gpu"), (False, True))),
)
def test_decision_tree_every_input(finetune: bool, data: bool, prefer: str, deploy: str | None, cuda: bool) -> None:
    choice = choose_method(finetune=finetune, calibration_data=data, prefer=prefer, deploy=deploy, cuda=cuda)
    assert choice.method == expected_method(finetune, data, prefer, deploy, cuda)
    assert choice.reason and choice.method in ("nf4", "int8", "awq", "gptq", "hqq")


@pytest.mark.parametrize(
    ("kwargs", "method", "words"),
    [
        ({"finetune": True, "calibration_data": True}, "nf4", ["fine-tuning"]),
        ({"finetune": False, "calibration_data": True, "deploy": "cpu"}, "int8", ["CPU", "SmoothQuantConfig"]),
        ({"finetune": False, "calibration_data": True, "prefer": "latency"}, "awq", ["latency"]),
        ({"finetune": False, "calibration_data": True}, "gptq", ["calibration data"]),
        ({"finetune": False, "calibration_data": False, "cuda": True}, "nf4", ["CUDA"]),
        ({"finetune": False, "calibration_data": False}, "hqq", ["no calibration data"]),
    ],
)
def test_reasons_name_the_deciding_input(kwargs: dict, method: str, words: list[str]) -> None:
    choice = choose_method(**kwargs)
    assert choice.method == method
    for word in words:
        assert word in choice.reason


@pytest.mark.parametrize(("field", "value"), [("prefer", "fast"), ("deploy", "tpu")])
def test_decision_tree_rejects_unknown_inputs(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=field):
        choose_method(finetune=False, calibration_data=False, **{field: value})


def test_config_auto_records_and_logs_the_choice(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("hf_ptq")
    logger.addHandler(caplog.handler)  # transformers' loggers do not propagate to the root logger
    try:
        cfg = PtqConfig(method="auto", deploy="cpu")
    finally:
        logger.removeHandler(caplog.handler)
    assert (cfg.method, cfg.bits, cfg.group_size, cfg.sym) == ("int8", 8, -1, True)
    assert cfg.auto_choice["method"] == "int8" and "CPU deployment" in cfg.auto_choice["reason"]
    assert cfg.auto_choice["inputs"] == {
        "finetune": False,
        "prefer": "accuracy",
        "deploy": "cpu",
        "calibration_data": False,
        "cuda": torch.cuda.is_available(),
    }
    assert (cfg.finetune, cfg.prefer, cfg.deploy) == (None, None, None)  # consumed into auto_choice
    assert any("method='auto' chose method='int8'" in r.getMessage() for r in caplog.records)
    rebuilt = PtqConfig(**json.loads(json.dumps(cfg.to_dict())))  # what transformers does with config.json
    assert rebuilt == cfg and rebuilt.auto_choice == cfg.auto_choice


def test_config_auto_with_data_chooses_gptq() -> None:
    cfg = PtqConfig(method="auto", dataset=["some calibration text"], group_size=32)
    assert cfg.method == "gptq" and cfg.desc_act is True  # the chosen method's own defaults apply
    assert cfg.auto_choice["inputs"]["calibration_data"] is True


def test_auto_inputs_rejected_with_other_methods() -> None:
    for field, value in (("finetune", True), ("prefer", "latency"), ("deploy", "cpu")):
        with pytest.raises(ValueError, match=rf"PtqConfig\.{field}=.*method='auto'"):
            PtqConfig(method="rtn", **{field: value})


def test_auto_conflict_names_field_and_choice() -> None:
    """bits=4 with a CPU deployment: auto picks int8, whose 8 bits are fixed; the error says why int8 was chosen."""
    with pytest.raises(ValueError, match=r"PtqConfig\.bits=4 .*chosen by method='auto': CPU deployment"):
        PtqConfig(method="auto", deploy="cpu", bits=4)


def test_auto_end_to_end_hqq_saves_choice(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """No data, no fine-tuning, no GPU: HQQ, quantized on load, saved with the choice, reloaded exactly."""
    require_extra("hqq")
    cfg = PtqConfig(method="auto", group_size=32)
    if cfg.method != "hqq":  # on a CUDA machine the tree picks nf4
        pytest.skip(f"auto chose {cfg.method} here")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "hqq" and saved["auto_choice"]["method"] == "hqq"
    assert "no calibration data" in saved["auto_choice"]["reason"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.config.quantization_config.auto_choice == saved["auto_choice"]
    ids = input_ids()
    assert torch.equal(model_output(reloaded, ids), model_output(model, ids))


def test_auto_end_to_end_finetune_is_nf4(tiny_llama_dir: Path) -> None:
    require_extra("bnb")
    import bitsandbytes as bnb

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=PtqConfig(method="auto", finetune=True)
    )
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert model.hf_quantizer.is_trainable and model.config.quantization_config.method == "nf4"


def test_auto_end_to_end_cpu_deploy_is_int8() -> None:
    from hf_ptq import quantize

    model = quantize(FAMILIES["llama"].build(), PtqConfig(method="auto", deploy="cpu"))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and (layer.bits, layer.group_size, layer.sym) == (8, -1, True)


def test_auto_end_to_end_latency_with_data_is_awq() -> None:
    """Calibration data and `prefer="latency"`: AWQ, with its own defaults, through the calibration pipeline."""
    from hf_ptq import quantize

    calib = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = PtqConfig(method="auto", prefer="latency", dataset=calib, num_samples=4, seq_len=16, group_size=32)
    assert (cfg.method, cfg.duo_scaling, cfg.grid) == ("awq", True, 20)
    assert "latency" in cfg.auto_choice["reason"]
    model = quantize(FAMILIES["llama"].build(), cfg)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert model.config.quantization_config.auto_choice["method"] == "awq"
