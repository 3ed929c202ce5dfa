"""C kernels shipped as source in this package, compiled on first use with the system C compiler, loaded by ctypes.

Why: some CPU work around torch's matmuls is a chain of memory-bound elementwise passes (W8A8's per-token
activation quantization and int32 rescale: 6 and 4 torch ops per layer call). One C loop per chain reads and
writes each element once; see `w8a8_cpu.c`. Nothing is built at install time: the first process that needs a
library compiles it into `<HF_PTQ_CACHE or ~/.cache/hf_ptq>/kernels/`, named by a hash of the source,
the compiler, the flags and the CPU (it is built for this CPU with -march=native); later processes load the file.

Trust model: loading a library runs its code (its constructors first), and its name is computable by anyone, so
only a library that this user built from this source is loaded:
- The kernels directory must be private: a real directory (not a symlink) owned by the current user and not
  writable by group or others (created with mode 0700). Every directory above it, up to `/` (after resolving
  symlinks in the path of the cache root), must be owned by root or the user and not writable by group or others,
  as OpenSSH's StrictModes requires, with one deliberate exception: a sticky-bit directory such as `/tmp` is
  accepted as an ancestor (others cannot rename or delete entries there they do not own, and the entries below it
  are checked to be ours or root's), so HF_PTQ_CACHE may point under /tmp; never as the kernels directory itself.
  If the check fails, nothing is built or loaded there: one WARNING names the directory, its owner and mode and
  the fix, and the torch ops run. Directories we create are made with 0700; others are never chmod-ed.
- Each build records the SHA-256 of the library, and what it was built from, in `<name>.so.sha256` beside it
  (temporary file, fsync, rename). A cached library is loaded only when it and its record are regular files
  owned by the user, not writable by group or others, and the digest of the bytes read matches; otherwise it is
  rebuilt under a temporary name and renamed over it. The file is hashed through one open descriptor and that
  same inode is loaded, through `/proc/self/fd/<fd>`, so nothing can be swapped in between the check and dlopen.
  The descriptor stays open for the life of the process (ctypes never unloads libraries): glibc recognizes an
  already loaded library by its name, so a reused `/proc/self/fd/<n>` name would hand back an earlier library.
The record guards against corrupt, stale and foreign files, not against code running as this user, which could
write a matching record itself.

When it cannot be built or loaded (no compiler, another OS, an unsafe cache directory) or `HF_PTQ_NATIVE_KERNELS=0`,
`load` returns None once with a log line, and callers run their torch code, which computes the same bits.
`status(source)` says which path runs and why; `load` logs it at INFO once per process.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..folders.cache import cache_root

logger = logging.getLogger(__name__)

_SOURCES = Path(__file__).resolve().parent
_BASE_FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")
_COMPILE_TIMEOUT_S = 120
_RECORD_SUFFIX = ".sha256"
_RECORD_MAX_BYTES = 1 << 16
_PRIVATE_MODE = 0o700
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH

_RECORDS: dict[str, tuple[ctypes.CDLL | None, str]] = {}  # source -> (what `load` returned, what that means)
_PINNED_FDS: list[int] = []  # descriptors of the loaded libraries, kept open so their /proc/self/fd names stay theirs
_LOGGED: set[str] = set()


class UnsafeDirectory(Exception):
    """A cache directory that someone other than this user (or root) could write into; the message names the fix."""


class UntrustedLibrary(Exception):
    """A cached library that is not provably this user's build of this source (it is rebuilt)."""


class MissingRecord(UntrustedLibrary):
    """A cached library without a digest record (e.g. built by an older hf_ptq): rebuilt, logged at INFO only."""


def enabled() -> bool:
    """False when `HF_PTQ_NATIVE_KERNELS=0` (read on every call, so tests can switch it)."""
    on = os.environ.get("HF_PTQ_NATIVE_KERNELS", "1") != "0"
    if not on:
        _log_once("hf_ptq: HF_PTQ_NATIVE_KERNELS=0: C kernels off; using torch ops")
    return on


