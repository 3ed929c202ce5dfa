"""The compiled-kernel cache loads only a library this user built from this source: planted, corrupt, foreign or
symlinked files are rebuilt (never loaded), and unsafe cache directories are refused (torch ops run).

Each test gets its own HF_PTQ_CACHE and a cleared `native.load` cache (cleared again afterwards)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_ptq.kernels import native, w8a8

SOURCE = "w8a8_cpu.c"
OTHER_UID = 12345
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh HF_PTQ_CACHE (not yet created) with `native.load` uncached; the C kernels on."""
    if not sys.platform.startswith("linux") or native._compiler() is None:
        pytest.skip("the C kernels need Linux and a C compiler")
    monkeypatch.setenv("HF_PTQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_PTQ_NATIVE_KERNELS", raising=False)
    native.load.cache_clear()
    yield tmp_path / "cache"
    native.load.cache_clear()


def expected_target() -> Path:
    """Where `load` puts the library built with its first (preferred) flags, through the module's own naming."""
    key = native.build_key((native._SOURCES / SOURCE).read_bytes(), native._compiler(), native._flag_choices()[0])
    return native.kernels_directory() / native.library_name(SOURCE, key)


def make_private(directory: Path) -> None:
    directory.mkdir(parents=True, mode=0o700)
    directory.chmod(0o700)


