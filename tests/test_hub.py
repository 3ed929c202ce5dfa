"""push_to_hub with the Hub unreachable: HfApi.create_repo / create_commit are replaced by recorders."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import huggingface_hub.hf_api
import pytest
import torch
import yaml
from conftest import FAMILIES, input_ids, model_output, rtn_w4
from huggingface_hub import CommitOperationAdd, HfApi
from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq import PtqConfig
from hf_ptq.formats.save import saved_hf_ptq_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class FakeHub:
    repos: list[dict] = field(default_factory=list)
    commits: list[dict] = field(default_factory=list)
    readme_yaml: list[dict] = field(default_factory=list)

    def files(self, commit: int = -1) -> dict[str, bytes]:
        return self.commits[commit]["files"]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub()

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
        fake.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok})
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        files = {}
        for op in operations:
            assert isinstance(op, CommitOperationAdd), op
            source = op.path_or_fileobj
            if isinstance(source, (str, Path)):
                files[op.path_in_repo] = Path(source).read_bytes()  # read now: the folder is temporary
            elif isinstance(source, bytes):
                files[op.path_in_repo] = source
            else:
                assert isinstance(source, io.BufferedIOBase)
                files[op.path_in_repo] = source.read()
        fake.commits.append({"repo_id": repo_id, "message": commit_message, "files": files, **kwargs})
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/123",
            commit_message=commit_message,
            commit_description="",
            oid="123",
        )

    def unreachable(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "preupload_lfs_files", unreachable)

    def validate_yaml(self, content: str, **kwargs):  # the Hub validates README.md metadata: do it locally
        fake.readme_yaml.append(yaml.safe_load(content.split("---")[1]))

    monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)  # the single-commit path
    return fake


def write_files(files: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def quantized(tiny_llama_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=rtn_w4())


def test_model_push_to_hub(hub: FakeHub, quantized, tmp_path: Path) -> None:
    quantized.push_to_hub("me/tiny-rtn", metrics={"perplexity": 12.3, "top-1 agreement": 0.97})
    assert [r["repo_id"] for r in hub.repos] == ["me/tiny-rtn"]
    assert len(hub.commits) == 1 and hub.commits[0]["repo_id"] == "me/tiny-rtn"
    assert "rtn" in hub.commits[0]["message"]
    files = hub.files()
    assert {"README.md", "config.json"} <= set(files)
    assert any(name.endswith(".safetensors") for name in files)
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES)]

    card = files["README.md"].decode()
    for text in ("rtn", "pip install hf-ptq", "import hf_ptq", "me/tiny-rtn", "perplexity", "12.3", "0.97"):
        assert text in card, text
    assert "| bits | 4 |" in card and "| group size | 32 |" in card
    assert len(hub.readme_yaml) == 1 and "hf-ptq" in hub.readme_yaml[0]["tags"]
    assert hub.readme_yaml[0]["library_name"] == "transformers"

    config = json.loads(files["config.json"])
    assert saved_hf_ptq_config(config["quantization_config"])["quant_method"] == "hf_ptq"

    folder = write_files(files, tmp_path / "downloaded")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, hf_ptq.QuantLinear)
    ids = input_ids()
    assert torch.equal(model_output(reloaded, ids), model_output(quantized, ids))


def test_push_to_hub_with_tokenizer_and_api(hub: FakeHub, tmp_path: Path) -> None:
    """hf_ptq.push_to_hub on a model quantized in memory, with an explicit HfApi and a tokenizer."""
    model = hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(method="int8"))

    class TinyTokenizer:
        def save_pretrained(self, folder):
            Path(folder, "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')

    hf_ptq.push_to_hub(model, "me/tiny-int8", api=HfApi(), tokenizer=TinyTokenizer(), commit_message="int8 upload")
    files = hub.files()
    assert hub.commits[0]["message"] == "int8 upload"
    assert "tokenizer_config.json" in files
    card = files["README.md"].decode()
    assert "int8" in card and "| bits | 8 |" in card and "per-channel" in card
    assert "Measured" not in card  # no metrics given: no metrics section
    reloaded = AutoModelForCausalLM.from_pretrained(write_files(files, tmp_path / "dl"))
    ids = input_ids()
    assert torch.equal(model_output(reloaded, ids), model_output(model, ids))


def test_reloaded_model_can_push_again(hub: FakeHub, quantized, tmp_path: Path) -> None:
    """A model reloaded from a pushed checkpoint keeps hf_ptq's push_to_hub (model card included)."""
    quantized.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    reloaded.push_to_hub("me/again", metrics={"kl": 0.01})
    card = hub.files()["README.md"].decode()
    assert "pip install hf-ptq" in card and "0.01" in card
