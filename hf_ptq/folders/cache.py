"""The folder hf_ptq caches what it builds in (converted default model, compiled kernels, quantized outputs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`HF_PTQ_CACHE`, else `~/.cache/hf_ptq`."""
    return Path(os.environ.get("HF_PTQ_CACHE", Path.home() / ".cache" / "hf_ptq"))