def plant(target: Path, marker: Path) -> None:
    """Compile, at `target`, a library whose constructor creates `marker` (and which has no W8A8 functions)."""
    constructor = f'fclose(fopen({json.dumps(str(marker))}, "w"));'
    code = f"#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {{ {constructor} }}\n"
    subprocess.run(
        [native._compiler(), "-shared", "-fPIC", "-x", "c", "-", "-o", str(target)], input=code.encode(), check=True
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def write_record(target: Path, digest: str, key: str | None = None) -> None:
    key = key or native.build_key(
        (native._SOURCES / SOURCE).read_bytes(), native._compiler(), native._flag_choices()[0]
    )
    record_path(target).write_text(json.dumps({"sha256": digest, "key": key}))
    record_path(target).chmod(0o600)


def loaded_inode(lib: ctypes.CDLL) -> int:
    """Inode of the file mapped where `lib`'s quantize_per_token_bf16 lives (/proc/self/maps)."""
    address = ctypes.cast(lib.quantize_per_token_bf16, ctypes.c_void_p).value
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _perms, _offset, _dev, inode, *_ = line.split()
        start, end = (int(v, 16) for v in span.split("-"))
        if start <= address < end:
            return int(inode)
    raise AssertionError("quantize_per_token_bf16 is not in any mapping")


def assert_real_build_loaded(lib: ctypes.CDLL | None, target: Path) -> None:
    """`lib` is exactly the file now at `target`, a private regular file matching its digest record, and its
    W8A8 quantization gives the torch ops' bits."""
    assert lib is not None
    st = target.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022
    assert loaded_inode(lib) == st.st_ino
    record = json.loads(record_path(target).read_text())
    assert record["sha256"] == sha256(target) and record["source"] == SOURCE
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    q, scale = w8a8._CKernels(lib, torch.bfloat16, torch.bfloat16).quantize(x, None, w8a8.Workspace())
    ref_q, ref_scale = w8a8.quantize_per_token(x)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


# --- the normal path ---------------------------------------------------------------------------------------------


def test_first_load_builds_private_files_and_the_next_verifies_them(cache: Path, caplog) -> None:
    with caplog.at_level("INFO", logger=native.__name__):
        lib = native.load(SOURCE)
        assert native.load(SOURCE) is lib
    target = expected_target()
    assert_real_build_loaded(lib, target)
    assert native.status(SOURCE) == f"C kernels loaded from {target} (built now)"
    assert [r.getMessage() for r in caplog.records] == [f"hf_ptq: {SOURCE}: C kernels loaded from {target} (built now)"]
    assert stat.S_IMODE(cache.stat().st_mode) == stat.S_IMODE((cache / "kernels").stat().st_mode) == 0o700
    built = target.stat().st_ino

    native.load.cache_clear()  # a later process
    again = native.load(SOURCE)
    assert target.stat().st_ino == built  # not rebuilt
    assert_real_build_loaded(again, target)
    assert native.status(SOURCE).startswith(f"C kernels loaded from {target} (built ")
    assert native.status(SOURCE).endswith("sha256 verified)")


def test_two_loads_in_one_process_load_two_files(cache: Path, tmp_path: Path, monkeypatch) -> None:
    """glibc finds loaded libraries by name: a reused /proc/self/fd/<n> name must not hand back the first one."""
    first = native.load(SOURCE)
    first_target = expected_target()
    monkeypatch.setenv("HF_PTQ_CACHE", str(tmp_path / "second"))
    native.load.cache_clear()
    second = native.load(SOURCE)
    assert_real_build_loaded(second, expected_target())
    assert loaded_inode(first) == first_target.stat().st_ino != loaded_inode(second)


def test_status_names_the_torch_ops_fallbacks(cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_PTQ_NATIVE_KERNELS", "0")
    assert native.status(SOURCE) == "torch ops: HF_PTQ_NATIVE_KERNELS=0"
    monkeypatch.delenv("HF_PTQ_NATIVE_KERNELS")
    monkeypatch.setattr(native.sys, "platform", "darwin")
    assert native.load(SOURCE) is None
    assert native.status(SOURCE) == "torch ops: C kernels are built on Linux only"
    assert not cache.exists()


# --- files in the cache that are not our build --------------------------------------------------------------------


def forge(case: str, target: Path, tmp_path: Path, marker: Path) -> None:
    """Put a planted library at `target`, with a digest record (or none) as described by `case`."""
    make_private(target.parent)
    if case == "symlinked library":
        plant(tmp_path / "evil.so", marker)
        target.symlink_to(tmp_path / "evil.so")
    else:
        plant(target, marker)
    digest = sha256(target)
    if case == "no record":
        return
    if case == "wrong digest":
        write_record(target, hashlib.sha256(b"something else").hexdigest())
    elif case == "record of another build":
        write_record(target, digest, key="0" * 64)
    elif case == "symlinked record":
        write_record(tmp_path / "evil.so", digest)
        record_path(target).symlink_to(record_path(tmp_path / "evil.so"))
    else:
        write_record(target, digest)  # a matching record: only ownership and modes can tell
        if case == "group-writable library":
            target.chmod(0o775)
        elif case == "library owned by another user":
            os.chown(target, OTHER_UID, -1)
        elif case == "record owned by another user":
            os.chown(record_path(target), OTHER_UID, -1)
        elif case == "symlinked library":
            pass
        else:
            raise ValueError(case)


PLANTED = [
    "no record",
    "wrong digest",
    "record of another build",
    "symlinked record",
    "symlinked library",
    "group-writable library",
    pytest.param("library owned by another user", marks=needs_root),
    pytest.param("record owned by another user", marks=needs_root),
]


@pytest.mark.parametrize("case", PLANTED)
def test_a_planted_library_is_rebuilt_not_loaded(cache: Path, tmp_path: Path, case: str, caplog) -> None:
    marker = tmp_path / "constructor-ran"
    target = expected_target()
    forge(case, target, tmp_path, marker)
    with caplog.at_level("INFO", logger=native.__name__):
        lib = native.load(SOURCE)
    assert not marker.exists(), "the planted library's constructor ran"
    assert_real_build_loaded(lib, target)
    assert f"not loading {target}" in caplog.text and "rebuilding it" in caplog.text
    assert native.status(SOURCE) == f"C kernels loaded from {target} (built now)"


def test_a_library_that_does_not_match_its_digest_is_rebuilt(cache: Path, caplog) -> None:
    native.load(SOURCE)
    target = expected_target()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped = target.with_name("flipped")
    flipped.write_bytes(bytes(data))
    flipped.chmod(0o700)
    os.replace(flipped, target)  # a new inode: the loaded library's pages stay as they are
    flipped_inode = target.stat().st_ino
    native.load.cache_clear()
    with caplog.at_level("WARNING", logger=native.__name__):
        lib = native.load(SOURCE)
    assert "SHA-256 does not match its digest record" in caplog.text
    assert target.stat().st_ino != flipped_inode
    assert_real_build_loaded(lib, target)


# --- unsafe cache directories --------------------------------------------------------------------------------------


def unsafe(case: str, cache: Path, tmp_path: Path) -> Path:
    """Make the cache unsafe as `case` says; the directory the refusal must name."""
    kernels = cache / "kernels"
    if case == "symlinked kernels dir":
        make_private(cache)
        make_private(tmp_path / "elsewhere")
        kernels.symlink_to(tmp_path / "elsewhere")
        return kernels
    make_private(kernels)
    changes = {
        "world-writable kernels dir": (kernels, 0o777, None),
        "sticky world-writable kernels dir": (kernels, 0o1777, None),
        "group-writable kernels dir": (kernels, 0o770, None),
        "world-writable ancestor": (cache, 0o777, None),
        "kernels dir owned by another user": (kernels, None, OTHER_UID),
        "ancestor owned by another user": (cache, None, OTHER_UID),
    }
    path, mode, uid = changes[case]
    if mode is not None:
        path.chmod(mode)
    if uid is not None:
        os.chown(path, uid, -1)
    return path


UNSAFE = [
    "world-writable kernels dir",
    "sticky world-writable kernels dir",
    "group-writable kernels dir",
    "world-writable ancestor",
    "symlinked kernels dir",
    pytest.param("kernels dir owned by another user", marks=needs_root),
    pytest.param("ancestor owned by another user", marks=needs_root),
]


@pytest.mark.parametrize("case", UNSAFE)
def test_an_unsafe_cache_directory_is_refused(cache: Path, tmp_path: Path, case: str, caplog) -> None:
    named = unsafe(case, cache, tmp_path)
    kernels = (cache / "kernels").resolve()
    marker = tmp_path / "constructor-ran"
    planted = kernels / expected_target().name
    plant(planted, marker)
    write_record(planted, sha256(planted))
    before = {p.name: p.lstat() for p in kernels.iterdir()}
    modes = {p: p.lstat().st_mode for p in (cache, cache / "kernels")}
    with caplog.at_level("INFO", logger=native.__name__):
        assert native.load(SOURCE) is None
    assert not marker.exists()
    assert {p.name: p.lstat() for p in kernels.iterdir()} == before  # nothing built or replaced there
    assert {p: p.lstat().st_mode for p in modes} == modes  # nothing chmod-ed
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"not using kernel cache {named}" in warnings[0] and "fix:" in warnings[0]
    assert native.status(SOURCE).startswith(f"torch ops: not using kernel cache {named}")


def test_a_sticky_world_writable_ancestor_is_accepted(cache: Path, monkeypatch) -> None:
    """Like /tmp: HF_PTQ_CACHE may live under a sticky directory (the kernels dir itself must still be private)."""
    shared = cache.parent / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    cache = shared / "cache"
    monkeypatch.setenv("HF_PTQ_CACHE", str(cache))
    assert_real_build_loaded(native.load(SOURCE), expected_target())
    assert stat.S_IMODE((cache / "kernels").stat().st_mode) == 0o700


def test_directories_we_create_get_mode_0700_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o277)
    try:
        path = native.private_directory(tmp_path / "a" / "b" / "kernels")
    finally:
        os.umask(previous)
    assert path == tmp_path.resolve() / "a" / "b" / "kernels"
    for directory in (tmp_path / "a", tmp_path / "a" / "b", path):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_an_existing_private_directory_keeps_its_mode(tmp_path: Path) -> None:
    """A directory the user made (0755 from an older hf_ptq) is used as it is, not chmod-ed."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels").chmod(0o755)
    native.private_directory(tmp_path / "kernels")
    assert stat.S_IMODE((tmp_path / "kernels").stat().st_mode) == 0o755
