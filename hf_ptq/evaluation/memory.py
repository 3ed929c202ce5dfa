"""Memory and size: process RSS, bytes a model holds, and tensor bytes in a saved safetensors checkpoint."""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import threading
from pathlib import Path

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (`getrusage(RUSAGE_SELF).ru_maxrss`), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    """Current resident set size of this process in bytes (Linux `/proc/self/statm`; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def high_water_rss_bytes() -> int:
    """Peak RSS of this process since it started or since `reset_high_water_rss()` (Linux `VmHWM`), in bytes.

    Unlike `ru_maxrss`, which a child inherits from its parent across fork + exec, `VmHWM` starts with the process.
    Elsewhere: `peak_rss_bytes()`.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def reset_high_water_rss() -> bool:
    """Reset `VmHWM` to the current RSS (Linux `/proc/self/clear_refs`), so the next reading covers what follows;
    False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tree_bytes(obj: object, _seen: set[int] | None = None) -> int:
    """Bytes of the tensors in `obj` and in the tensor-valued attributes quantized parameters carry.

    Counts a tensor itself plus, duck-typed, bitsandbytes' side tensors: `quant_state` (absmax, code, nested
    state) of 4-bit weights and `SCB` (row scales) of 8-bit weights, which are not parameters or buffers.
    """
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.device.type != "meta" else id(obj)
        total = 0
        if key not in seen:
            seen.add(key)
            total += obj.numel() * obj.element_size()
        for attr in ("quant_state", "SCB"):
            total += tree_bytes(getattr(obj, attr, None), seen)
        return total
    if isinstance(obj, dict):
        return sum(tree_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tree_bytes(v, seen) for v in obj)
    if obj is not None and hasattr(obj, "as_dict"):  # bitsandbytes QuantState
        return tree_bytes(obj.as_dict(packed=False), seen)
    return 0


def model_bytes(model: torch.nn.Module) -> int:
    """In-memory size of a model: bytes of its parameters and buffers (shared storage counted once)."""
    seen: set[int] = set()
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tree_bytes(t, seen) for t in tensors)


def full_precision_weights(model: torch.nn.Module) -> tuple[dict[str, int], str]:
    """({part: bytes}, dtype name) of the weights `model` keeps in floating point, quantized or not: "embedding",
    "lm_head" (its own; "embedding and lm_head (tied)" when shared) and "N other layers" (Linears left whole: norms
    and biases are not counted). Quantized layers hold integer tensors and no float `weight` parameter."""
    seen: set[int] = set()
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    parts: dict[str, int] = {}
    others, other_bytes, dtypes = 0, 0, set()
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is None or not weight.is_floating_point() or weight.dim() < 2:
            continue
        size = tree_bytes(weight, seen)
        if size == 0:  # shared with a part counted before (a tied lm_head)
            if module is outputs and "embedding" in parts:
                parts["embedding and lm_head (tied)"] = parts.pop("embedding")
            continue
        dtypes.add(str(weight.dtype).removeprefix("torch."))
        if module is inputs:
            parts["embedding"] = size
        elif module is outputs:
            parts["lm_head"] = size
        else:
            others, other_bytes = others + 1, other_bytes + size
    if others:
        parts[f"{others} other layer{'s' * (others != 1)}"] = other_bytes
    return parts, "/".join(sorted(dtypes))


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def safetensors_sizes(folder: str | Path) -> dict[str, int]:
    """{tensor name: bytes on disk} for every tensor of the `*.safetensors` files in `folder` (headers only)."""
    sizes: dict[str, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for name, info in _safetensors_header(path).items():
            start, end = info["data_offsets"]
            sizes[name] = end - start
    return sizes


def linear_weight_bytes(sizes: dict[str, int], module_names: list[str]) -> int:
    """Bytes of every tensor stored under `<module>.` for the given module names (weights, scales, zeros, bias)."""
    prefixes = tuple(name + "." for name in module_names)
    return sum(size for name, size in sizes.items() if name.startswith(prefixes))


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes on disk of the `*.safetensors` files in `folder` (headers included)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors `save_pretrained` writes: the state dict, shared storage (tied weights) counted once."""
    return tree_bytes(list(model.state_dict().values()))


class PeakMemory:
    """Peak memory used inside a `with` block, above the level at its start, in bytes (`.bytes`).

    On a CUDA device: `torch.cuda.max_memory_allocated` over the block. On CPU: the process RSS, sampled every
    `interval_s` by a background thread (torch releases the GIL in its kernels), so an earlier, higher peak of the
    process does not hide this block's.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.005) -> None:
        self.device, self.interval_s, self.bytes = torch.device(device), interval_s, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._peak = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, current_rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self.bytes = max(self._peak, current_rss_bytes()) - self._start
