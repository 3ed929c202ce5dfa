"""Fault injection for the crash-safety tests (run as a script by tests/test_hardening_writes.py).

A write (hf_ptq's `save_pretrained` or `export`) of a new version over an old one is run again and again in a
forked child that an audit hook stops at its k-th filesystem change (k = 1, 2, ... until the write completes):
`os._exit` (as `kill -9` would) or an OSError raised from the operation. After each child the parent records what
the target folder holds before any repair ("old", "new", "missing"), repairs with `recover_folder`, checks that
what is there then is the old or the new version exactly (verified by `hf_ptq.verify`, loaded by `from_pretrained`,
same tensors and logits) and that nothing is left beside it. Prints one JSON object: the outcome per k.

Usage: python crash_driver.py WORKDIR {save,export} {exit,raise} [--no-exchange]
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # no OpenMP pool before fork()

import transformers  # noqa: E402
from conftest import FAMILIES, input_ids, model_output  # noqa: E402
from safetensors import safe_open  # noqa: E402

import hf_ptq  # noqa: E402
from hf_ptq.folders import recover_folder, staging  # noqa: E402

KILLED = 137
_MUTATING = {
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "os.link",
    "os.symlink",
    "os.chmod",
    "os.truncate",
    "shutil.rmtree",
    "shutil.copyfile",
    "shutil.copytree",
    "ctypes.call_function",  # renameat2
}


class FaultAt:
    """Audit hook: at the k-th filesystem change of this process, exit at once or make the operation fail."""

    def __init__(self, k: int, action: str) -> None:
        self.k, self.action, self.count = k, action, 0

    def __call__(self, event: str, args: tuple) -> None:
        if event == "open":  # args: (path, mode str or None, flags int)
            mode, flags = args[1], args[2]
            write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
            writes = isinstance(mode, str) and any(c in mode for c in "wax+")
            if not (writes or (isinstance(flags, int) and flags & write_flags)):
                return
        elif event not in _MUTATING:
            return
        self.count += 1
        if self.count == self.k:
            if self.action == "exit":
                os._exit(KILLED)
            raise OSError(errno.EIO, f"injected fault #{self.k} at {event}")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k).clone() for k in f.keys()})
    return out


def snapshot(folder: Path) -> dict:
    """What must be identical between two copies of one version."""
    return {"config": (folder / "config.json").read_bytes(), "tensors": tensors(folder)}


def same(a: dict, b: dict) -> bool:
    if a["config"] != b["config"] or a["tensors"].keys() != b["tensors"].keys():
        return False
    return all(torch.equal(v, b["tensors"][k]) for k, v in a["tensors"].items())


def which(folder: Path, versions: dict[str, dict]) -> str:
    if not folder.exists():
        return "missing"
    try:
        found = snapshot(folder)
    except Exception as err:  # noqa: BLE001  (a torn folder is a failure to report, not to crash on)
        return f"unreadable: {type(err).__name__}: {err}"
    return next((name for name, v in versions.items() if same(found, v)), "mixed")


def quantized(seed: int):
    base = Path(os.environ["WORK"]) / f"float-{seed}"
    if not base.exists():
        FAMILIES["llama"].build(seed=seed).save_pretrained(base)
    cfg = hf_ptq.PtqConfig(method="rtn", bits=4, group_size=32)
    return transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg)


def main() -> None:
    work, kind, action = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["WORK"] = str(work)
    if "--no-exchange" in sys.argv:
        staging.exchange = lambda a, b: False  # the two-rename fallback of systems without renameat2
    old_model, new_model = quantized(0), quantized(1)
    target, pristine = work / "target", work / "pristine"
    extra = "tokenizer.json"

    def write(model, folder: Path) -> None:
        if kind == "save":
            model.save_pretrained(folder, max_shard_size="60KB")  # several shards: more steps to interrupt
        else:
            hf_ptq.export(model, folder, format="compressed-tensors", overwrite=True)

    write(old_model, pristine)
    (pristine / extra).write_text('{"kept": true}')
    reference = work / "reference-new"
    write(new_model, reference)
    versions = {"old": snapshot(pristine), "new": snapshot(reference)}
    ids = input_ids()
    logits = {"old": model_output(old_model, ids), "new": model_output(new_model, ids)}
    if kind == "export":
        logits = {}  # exports are read by compressed-tensors, not by hf_ptq's quantizer
    outcomes = []
    for k in range(1, 500):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(pristine, target)
        pid = os.fork()
        if pid == 0:
            hook = FaultAt(k, action)
            sys.addaudithook(hook)
            try:
                write(new_model, target)
            except OSError:
                os._exit(1)
            os._exit(0 if hook.count < k else 2)  # 2: the fault happened and was handled
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        before = which(target, versions)
        left_before = sorted(p.name for p in work.iterdir() if p.name.startswith(".target."))
        recovered = recover_folder(target)
        after = which(target, versions)
        leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith(".target."))
        loads = None
        if after in logits:
            hf_ptq.verify(target)
            model = transformers.AutoModelForCausalLM.from_pretrained(target)
            loads = bool(torch.equal(model_output(model, ids), logits[after]))
        kept = (target / extra).exists() if kind == "save" and after in versions else None
        outcomes.append(
            {"k": k, "code": code, "before": before, "after": after, "recovered": len(recovered)}
            | {"leftovers_before": left_before, "leftovers": leftovers, "loads_same_logits": loads, "extra_kept": kept}
        )
        if code == 0:
            break
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main()
