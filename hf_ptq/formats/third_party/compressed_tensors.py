"""Loading compressed-tensors checkpoints (llm-compressor's W4A16 / W8A16 / W8A8, vLLM's format) onto hf_ptq's
modules, without the compressed-tensors package.

config.json's `quantization_config` names, per group of target modules, the weight and activation arguments and a
storage `format`:
- `pack-quantized`: int2-8 weights packed 32 / bits to an int32 along the input (`weight_packed`), scales, packed
  integer zero points, `weight_shape` and, for act-order with dynamic groups, `weight_g_idx`: hf_ptq's own
  `QuantLinear` tensors, loaded as they are.
- `int-quantized`: int8 weights unpacked (`weight` int8 [out, in]) and `weight_scale`; with int8 input activations
  (dynamic per token, or static per tensor with `input_scale`) this is SmoothQuant's W8A8, hf_ptq's `W8A8Linear`.
- `naive-quantized`, or `int-quantized` without activations: unpacked integer weights (and zero points), repacked
  into a `QuantLinear` after loading (`IntWeightLinear`).
Everything else (fp8 and fp4 types, block / tensor-group strategies, 2:4 sparsity, KV-cache and output
quantization, transforms) is refused before any weight is read, naming the field. Modules in `ignore`, matched by no
group, or stored `dense` keep their float weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from ...core.scheme import ALLOWED_BITS
from ...nn import QuantLinear, W8A8Linear
from ..safetensors_file import TensorEntry
from .shell import CheckpointLinear

FORMAT = "compressed-tensors"
PACKED, INT, NAIVE, DENSE = "pack-quantized", "int-quantized", "naive-quantized", "dense"
FORMATS = (PACKED, INT, NAIVE, DENSE)
_STRATEGIES = {"channel": -1, "tensor": 0}  # group_size of the other strategies; "group" takes the config's
_ACT_ORDERS = (None, "group", "weight", "static", "dynamic")  # "dynamic" / "static": older names of group / weight


class CompressedTensorsCheckpointConfig(QuantizationConfigMixin):
    """config.json's compressed-tensors `quantization_config`, held as saved (JSON) and read by hf_ptq itself.

    Stands in for transformers' `CompressedTensorsConfig`, which needs the compressed-tensors package to be built.
    """

    dequantize = False  # hf_ptq runs the packed weights; transformers must not drop the config after loading

    def __init__(self, **saved: Any) -> None:
        self.saved = saved
        self.quant_method = FORMAT

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        config = cls(**dict(config_dict))
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        return dict(self.saved)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __getattr__(self, name: str) -> Any:
        if name == "saved" or name.startswith("_"):
            raise AttributeError(name)
        try:
            return self.saved[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class GroupScheme:
    """What one config group asks for, as hf_ptq builds it."""

    name: str
    targets: tuple[str, ...]
    format: str
    bits: int
    group_size: int  # -1 per channel, 0 per tensor
    sym: bool
    activations: str | None  # None (weight-only), "dynamic" (per token) or "static" (per tensor, input_scale)

    @property
    def summary(self) -> str:
        gran = {-1: "per-channel", 0: "per-tensor"}.get(self.group_size, f"g{self.group_size}")
        acts = f", int8 {self.activations} activations" if self.activations else ""
        return f"{self.format} int{self.bits} {gran} {'sym' if self.sym else 'asym'}{acts}"


def _field(path: str, value: Any, allowed: str) -> ValueError:
    return ValueError(
        f"quantization_config.{path}={value!r}: hf_ptq runs compressed-tensors checkpoints with {allowed}. "
        "Choose the compressed-tensors package's own loader for others: hf_ptq.use_backend('compressed-tensors', "
        "'transformers')."
    )


def _activation_scheme(path: str, acts: dict[str, Any] | None) -> str | None:
    if not acts:
        return None
    if acts.get("type", "int") != "int" or acts.get("num_bits") != 8 or not acts.get("symmetric", True):
        raise _field(path, acts, "int8 symmetric input activations (W8A8) or none")
    strategy, dynamic = acts.get("strategy"), acts.get("dynamic")
    if strategy == "token" and dynamic is True:
        return "dynamic"
    if strategy == "tensor" and dynamic is False:
        return "static"
    raise _field(path, acts, "activations per token and dynamic, or per tensor and static")


def group_schemes(config: Any) -> list[GroupScheme]:
    """The config groups as `GroupScheme`s; ValueError naming the field for anything hf_ptq does not run."""
    saved = config.to_dict()
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if saved.get(key):
            raise _field(key, "…" if isinstance(saved[key], dict) else saved[key], f"no {key}")
    top = saved.get("format") or PACKED
    groups = saved.get("config_groups") or {}
    if not groups:
        raise _field("config_groups", groups, "at least one config group")
    schemes = []
    for name, group in groups.items():
        path = f"config_groups.{name}"
        fmt = group.get("format") or top
        if fmt not in FORMATS:
            raise _field(f"{path}.format", fmt, "the formats " + ", ".join(map(repr, FORMATS)))
        if group.get("output_activations"):
            raise _field(f"{path}.output_activations", group["output_activations"], "no output activations")
        weights = group.get("weights") or {}
        if weights.get("type", "int") != "int":
            raise _field(f"{path}.weights.type", weights.get("type"), "integer weights ('int')")
        bits = weights.get("num_bits")
        if bits not in ALLOWED_BITS or (fmt != PACKED and bits != 8 and fmt != NAIVE):
            allowed = ", ".join(map(str, ALLOWED_BITS))
            raise _field(f"{path}.weights.num_bits", bits, f"{allowed} bits (8 for int-quantized)")
        strategy = weights.get("strategy")
        if strategy == "group":
            group_size = weights.get("group_size")
            if not isinstance(group_size, int) or group_size <= 0:
                raise _field(f"{path}.weights.group_size", group_size, "a positive group size")
        elif strategy in _STRATEGIES:
            group_size = _STRATEGIES[strategy]
        else:
            raise _field(f"{path}.weights.strategy", strategy, "the strategies 'group', 'channel' and 'tensor'")
        if weights.get("dynamic"):
            raise _field(f"{path}.weights.dynamic", True, "static weight scales")
        if weights.get("actorder") not in _ACT_ORDERS:
            raise _field(f"{path}.weights.actorder", weights.get("actorder"), "actorder 'group', 'weight' or none")
        activations = _activation_scheme(f"{path}.input_activations", group.get("input_activations"))
        sym = bool(weights.get("symmetric", True))
        if activations and (fmt != INT or bits != 8 or strategy != "channel" or not sym):
            raise _field(
                f"{path}.weights", weights, "int-quantized 8-bit symmetric per-channel weights for W8A8 activations"
            )
        schemes.append(GroupScheme(name, tuple(group.get("targets") or ()), fmt, bits, group_size, sym, activations))
    return schemes


def check_config(config: Any) -> None:
    """ValueError naming the field for what hf_ptq does not run, before any weight is read."""
    kinds = {(s.format == DENSE, s.bits, s.group_size, s.sym, s.activations) for s in group_schemes(config)}
    kinds = {k for k in kinds if not k[0]}
    if len(kinds) > 1:
        raise _field("config_groups", "…", "one weight scheme for all quantized layers (mixed precision is not read)")


def _matches(name: str, module: nn.Module, target: str) -> bool:
    """compressed-tensors' matching: `re:<regex>` against the module name, else the class name or the full name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (type(module).__name__, name)


