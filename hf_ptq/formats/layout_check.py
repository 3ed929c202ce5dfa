"""Does a checkpoint hold exactly what hf_ptq's quantized modules need? Checked from the safetensors headers and
the small tensors (scales, zero points, g_idx, shapes) before any weight is loaded.

The expectation is the model itself, built on the meta device with its quantized modules in place
(`PtqHfQuantizer` replaces them from the saved config): each module's `state_dict()` lists the tensors it must get
from the file, with their shapes and dtypes. A problem names the module, the tensor, the file and, where the saved
config disagrees with the tensors, the config field.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..nn import EMBEDDING_MODULES, QuantLinear, W8A8Linear
from ..nn.quant_embedding import PackedRows, TiedQuantHead
from .safetensors_file import CheckpointError, SafetensorsHeader
from .third_party.shell import CheckpointLinear

# modules whose tensors the checkpoint must match
CHECKED_MODULES = (QuantLinear, W8A8Linear, CheckpointLinear, *EMBEDDING_MODULES)

QUANTIZED_TENSORS = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_g_idx",
    "input_scale",
    "qweight",  # GPTQ / AWQ
    "qzeros",
)
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _explain_embedding(module: nn.Module, tensor: str, config: Any) -> str:
    """Which config field says whether (and how) a quantized embedding / head has `tensor`."""
    fmt = getattr(config, "embeddings", None)
    if isinstance(module, TiedQuantHead):
        if tensor == "bias":
            return "the model's architecture (its config) says whether this layer has a bias"
        return (
            "the head is tied to the input embedding (config.json's tie_word_embeddings), whose packed tensors it "
            "uses; a tied head has none of its own"
        )
    grid = "one scale per row" if module.group_size == -1 else f"one scale per {module.group_size} values of a row"
    return {
        "weight_packed": f"the config says embeddings={fmt!r} ({module.bits}-bit)",
        "weight_scale": f"the config says embeddings={fmt!r}: {grid}",
        "weight_zero_point": f"the config says embeddings={fmt!r} with sym={module.sym}",
        "weight_shape": "the model's config gives this matrix's (vocab, hidden)",
        "weight": f"the config says embeddings={fmt!r}: this matrix is stored packed",
        "bias": "the model's architecture (its config) says whether this layer has a bias",
    }.get(tensor, "hf_ptq's quantized embeddings hold no such tensor")


def _explain(module: nn.Module, tensor: str, config: Any) -> str:
    """Which config field says whether (and how) `module` has `tensor`."""
    if isinstance(module, CheckpointLinear):
        return module.explain(tensor)
    if isinstance(module, EMBEDDING_MODULES):
        return _explain_embedding(module, tensor, config)
    if isinstance(module, W8A8Linear):
        if tensor == "input_scale":
            return f"the config says activations={config.activations!r}"
        return "SmoothQuant W8A8 layers hold an int8 `weight` [out, in] and `weight_scale` [out, 1]"
    return {
        "weight_packed": f"the config says bits={module.bits}",
        "weight_scale": f"the config says group_size={module.group_size}",
        "weight_zero_point": f"the config says sym={module.sym}"
        + (", method='hqq' (float zero points)" if module.float_zero_point else ""),
        "weight_g_idx": f"the config says desc_act={getattr(config, 'desc_act', None)}",
        "weight_shape": "the model's config gives this layer's (out, in)",
        "weight": f"the config's modules_to_not_convert={getattr(config, 'modules_to_not_convert', None)!r} does not "
        "keep this layer in full precision",
        "bias": "the model's architecture (its config) says whether this layer has a bias",
    }.get(tensor, "hf_ptq's quantized layers hold no such tensor")


def _files_named(headers: list[SafetensorsHeader]) -> str:
    if len(headers) == 1:
        return headers[0].path.name
    return f"any of the {len(headers)} checkpoint files ({headers[0].path.parent})"


def _dtype_ok(expected: torch.dtype, found: str) -> bool:
    got = _SAFETENSORS_DTYPES.get(found)
    if got is None:
        return False
    return got.is_floating_point if expected.is_floating_point else got == expected


def check_layout(model: nn.Module, config: Any, headers: list[SafetensorsHeader]) -> list[str]:
    """Problems (one line each) of the tensors `headers` hold for the quantized modules of `model` (on meta)."""
    where = {name: h for h in headers for name in h.tensors}
    by_module: dict[str, set[str]] = defaultdict(set)  # module name -> the tensors the files hold directly under it
    for name in where:
        prefix, _, tensor = name.rpartition(".")
        by_module[prefix].add(tensor)
    modules = dict(model.named_modules())
    problems = []
    for prefix, module in modules.items():
        if isinstance(module, CHECKED_MODULES):
            problems += _module_problems(prefix, module, config, by_module[prefix], where, headers)
    embeddings = _embedding_owners(model)
    for name, header in where.items():  # quantized tensors under a layer the config keeps in full precision
        prefix, _, tensor = name.rpartition(".")
        owner = modules.get(prefix)
        if tensor in QUANTIZED_TENSORS and owner is not None and not isinstance(owner, CHECKED_MODULES):
            field = (
                f"embeddings={getattr(config, 'embeddings', None)!r}"
                if any(owner is e for e in embeddings)
                else f"modules_to_not_convert={getattr(config, 'modules_to_not_convert', None)!r}"
            )
            problems.append(
                f"{name} in {header.path.name}: {prefix} is quantized in the checkpoint, but the config keeps it "
                f"in full precision ({field})"
            )
    return problems


def _embedding_owners(model: nn.Module) -> list[nn.Module]:
    """The input embedding and output head of `model` (those it has)."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            found.append(module)
    return found


