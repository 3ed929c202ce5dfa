"""`hf_ptq.verify(path)` and the checks hf_ptq's loader runs on a checkpoint before any weight is read.

What is checked, in order (each failure is a `CheckpointError` naming the file, the tensor and, where the saved
config disagrees with the tensors, the field):
1. the files: safetensors only (no pickle is ever loaded), each readable and not truncated, the shard index
   consistent with the shards;
2. the layout: every tensor each quantized module needs is there, with the shape and dtype its config implies,
   and nothing the config rules out (`layout_check.check_layout`);
3. the values of the small tensors: `weight_shape`, finite scales and zero points, act-order `weight_g_idx`
   (`layout_check.check_values`);
4. the SHA-256 of every tensor recorded at save (`checksums`), when asked: `verify` checks them by default,
   `from_pretrained` as `HF_PTQ_VERIFY_CHECKSUMS` says (default on; see docs/reliability.md for the cost).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..folders import recover_folder
from .checksums import check_checksums
from .layout_check import check_layout, check_values, raise_problems
from .safetensors_file import CheckpointError, SafetensorsHeader, read_header
from .third_party import TAKEN_OVER

logger = logging.getLogger("hf_ptq")

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"


def checksums_on_load() -> bool:
    """Whether `from_pretrained` checks the recorded SHA-256 of every tensor (`HF_PTQ_VERIFY_CHECKSUMS`, default 1)."""
    return os.environ.get("HF_PTQ_VERIFY_CHECKSUMS", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class VerifyReport:
    """What `verify` (or the loader) checked."""

    folder: Path
    files: list[str]
    tensors: int
    bytes: int
    checksums_checked: int = 0
    unverified: list[str] = field(default_factory=list)  # tensors without a recorded checksum
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        size = f"{self.bytes / 1e6:.1f} MB" if self.bytes < 1e9 else f"{self.bytes / 1e9:.2f} GB"
        files = f"{len(self.files)} file(s)"
        lines = [f"OK: {self.folder}: {self.tensors} tensors in {files}, {size}, checked in {self.seconds:.2f} s"]
        if self.checksums_checked:
            lines.append(f"- SHA-256 of {self.checksums_checked} tensor(s) match the checksums recorded at save")
        if self.unverified:
            lines.append(f"- {len(self.unverified)} tensor(s) have no recorded checksum (e.g. {self.unverified[0]})")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)


def _headers(files: list[Path]) -> list[SafetensorsHeader]:
    pickles = [f.name for f in files if not f.name.endswith(".safetensors")]
    if pickles:
        raise CheckpointError(
            f"{files[0].parent}: hf_ptq checkpoints are safetensors only; refusing to load {', '.join(pickles)} "
            "(pickle files can run code when loaded). Re-save the model with save_pretrained."
        )
    return [read_header(f) for f in files]


def _weight_map(index: Path) -> dict[str, str]:
    """{tensor: shard file} of a shard index; CheckpointError naming it when it is not one."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a valid shard index ({type(err).__name__}: {err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid shard index (weight_map is not a {{tensor: file}} object)")
    return weight_map


def _index_problems(folder: Path, headers: list[SafetensorsHeader]) -> list[str]:
    """Problems of `model.safetensors.index.json` against the shards: every listed tensor in its shard, every
    tensor of a shard listed."""
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        return []
    weight_map = _weight_map(index_path)
    by_file = {h.path.name: h for h in headers}
    problems = []
    for name, file in weight_map.items():
        if file not in by_file:
            problems.append(f"{INDEX_NAME}: {name} is listed in {file}, which is missing")
        elif name not in by_file[file].tensors:
            problems.append(f"{INDEX_NAME}: {name} is listed in {file}, which does not hold it")
    for file, header in by_file.items():
        unlisted = sorted(set(header.tensors) - set(weight_map))
        if unlisted:
            problems.append(f"{file}: {len(unlisted)} tensor(s) not listed in {INDEX_NAME} (e.g. {unlisted[0]})")
    return problems


