"""`hf-ptq verify DIR [--no-checksums]`: check a saved checkpoint without loading its weights.

Checks the files (safetensors only, none truncated, the shard index), every quantized layer's tensors against the
saved config (names, shapes, dtypes), the values of scales, zero points, shapes and act-order indices, and the
SHA-256 of every tensor recorded at save. Prints what was checked and exits 0, or prints what is wrong (module,
tensor, file, config field) and exits 2. Also repairs what an interrupted hf_ptq write left beside DIR.
"""

from __future__ import annotations

import argparse

NAME = "verify"
HELP = "check a saved checkpoint (files, layout, values, checksums) without loading it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="folder written by save_pretrained, `hf-ptq quantize` or export")
    parser.add_argument("--no-checksums", action="store_true", help="skip the SHA-256 of every tensor (faster)")


def run(args: argparse.Namespace) -> int:
    from .models import local_folder

    local_folder(args.model)
    from ..formats.verify import verify

    print(verify(args.model, checksums=not args.no_checksums).summary())
    return 0