def _module_problems(
    prefix: str,
    module: nn.Module,
    config: Any,
    found: set[str],
    where: dict[str, SafetensorsHeader],
    headers: list[SafetensorsHeader],
) -> list[str]:
    """Problems of one quantized module; `found`: the names of the tensors the files hold under it."""
    expected = module.state_dict()
    kind = type(module).__name__
    problems = []
    for tensor in sorted(set(expected) - found):
        problems.append(
            f"{prefix}.{tensor}: missing from {_files_named(headers)}; this {kind} needs it "
            f"({_explain(module, tensor, config)})"
        )
    for tensor in sorted(found - set(expected)):
        header = where[f"{prefix}.{tensor}"]
        problems.append(
            f"{prefix}.{tensor} in {header.path.name}: not expected, the config disagrees with the tensors "
            f"({_explain(module, tensor, config)})"
        )
    for tensor in sorted(found & set(expected)):
        want, header = expected[tensor], where[f"{prefix}.{tensor}"]
        entry = header.tensors[f"{prefix}.{tensor}"]
        if not _dtype_ok(want.dtype, entry.dtype):
            kinds = "a floating-point dtype" if want.dtype.is_floating_point else str(want.dtype).removeprefix("torch.")
            problems.append(f"{prefix}.{tensor} in {header.path.name}: dtype {entry.dtype}, expected {kinds}")
        if entry.shape != tuple(want.shape):
            problems.append(
                f"{prefix}.{tensor} in {header.path.name}: shape {list(entry.shape)}, expected {list(want.shape)} "
                f"({_explain(module, tensor, config)})"
            )
    return problems


def _value_tensors(model: nn.Module) -> Iterable[tuple[str, nn.Module, str]]:
    """(prefix, module, tensor) of the small tensors whose values are checked."""
    for prefix, module in model.named_modules():
        if isinstance(module, QuantLinear):
            names = ["weight_shape", "weight_scale"]
            if module.float_zero_point:
                names.append("weight_zero_point")
            if module.weight_g_idx is not None:
                names.append("weight_g_idx")
        elif isinstance(module, W8A8Linear):
            names = ["weight_scale"] + (["input_scale"] if module.static else [])
        elif isinstance(module, PackedRows):  # quantized embeddings / heads
            names = ["weight_shape", "weight_scale"]
        else:
            continue
        yield from ((prefix, module, n) for n in names)


def check_values(model: nn.Module, headers: list[SafetensorsHeader]) -> list[str]:
    """Problems of the values of the small tensors: `weight_shape` = (out, in), finite scales and float zero points,
    positive static input scales, act-order `weight_g_idx` in [0, groups) giving every group its size. Reads only
    those tensors, each file opened once; tensors with a wrong layout (see `check_layout`) are skipped."""
    where = {name: h for h in headers for name in h.tensors}
    wanted: dict[Path, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    for prefix, module, tensor in _value_tensors(model):
        header = where.get(f"{prefix}.{tensor}")
        expected_shape = tuple(module.state_dict()[tensor].shape)
        if header is not None and header.tensors[f"{prefix}.{tensor}"].shape == expected_shape:
            wanted[header.path].append((prefix, module, tensor))
    problems = []
    for path, items in wanted.items():
        with safe_open(str(path), "pt") as f:
            for prefix, module, tensor in items:
                problem = _value_problem(module, tensor, f.get_tensor(f"{prefix}.{tensor}"))
                if problem:
                    problems.append(f"{prefix}.{tensor} in {path.name}: {problem}")
    return problems


def _value_problem(module: nn.Module, tensor: str, value: torch.Tensor) -> str | None:
    if tensor == "weight_shape":
        if value.tolist() != [module.out_features, module.in_features]:
            return f"holds {value.tolist()}, but the layer is (out, in) = {[module.out_features, module.in_features]}"
        return None
    if value.is_floating_point():
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            return f"{bad} non-finite value(s) (NaN or inf) of {value.numel()}: the layer would compute NaN"
        if tensor == "input_scale" and not bool((value > 0).all()):
            return f"static input scale {value.tolist()} is not positive"
        return None
    if tensor == "weight_g_idx":
        groups = module.in_features // module.group_size
        g = value.long()
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
            return f"group indices must lie in [0, {groups}); found [{int(g.min())}, {int(g.max())}]"
        sizes = torch.bincount(g, minlength=groups)
        if not bool((sizes == module.group_size).all()):
            found = sizes.unique().tolist()
            return f"act-order groups must have group_size={module.group_size} members each; sizes found {found}"
    return None


def raise_problems(problems: list[str], what: str) -> None:
    """CheckpointError listing `problems` (at most 20 shown), headed by `what`."""
    if not problems:
        return
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise CheckpointError(f"{what}: {len(problems)} problem(s):\n- " + "\n- ".join(shown))
