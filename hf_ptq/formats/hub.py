"""`push_to_hub` for quantized models: the saved checkpoint plus hf_ptq's model card in one commit."""

from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from .model_card import build_model_card


def push_to_hub(
    model,
    repo_id: str,
    *,
    metrics: dict[str, Any] | None = None,
    tokenizer=None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
    format: str | None = None,
    **save_kwargs: Any,
):
    """Save `model` (and `tokenizer`) to a temporary folder, add the model card, upload it as one commit.

    `format` (`"compressed-tensors"`, `"gptq"`, `"gguf"`) uploads that export instead of hf_ptq's own checkpoint
    (see `hf_ptq.export`; `save_kwargs` are then its options, e.g. `gguf_type="q4_0"`); the card says how to load it.
    Unsupported combinations fail before the repo is created.
    """
    from .export import check_export, export

    if format is not None:
        _, tokenizer = check_export(model, format, tokenizer, **save_kwargs)
    api = api or HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "upload"
        if format is None:
            model.save_pretrained(folder, **save_kwargs)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
        else:
            export(model, folder, format, tokenizer=tokenizer, **save_kwargs)
        build_model_card(model, repo_id, metrics, format=format, files=os.listdir(folder)).save(folder / "README.md")
        described = model.config.quantization_config.describe() + (f", {format}" if format else "")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message or f"Upload {described} model (hf_ptq)",
            revision=revision,
            create_pr=create_pr,
        )


def attach_push_to_hub(model) -> None:
    """Make `model.push_to_hub(repo, metrics=..., tokenizer=...)` write hf_ptq's model card."""

    def _push(self, repo_id: str, **kwargs: Any):
        kwargs.pop("tags", None)  # tags are part of hf_ptq's card
        return push_to_hub(self, repo_id, **kwargs)

    _push.__doc__ = push_to_hub.__doc__
    model.push_to_hub = types.MethodType(_push, model)
