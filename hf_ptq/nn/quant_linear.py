"""`QuantLinear`: a Linear whose weight is stored packed (2/3/4/8-bit) with scales and zero points.

Buffers carry the checkpoint names of compressed-tensors' `pack-quantized` format, so `state_dict()` is the
on-disk layout and safetensors round-trips with no converter:
    weight_packed      int32 [out, ceil(in*bits/32)]
    weight_scale       [out, groups] (per-group / per-channel) or [1] (per-tensor), in the model's dtype
    weight_zero_point  asymmetric only: int32 [ceil(out*bits/32), groups] packed along dim 0, or int8 [1];
                       float zero points (HQQ): [out, groups] in the model's dtype, unpacked
    weight_shape       int64 [2] = (out, in)
    weight_g_idx       int32 [in], only with act-order
Forward picks a kernel per call (see `hf_ptq.kernels`); the layout a kernel needs is built on first use and
cached outside the state dict.
Where autograd needs it (an adapter trained around the frozen layer), forward runs the same kernels and backward
multiplies by the weight dequantized for that call only (`hf_ptq.nn.frozen_grad`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from .. import kernels
from ..core.packing import pack_int32, packed_width, unpack_int32, unpack_unsigned_bytes
from ..core.quant import QuantizedWeight, dequantize, round_onto
from .frozen_grad import frozen_matmul, needs_input_grad


class KernelPlan(NamedTuple):
    """How a `QuantLinear` runs inputs of one device and dtype (see `QuantLinear._plan`)."""

    matmul: Callable[..., torch.Tensor] | None  # packed kernel (x2 bf16 [rows, in], *layout), None: dense path only
    layout: str  # kernel-cache key of the weight layout the kernel takes
    build: Callable[[QuantLinear], tuple] | None  # builds that layout from the module's buffers
    max_rows: int  # most rows sent through the kernel
    dense_dtype: torch.dtype  # compute dtype of the dequantize path


class DequantizedWeightAttribute(nn.Module):
    """`.weight` of a module holding `weight_packed`: the dequantized weight [out, in], a new tensor each time."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight" or "weight_packed" not in self._buffers or self.weight_packed.is_meta:
                raise
        # Code written for nn.Linear / nn.Embedding reads `.weight`: GPT-2's `_init_weights` touches `c_proj.weight`
        # of every block on each `from_pretrained`. Answer with the dequantized weight, a new tensor (writing to it
        # changes nothing), marked initialized so transformers' init functions leave it alone. Not while the
        # buffers are still on meta: then `weight` must stay free for the placeholder of quantize-on-load.
        weight = self.dequantized_weight()
        weight._is_hf_initialized = True
        return weight