def status(source: str) -> str:
    """Which path runs for `source`: "C kernels loaded from <path> (...)" or "torch ops: <reason>"."""
    if not enabled():
        return "torch ops: HF_PTQ_NATIVE_KERNELS=0"
    lib = load(source)
    recorded = _RECORDS.get(source)
    if recorded is not None and recorded[0] is lib:
        return recorded[1]
    return "torch ops: not loaded" if lib is None else f"C kernels loaded ({lib._name})"


@functools.cache
def load(source: str) -> ctypes.CDLL | None:
    """The compiled library of `source` (a C file next to this module), or None when it cannot be had here;
    logs which of the two it is, with the reason."""
    lib, message, level = _load(source)
    _RECORDS[source] = (lib, message)
    logger.log(level, "hf_ptq: %s: %s", source, message)
    return lib


def _load(source: str) -> tuple[ctypes.CDLL | None, str, int]:
    """(library or None, status line, log level) for `load`."""
    if not sys.platform.startswith("linux"):
        return None, "torch ops: C kernels are built on Linux only", logging.INFO
    compiler = _compiler()
    if compiler is None:
        return None, "torch ops: no C compiler found (install gcc or set CC)", logging.INFO
    try:
        directory = private_directory(kernels_directory())
    except UnsafeDirectory as e:
        return None, f"torch ops: {e}", logging.WARNING
    code = (_SOURCES / source).read_bytes()
    errors = []
    for flags in _flag_choices():
        try:
            lib, message = _cached_or_built(code, source, compiler, flags, directory)
            return lib, message, logging.INFO
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(flags)}: {str(e).strip()[-300:]}")
    return None, f"torch ops: could not build {source} with {compiler}. {' | '.join(errors)}", logging.INFO


def _compiler() -> str | None:
    """The C compiler: $CC, else cc, gcc or clang on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _flag_choices() -> list[tuple[str, ...]]:
    """Compiler flags to try, fastest first: this CPU's instruction set, and OpenMP when torch itself uses
    OpenMP (so both share one runtime and its threads)."""
    openmp = ("-fopenmp",) if "parallel backend: OpenMP" in torch.__config__.parallel_info() else ()
    native = ("-march=native",) if platform.machine() in ("x86_64", "AMD64") else ("-mcpu=native",)
    choices = [_BASE_FLAGS + native + openmp, _BASE_FLAGS + native, _BASE_FLAGS]
    return list(dict.fromkeys(choices))


def build_key(code: bytes, compiler: str, flags: tuple[str, ...]) -> str:
    """SHA-256 hex of what a build depends on: the source, the compiler, the flags and the CPU."""
    return hashlib.sha256(b"\0".join([code, compiler.encode(), " ".join(flags).encode(), _cpu_id()])).hexdigest()


def library_name(source: str, key: str) -> str:
    """File name of the library of `source` built with `key` (see `build_key`)."""
    return f"{Path(source).stem}-{key[:16]}.so"


def kernels_directory() -> Path:
    """Where libraries are cached: `<HF_PTQ_CACHE or ~/.cache/hf_ptq>/kernels`."""
    return cache_root() / "kernels"


# --- the private cache directory ----------------------------------------------------------------------------------


def private_directory(path: Path) -> Path:
    """`path` (created with mode 0700 where missing, with any missing parents) once it and its ancestors are safe
    (module docstring), as the path to use from now on: its parent with symlinks resolved, then `path.name` (a
    symlink there is refused). Walks down from `/` through directory descriptors opened without following symlinks,
    checking each directory before anything is created in it. Later steps use the returned path: every directory on
    it is owned by root or us and writable by no one else (in a sticky one, others cannot rename our entries), so it
    keeps naming the directory checked here. Raises UnsafeDirectory."""
    target = Path(os.path.realpath(path.parent)) / path.name
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        _check_ancestor(os.fstat(fd), Path("/"))
        current = Path("/")
        for name in target.parts[1:]:
            current = current / name
            child = _open_or_make_directory(fd, name, current)
            os.close(fd)
            fd = child
            if current == target:
                _check_private(os.fstat(fd), current)
            else:
                _check_ancestor(os.fstat(fd), current)
    finally:
        os.close(fd)
    return target


def _open_or_make_directory(parent_fd: int, name: str, path: Path) -> int:
    """An O_PATH descriptor of directory `name` in `parent_fd`, made with mode 0700 when missing; never follows a
    symlink."""
    try:
        return _open_directory(parent_fd, name, path)
    except FileNotFoundError:
        pass
    try:
        os.mkdir(name, _PRIVATE_MODE, dir_fd=parent_fd)
    except FileExistsError:  # made by someone else meanwhile: checked like any existing directory
        return _open_directory(parent_fd, name, path)
    except OSError as e:
        raise UnsafeDirectory(f"cannot create {path} ({e.strerror}); set HF_PTQ_CACHE to a directory you own") from e
    _make_private(parent_fd, name, path)
    return _open_directory(parent_fd, name, path)


def _open_directory(parent_fd: int, name: str, path: Path) -> int:
    """An O_PATH descriptor of directory `name` in `parent_fd`; UnsafeDirectory for a symlink or a non-directory."""
    try:
        return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        what = "a symbolic link" if _is_symlink(parent_fd, name) else f"not a usable directory ({e.strerror})"
        raise UnsafeDirectory(
            f"not using kernel cache {path}: it is {what}; fix: remove it (hf_ptq then creates a private "
            f"directory there) or set HF_PTQ_CACHE to a private directory"
        ) from e


def _is_symlink(parent_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _make_private(parent_fd: int, name: str, path: Path) -> None:
    """Give the directory we just made exactly mode 0700, whatever the umask took away."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as e:
        raise UnsafeDirectory(f"cannot open {path}, just created ({e.strerror}); check your umask") from e
    try:
        os.fchmod(fd, _PRIVATE_MODE)
    finally:
        os.close(fd)


