"""Calibration data: every accepted form becomes the expected token batches; bad data fails early and clearly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, VOCAB
from optional_extras import require_extra
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ptq import PtqConfig
from hf_ptq.calibration.data import calibration_batches, make_batches, token_samples
from hf_ptq.calibration.self_generated import sample_from_model
from hf_ptq.nn import QuantLinear

# Written for these tests (no benchmark text may be committed).
SENTENCES = [
    "A lighthouse keeper counts the ships that pass between the rocks each night.",
    "The baker opens the shop at five, before the first tram crosses the bridge.",
    "Rain on the tin roof kept the whole family awake until the storm moved east.",
    "She repaired the old radio with parts taken from a broken music box.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_with_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer_dir)


def long_text(n: int) -> str:
    return " ".join(SENTENCES[i % len(SENTENCES)] for i in range(n))


def test_texts_become_consecutive_chunks(tokenizer) -> None:
    texts = [long_text(6), long_text(9)]
    cfg = PtqConfig(method="gptq", dataset=texts, num_samples=3, seq_len=32, batch_size=2)
    batches = calibration_batches(cfg, tokenizer=tokenizer)
    expected = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][: 3 * 32]
    assert [tuple(b.shape) for b in batches] == [(2, 32), (1, 32)]
    assert torch.cat(batches).reshape(-1).tolist() == expected
    assert all(b.dtype == torch.long for b in batches)


def test_text_file_tokenized_like_the_whole_file(tokenizer, tmp_path: Path) -> None:
    """Only a prefix of a long file is tokenized, with the same ids as tokenizing the whole file."""
    path = tmp_path / "calib.txt"
    text = "\n".join(long_text(3) for _ in range(400))
    path.write_text(text)
    samples = token_samples(str(path), num_samples=4, seq_len=64, tokenizer=tokenizer)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(whole) > 20 * 4 * 64  # the file is much longer than what is needed
    assert torch.stack(samples).reshape(-1).tolist() == whole[: 4 * 64]


def test_token_ids_used_as_given() -> None:
    ids = torch.randint(0, VOCAB, (5, 7))
    samples = token_samples(ids, num_samples=3, seq_len=512)
    assert torch.equal(torch.stack(samples), ids[:3])
    ragged = [[1, 2, 3], [4, 5], [6, 7, 8], [9, 10]]
    batches = make_batches(token_samples(ragged, num_samples=10, seq_len=512), batch_size=4)
    assert [b.tolist() for b in batches] == [[[1, 2, 3], [6, 7, 8]], [[4, 5], [9, 10]]]


def test_datasets_dataset_text_column(tokenizer) -> None:
    datasets = require_extra("datasets", "datasets")
    rows = ["", SENTENCES[0], "   ", long_text(20)]
    ds = datasets.Dataset.from_dict({"id": list(range(4)), "text": rows})
    samples = token_samples(ds, num_samples=2, seq_len=16, tokenizer=tokenizer)
    expected = tokenizer("\n\n".join([rows[1], rows[3]]), add_special_tokens=False)["input_ids"][:32]
    assert torch.stack(samples).reshape(-1).tolist() == expected


def test_too_little_text_raises(tokenizer) -> None:
    with pytest.raises(ValueError, match="fewer than one sample of seq_len=512"):
        token_samples(["just a few words"], num_samples=4, seq_len=512, tokenizer=tokenizer)


def test_fewer_samples_than_asked_warns(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    samples = token_samples([long_text(4)], num_samples=50, seq_len=16, tokenizer=tokenizer)
    assert 0 < len(samples) < 50 and "enough for" in caplog.text


def test_too_little_data_fails_before_loading_weights(tiny_llama_with_tokenizer_dir: Path, monkeypatch) -> None:
    import transformers.modeling_utils as modeling_utils

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the calibration data was checked")

    monkeypatch.setattr(modeling_utils, "convert_and_load_state_dict_in_model", no_loading)
    cfg = PtqConfig(method="gptq", group_size=32, dataset=["far too short"], seq_len=256)
    with pytest.raises(ValueError, match="seq_len=256"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_with_tokenizer_dir, quantization_config=cfg)


@pytest.mark.parametrize(
    ("dataset", "match"),
    [
        (["fine text", ""], r"dataset\[1\] is an empty string"),
        ("", "empty string"),
        ("not-a-dataset-or-file", "known names: 'wikitext2', 'c4'"),
        (3.5, "float is not supported"),
        ([1, 2, 3], "only strings or only lists of token ids"),
        (torch.zeros(2, 3), "LongTensor"),
        ([[1, 2], []], "empty"),
    ],
)
def test_bad_datasets_raise_at_config_time(dataset, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PtqConfig(method="gptq", dataset=dataset)


def test_dataset_name_without_datasets_package(monkeypatch, tokenizer) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    cfg = PtqConfig(method="gptq", dataset="wikitext2")
    with pytest.raises(ValueError, match="pip install datasets") as info:
        calibration_batches(cfg, tokenizer=tokenizer)
    assert "dataset=None" in str(info.value)


def test_text_without_any_tokenizer_raises(tmp_path: Path) -> None:
    cfg = PtqConfig(method="gptq", dataset=SENTENCES)
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_batches(cfg, model_path=str(tmp_path))  # an empty folder: no tokenizer there


def test_data_free_sampling_is_seeded_and_leaves_global_rng_alone() -> None:
    model = FAMILIES["llama"].build()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = sample_from_model(model, num_samples=3, seq_len=24, piece_len=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    again = sample_from_model(model, num_samples=3, seq_len=24, piece_len=8)
    assert len(first) == 3 and all(s.shape == (24,) for s in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(int(s[0]) == model.config.bos_token_id for s in first)  # each piece starts at BOS
    capped = sample_from_model(model, num_samples=10, seq_len=24, piece_len=8, max_tokens=48)
    assert len(capped) == 2


def test_data_free_gptq_runs_offline(tiny_llama_dir: Path, monkeypatch) -> None:
    """dataset=None needs no data, no tokenizer and no network (conftest sets HF_HUB_OFFLINE=1)."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("network access during data-free calibration")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cfg = PtqConfig(method="gptq", group_size=32, num_samples=4, seq_len=16, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert model.config.quantization_config.dataset_description == {"source": "sampled-from-model"}
