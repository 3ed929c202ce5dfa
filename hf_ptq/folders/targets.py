"""Which folders hf_ptq may write, and which it may replace.

An output folder is replaced as a whole (see `staging.py`), so before any work starts a target is refused when
replacing it could destroy something that is not a model: a folder holding other files (only model, tokenizer
and report files may be replaced), the current folder or one above it, the home folder, a filesystem root or
mount point, a symbolic link.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

# What a model folder written by hf_ptq, transformers or an exporter holds: these may be replaced with `overwrite`.
MODEL_FILE_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "quantize_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
        "README.md",
        ".gitattributes",
        "report.md",
        "results.json",
        "comparison.png",
    }
)
MODEL_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.gguf", "pytorch_model*.bin", "*.bin.index.json")


def is_model_file(name: str) -> bool:
    """True for the name of a file a model folder holds (weights, configs, tokenizer, model card, reports)."""
    return name in MODEL_FILE_NAMES or any(fnmatch.fnmatchcase(name, p) for p in MODEL_FILE_PATTERNS)


def foreign_entries(folder: Path) -> list[str]:
    """Names in `folder` that are not model files (sub-folders included), sorted."""
    entries = os.scandir(folder)
    return sorted(e.name for e in entries if not (e.is_file(follow_symlinks=False) and is_model_file(e.name)))


def check_swappable(target: Path, field: str) -> Path:
    """`target` as an absolute path; ValueError naming `field` when the folder cannot be replaced by a rename."""
    if target.is_symlink():
        raise ValueError(
            f"{field}={str(target)!r} is a symbolic link: outputs are replaced as a whole folder, which would replace "
            f"the link, not what it points to. Pass the folder it points to ({os.path.realpath(target)!r}) or another "
            f"{field}."
        )
    absolute = Path(os.path.abspath(target))
    cwd = Path.cwd()
    reasons = []
    if absolute == cwd or absolute in cwd.parents:
        reasons.append("it is the current folder or a folder above it")
    if absolute == Path.home():
        reasons.append("it is the home folder")
    if absolute.parent == absolute or (absolute.is_dir() and os.path.ismount(absolute)):
        reasons.append("it is a filesystem root or mount point")
    if reasons:
        raise ValueError(
            f"{field}={str(target)!r} cannot be written: {' and '.join(reasons)}, and hf_ptq writes a folder by "
            f"renaming a complete new one into place. Choose a new sub-folder, e.g. "
            f"{field}={str(target / 'quantized')!r}."
        )
    return absolute


def check_replaceable(target: Path, overwrite: bool, field: str) -> None:
    """FileExistsError naming `field` when `target` is a file, or a non-empty folder without `overwrite`, or a
    folder holding files that are not a model's (listed), even with `overwrite`."""
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise FileExistsError(f"{field}={str(target)!r} is a file, not a folder: choose another {field}.")
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{field}={str(target)!r} exists and is not empty: pass overwrite (--overwrite) or choose another {field}."
        )
    foreign = foreign_entries(target)
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise FileExistsError(
            f"{field}={str(target)!r} holds files that are not part of a model ({shown}); overwrite replaces only "
            f"folders that hold a model (weights, configs, tokenizer files). Move them away or choose another {field}."
        )


def check_output_folder(target: str | os.PathLike, overwrite: bool = False, field: str = "out") -> Path:
    """`target` as an absolute Path, checked before any work: ValueError when it cannot be replaced by a rename
    (`check_swappable`), FileExistsError when it holds something that must not be replaced (`check_replaceable`)."""
    absolute = check_swappable(Path(target).expanduser(), field)
    check_replaceable(absolute, overwrite, field)
    return absolute