def _check_ancestor(st: os.stat_result, path: Path) -> None:
    """An ancestor of the kernels directory: owned by root or us, not writable by group / others unless sticky."""
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafeDirectory(
            _describe(path, st, "is owned by another user", "set HF_PTQ_CACHE under a directory you own")
        )
    if st.st_mode & _OTHERS_WRITE and not st.st_mode & stat.S_ISVTX:
        raise UnsafeDirectory(_describe(path, st, "is writable by group or others", f"chmod go-w {path}"))


def _check_private(st: os.stat_result, path: Path) -> None:
    """The kernels directory itself: owned by us, not writable by group / others (sticky or not)."""
    if st.st_uid != os.geteuid():
        raise UnsafeDirectory(_describe(path, st, "is owned by another user", f"remove {path} or set HF_PTQ_CACHE"))
    if st.st_mode & _OTHERS_WRITE:
        raise UnsafeDirectory(_describe(path, st, "is writable by group or others", f"chmod 700 {path}"))


def _describe(path: Path, st: os.stat_result, problem: str, fix: str) -> str:
    return (
        f"not using kernel cache {path}: it {problem} (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}; "
        f"you are uid {os.geteuid()}); fix: {fix}"
    )


# --- verified loading and building -------------------------------------------------------------------------------


def _cached_or_built(
    code: bytes, source: str, compiler: str, flags: tuple[str, ...], directory: Path
) -> tuple[ctypes.CDLL, str]:
    """The verified cached library for these flags, else a fresh build of it; with its status line."""
    key = build_key(code, compiler, flags)
    target = directory / library_name(source, key)
    try:
        fd, record = _open_verified(target, key)
    except FileNotFoundError:
        pass
    except UntrustedLibrary as e:
        level = logging.INFO if isinstance(e, MissingRecord) else logging.WARNING
        logger.log(level, "hf_ptq: not loading %s: %s; rebuilding it", target, e)
    else:
        return _dlopen(fd), f"C kernels loaded from {target} (built {record.get('built', '?')}, sha256 verified)"
    fd = _build(code, source, compiler, flags, target, key)
    return _dlopen(fd), f"C kernels loaded from {target} (built now)"


