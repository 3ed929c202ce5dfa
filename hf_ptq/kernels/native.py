"""C kernels shipped as source in this package, compiled on first use with the system C compiler, loaded by ctypes.

Why: some CPU work around torch's matmuls is a chain of memory-bound elementwise passes (W8A8's per-token
activation quantization and int32 rescale: 6 and 4 torch ops per layer call). One C loop per chain reads and
writes each element once; see `w8a8_cpu.c`. Nothing is built at install time: the first process that needs a
library compiles it (about 0.2 s) into `<HF_PTQ_CACHE or ~/.cache/hf_ptq>/kernels/`, named by a hash of the source,
the compiler, the flags and the CPU (it is built for this CPU with -march=native); later processes load the file.

When it cannot be built or loaded (no compiler, another OS) or `HF_PTQ_NATIVE_KERNELS=0`, `load` returns None
once with an INFO log, and callers run their torch code, which computes the same bits.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..default_model import cache_root

logger = logging.getLogger(__name__)

_SOURCES = Path(__file__).resolve().parent
_BASE_FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")
_COMPILE_TIMEOUT_S = 120


def enabled() -> bool:
    """False when `HF_PTQ_NATIVE_KERNELS=0` (read on every call, so tests can switch it)."""
    return os.environ.get("HF_PTQ_NATIVE_KERNELS", "1") != "0"


@functools.cache
def load(source: str) -> ctypes.CDLL | None:
    """The compiled library of `source` (a C file next to this module), or None when it cannot be had here."""
    if not sys.platform.startswith("linux"):
        logger.info("hf_ptq: C kernels are built on Linux only; using torch ops")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        logger.info("hf_ptq: no C compiler found (set CC); %s runs with torch ops", source)
        return None
    code = (_SOURCES / source).read_bytes()
    errors = []
    for flags in _flag_choices():
        try:
            path = _build(code, source, compiler, flags)
            return ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(flags)}: {str(e).strip()[-300:]}")
    logger.info("hf_ptq: could not build %s with %s; using torch ops. %s", source, compiler, " | ".join(errors))
    return None


def _flag_choices() -> list[tuple[str, ...]]:
    """Compiler flags to try, fastest first: this CPU's instruction set, and OpenMP when torch itself uses
    OpenMP (so both share one runtime and its threads)."""
    openmp = ("-fopenmp",) if "parallel backend: OpenMP" in torch.__config__.parallel_info() else ()
    native = ("-march=native",) if platform.machine() in ("x86_64", "AMD64") else ("-mcpu=native",)
    choices = [_BASE_FLAGS + native + openmp, _BASE_FLAGS + native, _BASE_FLAGS]
    return list(dict.fromkeys(choices))


def _build(code: bytes, source: str, compiler: str, flags: tuple[str, ...]) -> Path:
    """Compile `code` unless a library of the same key is cached; write to a temporary name, then rename."""
    key = hashlib.sha256(b"\0".join([code, compiler.encode(), " ".join(flags).encode(), _cpu_id()])).hexdigest()
    target = cache_root() / "kernels" / f"{Path(source).stem}-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, "-x", "c", "-", "-o", tmp],
            input=code,
            check=True,
            capture_output=True,
            timeout=_COMPILE_TIMEOUT_S,
        )
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise subprocess.SubprocessError(e.stderr.decode(errors="replace")) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu_id() -> bytes:
    """What -march=native depends on: the machine and the CPU's feature flags."""
    flags = b""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            flags = next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    except OSError:
        pass
    return platform.machine().encode() + flags