def verify_checkpoint(
    model: nn.Module | None, config: Any, files: list[str | os.PathLike], checksums: bool
) -> VerifyReport:
    """Run checks 1-4 on `files`; 2 and 3 against `model` (its quantized modules in place, on meta) when given."""
    start = time.perf_counter()
    paths = [Path(f) for f in files]
    folder = paths[0].parent
    headers = _headers(paths)
    raise_problems(_index_problems(folder, headers), f"{folder}: the shard index disagrees with the shards")
    if model is not None:
        raise_problems(check_layout(model, config, headers), f"{folder}: the tensors disagree with the saved config")
        raise_problems(check_values(model, headers), f"{folder}: damaged values in the checkpoint")
    report = VerifyReport(
        folder,
        [p.name for p in paths],
        sum(len(h.tensors) for h in headers),
        sum(p.stat().st_size for p in paths),
    )
    if checksums:
        report.checksums_checked, report.unverified = check_checksums(headers)
        if not report.checksums_checked:
            report.notes.append("no checksums are recorded (saved before hf_ptq recorded them, or by another tool)")
            report.unverified = []
    else:
        report.notes.append("checksums not checked")
    report.seconds = time.perf_counter() - start
    return report


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.exists():
        names = sorted(set(_weight_map(index).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    found = sorted(p.name for p in folder.glob("*.safetensors")) or sorted(p.name for p in folder.glob("*.bin"))
    if found:
        return [folder / n for n in found]  # pickle files are listed to be refused by name
    raise CheckpointError(f"{folder}: no safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME}) found")


def verify_gguf(files: list[Path]) -> VerifyReport:
    """A GGUF export: each file parsed by the `gguf` package, every tensor's data inside the file. GGUF has no
    place hf_ptq records checksums in, so none are checked."""
    import gguf

    start = time.perf_counter()
    tensors = 0
    for path in files:
        size = path.stat().st_size
        try:
            reader = gguf.GGUFReader(path)
        except (ValueError, KeyError, IndexError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
        for t in reader.tensors:
            if t.data_offset + int(t.n_bytes) > size:
                raise CheckpointError(f"{path}: tensor {t.name} ends past the end of the file (truncated).")
        tensors += len(reader.tensors)
    report = VerifyReport(files[0].parent, [p.name for p in files], tensors, sum(p.stat().st_size for p in files))
    report.notes.append("GGUF: structure checked by the gguf package; GGUF files carry no hf_ptq checksums")
    report.seconds = time.perf_counter() - start
    return report


def _meta_model(folder: Path) -> nn.Module:
    """The model of `folder`'s config.json, built on the meta device (no memory, no weights, no remote code)."""
    import transformers

    try:
        model_config = transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: cannot be read as a transformers config ({err})") from None
    arch = (getattr(model_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    with torch.device("meta"):
        if cls is not None and isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls(model_config)
        return transformers.AutoModel.from_config(model_config)


def verify(path: str | os.PathLike, checksums: bool = True) -> VerifyReport:
    """Check the checkpoint folder `path` without loading its weights: files, layout against the saved config,
    values, and (with `checksums`) the SHA-256 of every tensor. Repairs what an interrupted hf_ptq write left
    beside it first. Returns a `VerifyReport`; raises CheckpointError (a ValueError) naming what is wrong."""
    from transformers.quantizers.auto import AutoHfQuantizer

    from ..own_methods import refuse_unknown_own_method

    folder = Path(path)
    notes = recover_folder(folder)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    if not config_path.exists() and any(folder.glob("*.gguf")):
        return verify_gguf(sorted(folder.glob("*.gguf")))
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json: not a saved model folder") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.gguf")):
        report = verify_gguf(sorted(folder.glob("*.gguf")))
        report.notes = notes + report.notes
        return report
    files = _checkpoint_files(folder)
    quant = saved.get("quantization_config") if isinstance(saved, dict) else None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if not (isinstance(method, str) and (method.startswith("hf_ptq") or method in TAKEN_OVER)):
        report = verify_checkpoint(None, None, files, checksums)
        report.notes.append(f"not an hf_ptq checkpoint (quant_method={method!r}): files and checksums checked only")
    else:
        try:
            refuse_unknown_own_method(quant)
        except ValueError as err:
            raise CheckpointError(f"{config_path}: {err}") from None
        model = _meta_model(folder)
        try:
            quantizer = AutoHfQuantizer.from_config(quant, pre_quantized=True)
        except ValueError as err:  # the saved config itself is refused (e.g. a newer format_version)
            raise CheckpointError(f"{config_path}: {err}") from None
        if not hasattr(quantizer, "verify_report"):  # transformers' own loader was chosen (hf_ptq.use_backend)
            report = verify_checkpoint(None, None, files, checksums)
            report.notes = notes + report.notes + [f"quant_method={method!r} loads with transformers' own loader"]
            return report
        quantizer.verify_checksums = checksums
        quantizer.preprocess_model(model, dtype=model.dtype, checkpoint_files=[str(f) for f in files])
        report = quantizer.verify_report
    report.notes = notes + report.notes
    return report
