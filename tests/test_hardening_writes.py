"""Promises about what hf_ptq writes: a kill or an error at any moment leaves the old version or the new one,
never neither and never a mix; nothing that is not a model is replaced.

- `save_pretrained` of a quantized model and `export` over an existing folder, stopped (`os._exit`, as by
  `kill -9`) or failed (an OSError) at each of their filesystem changes in turn: the folder holds the old or the new
  version exactly, loads, and keeps the files `save_pretrained` does not write (a tokenizer);
- without `renameat2` (two renames), the one window where the folder is missing is repaired by the next write,
  `hf_ptq.verify` or load: the old version comes back;
- leftovers of crashed writers are cleaned, those of live writers are not;
- two processes writing the same new folder with overwrite=False: exactly one wins, the other gets
  FileExistsError;
- overwrite replaces only a folder that holds a model; the current folder, the home folder, a root, a symlink are
  refused before any work; outputs get the usual permissions (umask), not 0700.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAMILIES, assert_same_model
from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq.folders import check_output_folder, recover_folder, staged_folder
from hf_ptq.folders.locks import FolderLock

TESTS = Path(__file__).resolve().parent


def _crash_runs(tmp_path: Path, *args: str) -> list[dict]:
    """Outcomes of tests/crash_driver.py: one write interrupted at each of its steps in turn."""
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    done = subprocess.run(
        [sys.executable, str(TESTS / "crash_driver.py"), str(tmp_path), *args],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_old_or_new(runs: list[dict], kind: str, killed: bool) -> None:
    assert len(runs) >= 10, "too few steps were interrupted: the fault injection did not reach the write"
    assert runs[-1]["code"] == 0 and all(r["code"] != 0 for r in runs[:-1])
    assert {r["after"] for r in runs} == {"old", "new"}  # interrupted early: old; late: new
    assert all(not r["leftovers"] for r in runs), [r for r in runs if r["leftovers"]]
    if kind == "save":
        assert all(r["loads_same_logits"] and r["extra_kept"] for r in runs)
    if killed:
        assert all(r["code"] == 137 for r in runs[:-1])


def test_kill_at_every_step_of_save_pretrained(tmp_path):
    runs = _crash_runs(tmp_path, "save", "exit")
    _assert_old_or_new(runs, "save", killed=True)
    assert all(r["before"] in ("old", "new") for r in runs)  # one atomic exchange: never missing, never mixed


def test_kill_at_every_step_of_save_pretrained_without_renameat2(tmp_path):
    runs = _crash_runs(tmp_path, "save", "exit", "--no-exchange")
    _assert_old_or_new(runs, "save", killed=True)
    assert all(r["before"] in ("old", "new", "missing") for r in runs)
    missing = [r for r in runs if r["before"] == "missing"]
    assert missing and all(r["after"] == "old" and r["recovered"] for r in missing)


def test_error_at_every_step_of_save_pretrained(tmp_path):
    runs = _crash_runs(tmp_path, "save", "raise")
    _assert_old_or_new(runs, "save", killed=False)
    assert all(r["before"] == r["after"] for r in runs)  # an exception needs no repair


def test_kill_at_every_step_of_export(tmp_path):
    _assert_old_or_new(_crash_runs(tmp_path, "export", "exit"), "export", killed=True)


def _write_in_child(target: str, barrier, marker: str) -> None:
    """Child process: stage a folder, wait until the other writer has staged too, then commit (overwrite=False)."""
    try:
        with staged_folder(target) as staging:
            (staging / "config.json").write_text(marker)
            barrier.wait(timeout=30)
    except FileExistsError:
        os._exit(17)
    os._exit(0)


def test_concurrent_writers_exactly_one_wins(tmp_path):
    target = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    writers = [ctx.Process(target=_write_in_child, args=(str(target), barrier, f"writer {i}")) for i in (0, 1)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    codes = sorted(w.exitcode for w in writers)
    assert codes == [0, 17]
    winner = next(i for i, w in enumerate(writers) if w.exitcode == 0)
    assert (target / "config.json").read_text() == f"writer {winner}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_only_model_folders(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(_saved_float(tmp_path), quantization_config=_rtn())
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    (thesis / "id_rsa").write_text("secret")
    (thesis / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"holds files that are not part of a model \(chapter1.tex, id_rsa\)"):
        hf_ptq.export(model, thesis, format="compressed-tensors", overwrite=True)
    assert sorted(p.name for p in thesis.iterdir()) == ["chapter1.tex", "config.json", "id_rsa"]
    export = hf_ptq.export(model, tmp_path / "export", format="compressed-tensors")
    hf_ptq.export(model, export, format="compressed-tensors", overwrite=True)  # a model folder: replaced
    with pytest.raises(FileExistsError, match="exists and is not empty: pass overwrite"):
        hf_ptq.export(model, export, format="compressed-tensors")


@pytest.mark.parametrize("where", ["cwd", "parent", "home", "root", "symlink"])
def test_unreplaceable_targets_are_refused_before_any_work(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    target = {"cwd": ".", "parent": "..", "home": str(Path.home()), "root": "/", "symlink": str(tmp_path / "link")}
    with pytest.raises(ValueError, match="cannot be written|symbolic link"):
        check_output_folder(target[where], overwrite=True)
    with pytest.raises(ValueError, match="cannot be written|symbolic link"):
        hf_ptq.export(object(), target[where], overwrite=True)  # refused before the model is even looked at


def _saved_float(tmp_path: Path) -> Path:
    folder = tmp_path / "float"
    if not folder.exists():
        FAMILIES["llama"].build().save_pretrained(folder)
    return folder


def _rtn():
    return hf_ptq.PtqConfig(method="rtn", bits=4, group_size=32)


def test_save_pretrained_keeps_other_files_and_drops_stale_weights(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(_saved_float(tmp_path), quantization_config=_rtn())
    out = tmp_path / "q"
    model.save_pretrained(out, max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").exists()
    (out / "tokenizer.json").write_text("{}")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main")
    model.save_pretrained(out)  # one file now: the old shards and their index must not survive beside it
    names = sorted(p.name for p in out.iterdir())
    assert names == [".git", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main"
    assert_same_model(AutoModelForCausalLM.from_pretrained(out), model)


def test_save_pretrained_into_the_current_folder_is_refused(tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(_saved_float(tmp_path), quantization_config=_rtn())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="save_directory='.' cannot be written: it is the current folder"):
        model.save_pretrained(".")


def test_leftovers_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("current")
    dead = tmp_path / ".out.partial-dead0000"
    live = tmp_path / ".out.partial-live0000"
    other = tmp_path / ".other.partial-dead0000"  # belongs to another target: not touched
    for folder in (dead, live, other):
        folder.mkdir()
    lock = FolderLock(live)  # a live writer holds the lock of its staging folder
    try:
        actions = recover_folder(target)
        assert len(actions) == 1 and "removed .out.partial-dead0000" in actions[0]
        assert not dead.exists() and live.exists() and other.exists()
    finally:
        lock.release()
    assert recover_folder(target) and not live.exists()


def test_interrupted_swap_is_restored_by_verify(tmp_path):
    """The window of the two-rename swap: the old version set aside, the new one not yet in place."""
    model = AutoModelForCausalLM.from_pretrained(_saved_float(tmp_path), quantization_config=_rtn())
    target = tmp_path / "q"
    model.save_pretrained(target)
    aside = tmp_path / ".q.old-0a1b2c3d"
    target.rename(aside)
    staging = tmp_path / ".q.partial-abcdefgh"  # the new version, its writer killed
    staging.mkdir()
    report = hf_ptq.verify(target)
    assert any("restored" in note for note in report.notes)
    assert not aside.exists() and not staging.exists()
    assert_same_model(AutoModelForCausalLM.from_pretrained(target), model)


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with staged_folder(tmp_path / "out") as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