def _parsed(config: Any) -> tuple[list[GroupScheme], list[str]]:
    """(group schemes, ignore list) of `config`, parsed once per config object (`scheme_of` asks per Linear)."""
    cached = getattr(config, "_parsed_groups", None)
    if cached is None:
        cached = (group_schemes(config), list(config.to_dict().get("ignore") or ()))
        config._parsed_groups = cached  # an attribute, not a saved key: `to_dict` returns the saved block only
    return cached


def scheme_of(config: Any, name: str, module: nn.Module) -> GroupScheme | None:
    """The scheme of module `name` (None: it keeps its float weights)."""
    schemes, ignore = _parsed(config)
    if any(_matches(name, module, t) for t in ignore):
        return None
    for scheme in schemes:
        if any(_matches(name, module, t) for t in scheme.targets):
            return None if scheme.format == DENSE else scheme
    return None


class IntWeightLinear(CheckpointLinear):
    """Unpacked integer weights (`naive-quantized`, or weight-only `int-quantized`): int8 `weight` [out, in],
    `weight_scale` [out, groups] and, asymmetric, int8 `weight_zero_point` [out, groups]; repacked into a
    `QuantLinear` after loading."""

    checkpoint_format = FORMAT

    def __init__(self, in_features, out_features, bias, bits, group_size, sym, dtype) -> None:
        super().__init__(in_features, out_features, bias, bits, group_size, dtype)
        self.sym = sym
        shape = (1,) if group_size == 0 else (out_features, self.groups)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(shape, dtype=dtype))
        self.weight_zero_point = None
        if not sym:
            self.register_buffer("weight_zero_point", torch.empty(shape, dtype=torch.int8))

    def facts(self) -> tuple[bool, bool]:
        return self.sym, False

    def convert(self, sym: bool, act_order: bool) -> nn.Module:
        zero = None if sym else self.weight_zero_point
        if zero is None and not sym:  # a symmetric layer in an asymmetric model: zero points 0
            zero = torch.zeros_like(self.weight_scale, dtype=torch.int8)
        return self._quant_linear(self.weight, self.weight_scale, zero, sym, None)


def layer_for(
    config: Any, name: str, module: nn.Linear, tensors: dict[str, TensorEntry], dtype: torch.dtype
) -> nn.Module | None:
    """The module Linear `name` is loaded into (on meta), or None when it keeps its float weights."""
    scheme = scheme_of(config, name, module)
    if scheme is None:
        return None
    in_f, out_f, bias = module.in_features, module.out_features, module.bias is not None
    if scheme.activations:
        return W8A8Linear(in_f, out_f, bias, scheme.activations == "static", dtype=dtype)
    if scheme.format == PACKED:
        return QuantLinear(
            in_f,
            out_f,
            bias,
            scheme.bits,
            scheme.group_size,
            scheme.sym,
            dtype=dtype,
            act_order=f"{name}.weight_g_idx" in tensors,
        )
    return IntWeightLinear(in_f, out_f, bias, scheme.bits, scheme.group_size, scheme.sym, dtype)


def describe(config: Any) -> str:
    return "compressed-tensors " + "; ".join(s.summary for s in group_schemes(config) if s.format != DENSE)