def _open_verified(target: Path, key: str) -> tuple[int, dict]:
    """An open descriptor of `target` whose bytes match its record for `key`, and the record.
    FileNotFoundError when there is no library; UntrustedLibrary when it or its record is not trusted."""
    fd = _open_owned_file(target)
    try:
        record = _read_record(_record_path(target))
        if record.get("key") != key:
            raise UntrustedLibrary("its digest record is for another build")
        if record.get("sha256") != _sha256(fd):
            raise UntrustedLibrary("its SHA-256 does not match its digest record")
    except BaseException:
        os.close(fd)
        raise
    return fd, record


def _open_owned_file(path: Path) -> int:
    """A read-only descriptor of `path`: a regular file (not a symlink) owned by us, not writable by group / others.
    FileNotFoundError when missing, UntrustedLibrary otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: a symlink
        raise UntrustedLibrary(f"cannot open {path.name} without following links ({e.strerror})") from e
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}"
    elif st.st_mode & _OTHERS_WRITE:
        problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem is not None:
        os.close(fd)
        raise UntrustedLibrary(f"{path.name} {problem}")
    return fd


def _read_record(path: Path) -> dict:
    """The digest record at `path`, under the same checks as the library; UntrustedLibrary when missing or bad."""
    try:
        fd = _open_owned_file(path)
    except FileNotFoundError:
        raise MissingRecord(f"it has no digest record {path.name}") from None
    try:
        data = os.read(fd, _RECORD_MAX_BYTES)
    finally:
        os.close(fd)
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise UntrustedLibrary(f"its digest record {path.name} is not readable")
    return record


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + _RECORD_SUFFIX)


def _sha256(fd: int) -> str:
    """SHA-256 hex of the whole file open as `fd` (read with pread: the file offset does not matter)."""
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _build(code: bytes, source: str, compiler: str, flags: tuple[str, ...], target: Path, key: str) -> int:
    """Compile `code` to a temporary name beside `target`, record its digest, rename it to `target`; an open
    descriptor of the built file (the inode to load, whatever happens to the name afterwards)."""
    tmp_fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".so.tmp")
    os.close(tmp_fd)
    try:
        _compile(code, compiler, flags, tmp)
        fd = _open_owned_file(Path(tmp))  # the compiler may have replaced the file: check what is there now
        try:
            os.fchmod(fd, _PRIVATE_MODE)
            os.fsync(fd)
            record = _build_record(code, source, compiler, flags, key, _sha256(fd))
            os.replace(tmp, target)
            _write_record(_record_path(target), record)
        except BaseException:
            os.close(fd)
            raise
    except UntrustedLibrary as e:
        raise OSError(str(e)) from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return fd


def _compile(code: bytes, compiler: str, flags: tuple[str, ...], output: str) -> None:
    try:
        subprocess.run(
            [compiler, *flags, "-x", "c", "-", "-o", output],
            input=code,
            check=True,
            capture_output=True,
            timeout=_COMPILE_TIMEOUT_S,
        )
    except subprocess.CalledProcessError as e:
        raise subprocess.SubprocessError(e.stderr.decode(errors="replace")) from None


def _build_record(code: bytes, source: str, compiler: str, flags: tuple[str, ...], key: str, sha256: str) -> dict:
    """What the digest record holds: the library's digest and what it was built from."""
    return {
        "sha256": sha256,
        "key": key,
        "source": source,
        "source_sha256": hashlib.sha256(code).hexdigest(),
        "compiler": compiler,
        "flags": list(flags),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_record(path: Path, record: dict) -> None:
    """Write `record` as JSON to `path` atomically: a temporary file beside it, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _dlopen(fd: int) -> ctypes.CDLL:
    """Load exactly the file open as `fd`; the descriptor is kept open (module docstring) unless loading fails."""
    try:
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except BaseException:
        os.close(fd)
        raise
    _PINNED_FDS.append(fd)
    return lib


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


def _cpu_id() -> bytes:
    """What -march=native depends on: the machine and the CPU's feature flags."""
    flags = b""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            flags = next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    except OSError:
        pass
    return platform.machine().encode() + flags
