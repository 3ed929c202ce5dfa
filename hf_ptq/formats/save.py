"""`save_pretrained` of a model quantized by hf_ptq: staged and swapped into place like every hf_ptq output, with
the SHA-256 of every tensor in the safetensors metadata.

transformers' own `save_pretrained` writes into the folder in place: config.json first, then the shards, deleting
stale shards as it goes, so a process killed midway leaves a new config over old or partial weights. hf_ptq's
quantized models get a `save_pretrained` that runs transformers' into a staging folder and swaps the result into
place (`folders.staged_folder`): a kill at any moment leaves the old checkpoint or the new one. Files of the old
folder that a save does not write (a tokenizer, a README, a `.git` folder) are kept, as transformers keeps them;
the old weights and configs are not.

Where compressed-tensors can express the model (integer weights with integer zero points, W8A8), config.json's
`quantization_config` is written as a compressed-tensors block with hf_ptq's config nested under `"hf_ptq"`
(`compressed_tensors.portable_block`): plain transformers + compressed-tensors and vLLM load it correctly without
hf_ptq, and `import hf_ptq` reloads it on its own kernels. Other models keep `quant_method: "hf_ptq"` (see
docs/format.md).
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import types
from pathlib import Path
from typing import Any

from ..folders import staged_folder
from .safetensors_file import sort_metadata

# Files a new save replaces: the configs it writes and every weight file transformers could load instead.
_SUPERSEDED = ("config.json", "generation_config.json", "model*.safetensors", "model*.safetensors.index.json")
_SUPERSEDED += ("pytorch_model*.bin", "pytorch_model*.bin.index.json")


def superseded_by_save(name: str) -> bool:
    """True for the files of a model folder that a new `save_pretrained` makes stale."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _SUPERSEDED)


def _keyword_arguments(save, model, save_directory, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a `save_pretrained` call as keywords (positional ones bound by name)."""
    bound = inspect.signature(save).bind(model, save_directory, *args, **kwargs).arguments
    named = {k: v for k, v in bound.items() if k not in ("self", "save_directory", "kwargs")}
    return named | bound.get("kwargs", {})


def staged_save_pretrained(model, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
    """`PreTrainedModel.save_pretrained(model, save_directory, ...)` written through a staging folder.

    Calls that do not write a whole checkpoint here (another rank's `is_main_process=False`, distributed
    checkpoints) go to transformers unchanged; `push_to_hub=True` uploads the saved folder with hf_ptq's model card.
    """
    save = type(model).save_pretrained
    kwargs = _keyword_arguments(save, model, save_directory, args, kwargs)
    if not kwargs.get("is_main_process", True) or kwargs.get("distributed_checkpoint", False):
        return save(model, save_directory, **kwargs)
    push = kwargs.pop("push_to_hub", False)
    hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "create_pr") if k in kwargs}
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the digests must be those of the state dict actually written
        quantizer.state_dict_to_save = kwargs.get("state_dict")
    try:
        with staged_folder(save_directory, field="save_directory", superseded=superseded_by_save) as staging:
            save(model, staging, **kwargs)
            write_portable_config(model, staging)
            for file in staging.glob("*.safetensors"):
                sort_metadata(file)  # reproducible bytes: see `sort_metadata`
    finally:
        if quantizer is not None:
            quantizer.state_dict_to_save = None
    if push:
        from .hub import push_to_hub

        repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
        push_to_hub(model, repo_id, token=kwargs.get("token"), **hub_kwargs)


def write_portable_config(model, folder: Path) -> bool:
    """Rewrite `folder`/config.json's `quantization_config` as the compressed-tensors block (hf_ptq's config nested)
    when compressed-tensors can express `model`; True when it did."""
    from .compressed_tensors import portable_block

    path = Path(folder) / "config.json"
    block = portable_block(model) if path.is_file() else None
    if block is None:
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    config["quantization_config"] = block
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def saved_hf_ptq_config(quantization_config: dict[str, Any]) -> dict[str, Any]:
    """hf_ptq's config dict inside a saved `quantization_config` block (nested in a compressed-tensors block, or the
    block itself)."""
    from .compressed_tensors import HF_PTQ_KEY

    return quantization_config.get(HF_PTQ_KEY, quantization_config)


def attach_model_methods(model) -> None:
    """Give a model quantized by hf_ptq its `save_pretrained` (staged, see the module docstring), its `push_to_hub`
    (with hf_ptq's model card), and the `num_parameters` / `get_memory_footprint` that count its quantized weights
    (`hf_ptq.nn.counts`)."""
    from ..nn.counts import attach_counts
    from .hub import attach_push_to_hub

    model.save_pretrained = types.MethodType(staged_save_pretrained, model)
    attach_push_to_hub(model)
    attach_counts(model)