class QuantLinear(DequantizedWeightAttribute):
    """Weight-only quantized replacement for `nn.Linear` (and GPT-2's transposed `Conv1D`)."""

    transposed_source = False  # True when the float weight it replaces is stored [in, out] (GPT-2 Conv1D)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int,
        group_size: int,
        sym: bool,
        dtype: torch.dtype = torch.bfloat16,
        act_order: bool = False,
        compute_dtype: str = "auto",
        device: torch.device | str | None = None,
        float_zero_point: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.float_zero_point = float_zero_point and not sym
        self.compute_dtype = compute_dtype
        groups = {0: 0, -1: 1}.get(group_size, in_features // max(group_size, 1))
        scale_shape = (1,) if group_size == 0 else (out_features, groups)
        kw = {"device": device}
        self.register_buffer(
            "weight_packed", torch.empty(out_features, packed_width(in_features, bits), dtype=torch.int32, **kw)
        )
        self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=dtype, **kw))
        if self.float_zero_point:
            self.register_buffer("weight_zero_point", torch.empty(scale_shape, dtype=dtype, **kw))
        elif not sym:
            zp_shape = (1,) if group_size == 0 else (packed_width(out_features, bits), groups)
            zp_dtype = torch.int8 if group_size == 0 else torch.int32
            self.register_buffer("weight_zero_point", torch.empty(zp_shape, dtype=zp_dtype, **kw))
        else:
            self.weight_zero_point = None
        self.register_buffer(
            "weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device)
        )
        if act_order:
            self.register_buffer("weight_g_idx", torch.empty(in_features, dtype=torch.int32, **kw))
        else:
            self.weight_g_idx = None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        self._kernel_cache: dict[tuple, tuple] = {}
        self._plans: dict[tuple, KernelPlan] = {}
        self._dense_cache: dict[torch.dtype, torch.Tensor] | None = None  # set by `keep_dense_weights`

    # --- filling from a quantized weight -------------------------------------------------------------------
    def set_quantized(self, qw: QuantizedWeight) -> None:
        """Pack `qw` into this module's buffers (shapes must match the constructor's)."""
        if tuple(qw.q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight shape {tuple(qw.q.shape)} != {(self.out_features, self.in_features)}")
        self.weight_packed = pack_int32(qw.q, self.bits, dim=1)
        self.weight_scale = qw.scale.to(self.weight_scale.dtype)
        if not self.sym:
            self.weight_zero_point = self._stored_zero_point(qw.zero_point)
        if self.weight_g_idx is not None:
            self.weight_g_idx = qw.g_idx.to(torch.int32)
        self.invalidate_caches()

    def requantize_(self, weight: torch.Tensor) -> None:
        """Store `weight` [out, in] rounded onto this layer's own grid: its scales, zero points and groups (act-order
        included) stay, only the integers change (a merged LoRA delta; `hf_ptq.finetune`)."""
        qw = self.quantized_weight()
        qw.q = round_onto(weight, qw)
        self.set_quantized(qw)

    def stored_bits(self) -> int:
        """Bits of the quantized weight's saved tensors (packed integers, scales, zero points, shape, g_idx), the
        bias excluded: what `hf_ptq.core.bit_budget.stored_bits` predicts for a scheme."""
        return sum(t.numel() * t.element_size() * 8 for n, t in self.named_buffers(recurse=False) if t is not None)

    def invalidate_caches(self) -> None:
        """Drop what is derived from the buffers (kernel layouts, plans, kept dense weights), after changing them."""
        self._kernel_cache.clear()
        self._plans.clear()
        if self._dense_cache is not None:
            self._dense_cache.clear()

    def scale_output_channels_(self, factors: torch.Tensor, start: int = 0) -> None:
        """Multiply output channels `start : start + len(factors)` (their scales and bias) by `factors` [n] (> 0).

        `(q - z) * scale` scales with its scale, so this is exact up to storing the new scales in their dtype: it is
        how AWQ folds a smoothing scale into a layer that is already quantized (v_proj before o_proj).
        """
        if self.group_size == 0:
            raise ValueError("a per-tensor scale cannot scale single output channels")
        rows = slice(start, start + factors.numel())
        f = factors.to(self.weight_scale.device, torch.float32)
        self.weight_scale[rows] = (self.weight_scale[rows].float() * f[:, None]).to(self.weight_scale.dtype)
        if self.bias is not None:
            self.bias.data[rows] = (self.bias.data[rows].float() * f).to(self.bias.dtype)
        self.invalidate_caches()

    def packed_tensors(self, qw: QuantizedWeight, prefix: str) -> dict[str, torch.Tensor]:
        """The state-dict entries (named `prefix + buffer`) that `set_quantized(qw)` would produce."""
        out = {
            "weight_packed": pack_int32(qw.q, self.bits, dim=1),
            "weight_scale": qw.scale.to(self.weight_scale.dtype),
            "weight_shape": torch.tensor([self.out_features, self.in_features], dtype=torch.int64),
        }
        if not self.sym:
            out["weight_zero_point"] = self._stored_zero_point(qw.zero_point)
        if self.weight_g_idx is not None:
            out["weight_g_idx"] = qw.g_idx.to(torch.int32)
        return {prefix + k: v for k, v in out.items()}

    def _stored_zero_point(self, zero_point: torch.Tensor) -> torch.Tensor:
        """The `weight_zero_point` buffer for zero points [out, groups] (or [1] per-tensor): floats as they are, in
        the scale's dtype; integers packed along dim 0 (per-tensor: the int8 itself)."""
        if self.float_zero_point:
            if not zero_point.is_floating_point():
                raise ValueError("this QuantLinear stores float zero points; got integer ones")
            return zero_point.to(self.weight_scale.dtype)
        if zero_point.is_floating_point():
            raise ValueError("float zero points need QuantLinear(float_zero_point=True)")
        return zero_point if self.group_size == 0 else pack_int32(zero_point, self.bits, dim=0)

    # --- unpacking -----------------------------------------------------------------------------------------
    def quantized_weight(self) -> QuantizedWeight:
        """Unpack the buffers into signed integers and qparams."""
        q = unpack_int32(self.weight_packed, self.bits, self.in_features, dim=1)
        zp = None
        if not self.sym:
            zp = self.weight_zero_point
            if self.group_size != 0 and not self.float_zero_point:
                zp = unpack_int32(zp, self.bits, self.out_features, dim=0)
        return QuantizedWeight(q, self.weight_scale, zp, self.bits, self.group_size, self.weight_g_idx)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] the packed data stands for, in `dtype` (default: the scale's dtype)."""
        qw = self.quantized_weight()
        return dequantize(qw.q, qw.scale, qw.zero_point, self.group_size, qw.g_idx, dtype or self.weight_scale.dtype)

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_input_grad(x, self.bias):  # training an adapter above or below this frozen layer
            dense = kernels.compute_dtypes(self.compute_dtype, x)[1]
            return frozen_matmul(x, self.bias, self._forward_frozen, lambda g: g.to(dense) @ self._dense_weight(dense))
        return self._forward_frozen(x)

    def _forward_frozen(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plans.get((x.device, x.dtype))
        if plan is None:
            plan = self._plans[(x.device, x.dtype)] = self._plan(x)
        matmul, layout, build, max_rows, dense_dtype = plan
        x2 = x.reshape(-1, self.in_features)
        if matmul is not None and x2.shape[0] <= max_rows:
            y = matmul(_bf16_rows(x2), *self._cached(layout, x2.device, build))
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            bias = None if self.bias is None else self.bias.to(dense_dtype)
            y = kernels.dense_matmul(x2.to(dense_dtype), self._dense_weight(dense_dtype), bias)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 dequantize-then-matmul path: what every kernel is checked against."""
        bias = None if self.bias is None else self.bias.float()
        return kernels.dense_matmul(x.float(), self.dequantized_weight(torch.float32), bias)

    def _plan(self, x: torch.Tensor) -> KernelPlan:
        """How to run inputs like x (same device and dtype): which packed kernel, for how many rows, and the dense
        path's dtype.

        Decided once per input device and dtype, so that a decoding step's call does only the matmul: the checks
        of a general forward cost more than the packed kernel itself for one row on a slow CPU (docs/kernels.md,
        "Measurements behind the code").
        """
        kernel_dtype, dense_dtype = kernels.compute_dtypes(self.compute_dtype, x)
        device = x.device
        max_rows = kernels.kernel_max_rows(self.bits, device.type)
        dense_only = KernelPlan(None, "", None, 0, dense_dtype)
        if kernel_dtype != torch.bfloat16 or max_rows <= 0:
            return dense_only
        if device.type == "cpu" and self._packed_kernel_fits():
            build = QuantLinear._build_packed_cpu
            return KernelPlan(kernels.packed_matmul_cpu, "packed_cpu", build, max_rows, dense_dtype)
        if device.type == "cpu" and self.bits in kernels.INT4_KERNEL_BITS:  # 2/3-bit codes fit int4 unchanged
            if kernels.int4_kernel_group(self.in_features, self.group_size) is None:
                return dense_only
            if self.weight_g_idx is None:
                build = QuantLinear._build_int4_cpu
                return KernelPlan(kernels.int4_cpu_matmul, "int4_cpu", build, max_rows, dense_dtype)
            if self._grouping_order() is None:
                return dense_only
            build = QuantLinear._build_int4_cpu_reordered
            return KernelPlan(kernels.int4_cpu_matmul_reordered, "int4_cpu_reordered", build, max_rows, dense_dtype)
        if self.weight_g_idx is not None:
            return dense_only
        if self.bits == 8 and self.sym and self.group_size == -1 and device.type in ("cpu", "cuda"):
            return KernelPlan(kernels.int8_matmul, "int8", QuantLinear._build_int8, max_rows, dense_dtype)
        return dense_only

    def _cached(self, name: str, device: torch.device, build: Callable[[QuantLinear], tuple]) -> tuple:
        """`build(self)`, computed once per `name` and device until the buffers change."""
        key = (name, device)
        if key not in self._kernel_cache:
            self._kernel_cache[key] = build(self)
        return self._kernel_cache[key]

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype` for the dense path, rebuilt on every call (kept only inside
        `keep_dense_weights`).

        Byte-aligned values (4/8-bit) are read straight from the stored unsigned bytes `u` and turned into
        `(u - c) * scale` in fp32, with `c = 2^(b-1) + zero_point`: exact, so the one rounding to `dtype` gives exactly
        the reference weight. On CPU (bf16 / fp32) that is one C pass over the packed bytes
        (`kernels.dense_weight_cpu`); elsewhere, or without the C kernels, the same fp32 ops in torch (faster than
        the general unpack: docs/kernels.md).
        Act-order layers (`weight_g_idx`) take each input channel's qparams from its group, in the natural channel
        order: the same weight, from the same packed buffer (no reordered copy), for the same matmul. Others
        (2/3-bit, float zero points with act-order) unpack fully.
        """
        cache = self._dense_cache
        if cache is not None and dtype in cache:
            return cache[dtype]
        weight = self._build_dense_weight(dtype, reuse=cache is None)
        if cache is not None:
            cache[dtype] = weight
        return weight

    def _build_dense_weight(self, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
        """The dense weight; with `reuse`, the C pass writes it into this thread's `kernels.dense_workspace` (valid
        until the thread's next dense weight: for one matmul)."""
        if self.bits not in (4, 8) or (self.weight_g_idx is not None and self.float_zero_point):
            return self.dequantized_weight(dtype)
        scale, center, g_idx = self._cached("dense", self.weight_packed.device, QuantLinear._dense_qparams)
        if g_idx is False:  # g_idx names groups that do not exist: the general path raises as it always did
            return self.dequantized_weight(dtype)
        members = self.in_features if self.group_size <= 0 else self.group_size
        flat_scale, flat_center = scale.reshape(scale.shape[0], -1), center.reshape(scale.shape[0], -1)
        out = None
        if reuse and self.weight_packed.device.type == "cpu":
            out = kernels.dense_workspace(self.out_features, self.in_features, dtype)
        weight = kernels.dense_weight_cpu(
            self.weight_packed, self.bits, self.in_features, flat_scale, flat_center, members, g_idx, dtype, out
        )
        if weight is not None:
            return weight
        if g_idx is not None:
            return self._act_order_dense_weight(dtype, flat_scale, flat_center, g_idx)
        u = unpack_unsigned_bytes(self.weight_packed, self.bits, self.in_features)
        w = u.reshape(scale.shape[0], scale.shape[1], -1).float()
        return w.sub_(center).mul_(scale).reshape(self.out_features, self.in_features).to(dtype)

    def _act_order_dense_weight(
        self, dtype: torch.dtype, scale: torch.Tensor, center: torch.Tensor, g_idx: torch.Tensor
    ) -> torch.Tensor:
        """`(u - c[:, g_idx]) * s[:, g_idx]` in torch, on CPU `_ROW_CHUNK_ELEMENTS` weights at a time (the gathered
        qparams of a chunk stay in cache), elsewhere at once: the bits of `dense_weight_cpu`."""
        device = self.weight_packed.device
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=device)
        idx = g_idx.long()
        step = max(1, _ROW_CHUNK_ELEMENTS // max(self.in_features, 1) if device.type == "cpu" else self.out_features)
        for start in range(0, self.out_features, step):
            rows = slice(start, start + step)
            u = unpack_unsigned_bytes(self.weight_packed[rows], self.bits, self.in_features)
            w = u.float().sub_(center[rows].index_select(1, idx)).mul_(scale[rows].index_select(1, idx))
            out[rows] = w
        return out

    def _dense_qparams(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None | bool]:
        """(scale, c = 2^(b-1) + zero_point), each fp32 [out or 1, groups, 1], for `_dense_weight`; and the
        act-order groups `weight_g_idx` (int32, contiguous), None without act-order, False when they name groups
        the scales do not have."""
        qw = self.quantized_weight()
        scale = qw.scale.float().reshape(1 if self.group_size == 0 else self.out_features, -1, 1)
        center = torch.full_like(scale, 1 << (self.bits - 1))
        if qw.zero_point is not None:
            center = center + qw.zero_point.float().reshape(scale.shape)
        g_idx = self.weight_g_idx
        if g_idx is not None:
            fits = g_idx.numel() == self.in_features and (
                g_idx.numel() == 0 or (int(g_idx.min()) >= 0 and int(g_idx.max()) < scale.shape[1])
            )
            g_idx = g_idx.to(torch.int32).contiguous() if fits else False
        return scale, center, g_idx

    def _packed_kernel_fits(self) -> bool:
        """Whether `kernels.packed_matmul_cpu` runs this layer: 4- or 8-bit codes in natural order, groups of a
        shape it takes (`packed_matmul_group`), and a CPU with AVX512-BF16."""
        return (
            self.bits in (4, 8)
            and self.weight_g_idx is None
            and kernels.packed_matmul_group(self.in_features, self.group_size, self.bits) is not None
            and kernels.packed_matmul_cpu_available()
        )

    def _build_packed_cpu(self):
        """Arguments of `kernels.packed_matmul_cpu` after x: the packed codes themselves (no copy) and the fp32
        qparams the dense path caches (the same tensors)."""
        scale, center, _ = self._cached("dense", self.weight_packed.device, QuantLinear._dense_qparams)
        rows = scale.shape[0]
        members = kernels.packed_matmul_group(self.in_features, self.group_size, self.bits)
        return self.weight_packed, self.bits, scale.reshape(rows, -1), center.reshape(rows, -1), members

    def _build_int4_cpu(self):
        qw = self.quantized_weight()
        return kernels.prepare_int4_cpu(qw.q, qw.scale, qw.zero_point, self.group_size)

    def _grouping_order(self) -> torch.Tensor | None:
        """Input-channel order (int64 [in]) that makes act-order groups contiguous: sorted by `weight_g_idx`, it must
        give every group exactly `group_size` channels in a row (as GPTQ's act-order does); None otherwise."""
        g_idx = self.weight_g_idx.long()
        order = torch.argsort(g_idx, stable=True)
        natural = torch.arange(self.in_features, device=g_idx.device) // self.group_size
        return order if torch.equal(g_idx[order], natural) else None

    def _build_int4_cpu_reordered(self):
        """Act-order weights for the int4 kernel: input channels reordered so that each group is contiguous; the
        kernel then takes the input's channels in the same order."""
        qw = self.quantized_weight()
        order = self._grouping_order()
        return (order, *kernels.prepare_int4_cpu(qw.q[:, order], qw.scale, qw.zero_point, self.group_size))

    def _build_int8(self):
        qw = self.quantized_weight()
        return qw.q.contiguous(), qw.scale.reshape(-1)

    def _apply(self, fn, recurse: bool = True):
        self.invalidate_caches()  # kernel layouts and plans follow the buffers' device and dtype
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.invalidate_caches()  # load_state_dict copies new values into the buffers
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        gran = {-1: "per-channel", 0: "per-tensor"}.get(self.group_size, f"group_size={self.group_size}")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {gran}, "
            f"sym={self.sym}, bias={self.bias is not None}, act_order={self.weight_g_idx is not None}"
            + (", float_zero_point=True" if self.float_zero_point else "")
        )


_ROW_CHUNK_ELEMENTS = 1 << 16  # weights per chunk of the torch act-order dense path (fp32 temporaries of 256 KiB)


def _bf16_rows(x2: torch.Tensor) -> torch.Tensor:
    """x2 [rows, in] as the packed kernels take it: bf16, contiguous rows."""
    return x2 if x2.dtype == torch.bfloat16 and x2.is_contiguous() else x2.to(torch.bfloat16).contiguous()


@contextmanager
def keep_dense_weights(module: nn.Module) -> Iterator[None]:
    """Within: the `QuantLinear`s under `module` keep their dequantized weight between calls, instead of rebuilding
    it for every call. For many calls over the same few layers (a calibration pass over one block: 64 calls per
    layer; an act-order layer's dequantization costs more than its matmul there); freed on exit."""
    layers = [m for m in module.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer._dense_cache = {}
    try:
        yield
    finally:
        for layer in layers:
            layer._dense_cache = None
