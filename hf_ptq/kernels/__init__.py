"""Matmul kernels for packed weights, chosen per call by device, dtype, bit width and number of rows.

Two CPU classes behave differently, so the choice depends on which one runs: on CPUs with native bf16 (AVX512-BF16
/ AMX) bf16 dense matmuls are fast and torch's packed int4 / int8 weight-only kernels (bf16 activations) win for
few rows and lose for many; on CPUs without it (e.g. AVX2 only) bf16 dense matmuls are slow, the packed kernels
with bf16 activations still beat every dense path for few rows, and with fp32 activations they are slow. So the
dequantize path computes in fp32 there. (The measurements: docs/kernels.md, "Measurements behind the code".)
Both: the packed kernels run only with bf16 activations, for few rows; otherwise the weight is dequantized and a
dense matmul runs. The dequantize path is always correct and is the reference the kernels are tested against. On
CPU the dense weight of a 4- or 8-bit layer is built in one C pass from the packed codes (`dense_weight_cpu`,
act-order `g_idx` included), with the bits of the torch ops it replaces.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import torch
import torch.nn.functional as F

from ..core.cpu import cpu_has_fast_bf16
from . import native

# Up to this many rows (tokens x batch) a layer runs its packed kernel; more rows dequantize and use a dense
# matmul. Crossovers measured on one core for SmolLM2's layer shapes (1536x576, 576x1536, 576x576).
MAX_ROWS_FAST_BF16 = {4: 48, 8: 24}  # CPUs with native bf16, and CUDA
MAX_ROWS_NO_BF16 = {4: 24, 8: 16}  # CPUs without (dense path in fp32)
# HF_PTQ_KERNEL_MAX_ROWS overrides the threshold for every bit width (0 disables the packed kernels).
KERNEL_MAX_ROWS: int | None = (
    int(os.environ["HF_PTQ_KERNEL_MAX_ROWS"]) if "HF_PTQ_KERNEL_MAX_ROWS" in os.environ else None
)


def kernel_max_rows(bits: int, device_type: str = "cpu") -> int:
    """Most rows a `bits`-bit layer sends through its packed kernel on `device_type`."""
    if KERNEL_MAX_ROWS is not None:
        return KERNEL_MAX_ROWS
    table = MAX_ROWS_FAST_BF16 if device_type != "cpu" or cpu_has_fast_bf16() else MAX_ROWS_NO_BF16
    return table.get(4 if bits in INT4_KERNEL_BITS else bits, 0)


_INT4_GROUP_SIZES = (256, 128, 64, 32)
# Bit widths torch's int4 CPU kernel runs: 2- and 3-bit codes lie inside int4's range, so they take the 4-bit layout
# unchanged (a 4-bit copy of the codes, built on first use; mixed precision's low-bit layers decode at 4-bit speed).
INT4_KERNEL_BITS = (2, 3, 4)


def compute_dtypes(setting: str, x: torch.Tensor) -> tuple[torch.dtype | None, torch.dtype]:
    """(dtype the packed kernels run in, None when they may not run; dtype of the dequantize path) for input x.

    `auto` on CPU: the kernels in bf16 (their only fast dtype), the dense path in bf16 on CPUs with native bf16
    and in fp32 elsewhere (where bf16 matmuls are slow). `auto` on other devices: the input's dtype. An explicit
    setting is used for both paths (the kernels only when it is bf16).
    """
    if setting != "auto":
        dtype = getattr(torch, setting)
        return (dtype if dtype == torch.bfloat16 else None), dtype
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.bfloat16, (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    return (x.dtype if x.dtype == torch.bfloat16 else None), x.dtype


def int4_kernel_group(in_features: int, group_size: int) -> int | None:
    """Group size the int4 kernel can run a layer with (per-channel/tensor scales are repeated), or None."""
    if group_size > 0:
        return group_size if group_size in _INT4_GROUP_SIZES and in_features % group_size == 0 else None
    return next((g for g in _INT4_GROUP_SIZES if in_features % g == 0), None)


def prepare_int4_cpu(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Layout for `_weight_int4pack_mm_for_cpu` from signed int4 q [out, in] and [out, groups] qparams.

    The kernel computes `w = (u - 8) * s + z` with unsigned `u = q + 8`, so `z = -zero_point * s`.
    Returns (packed weight, scales_and_zeros [groups, out, 2] bf16, kernel group size).
    """
    out_f, in_f = q.shape
    kgroup = int4_kernel_group(in_f, group_size)
    if kgroup is None:
        raise ValueError(f"in_features={in_f} with group_size={group_size} does not fit the int4 CPU kernel")
    per_tensor = group_size == 0
    s = scale.float().reshape(1, 1).expand(out_f, 1) if per_tensor else scale.float()
    if zero_point is None:
        z = torch.zeros_like(s)
    else:
        z = -(zero_point.float().reshape(1, 1) if per_tensor else zero_point.float()) * s
    if group_size <= 0:  # repeat the single column of qparams over the kernel's groups
        s = s.expand(out_f, in_f // kgroup)
        z = z.expand(out_f, in_f // kgroup)
    scales_and_zeros = torch.stack((s.t(), z.t()), -1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    return packed, scales_and_zeros, kgroup


def int4_cpu_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, kgroup: int) -> torch.Tensor:
    """x [rows, in] bf16 -> [rows, out] bf16 through the packed int4 CPU kernel."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, kgroup, scales_and_zeros)


def int4_cpu_matmul_reordered(
    x: torch.Tensor, order: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, kgroup: int
) -> torch.Tensor:
    """`int4_cpu_matmul` for act-order weights packed with input channels in `order` (int64 [in]): x [rows, in]
    is gathered into the same order first."""
    return int4_cpu_matmul(x.index_select(1, order), packed, scales_and_zeros, kgroup)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [rows, in] -> [rows, out] through the int8 weight-only kernel; q int8 [out, in], per-row scale [out]."""
    return torch.ops.aten._weight_int8pack_mm(x, q, scale if scale.dtype == x.dtype else scale.to(x.dtype))


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


# --- dense weights on CPU, in one C pass --------------------------------------------------------------------------
_DENSE_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}
_workspaces = threading.local()  # per thread: dtype -> flat buffer of the largest dense weight asked for


def dense_workspace(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, cols] CPU tensor of `dtype` that every call from this thread reuses (one buffer per dtype, grown to
    the largest request and kept), for a dense weight that lives for one matmul: memory already mapped is written
    without the page faults (and zeroing) that a new allocation of that size costs (docs/kernels.md). The caller must
    be done with it before the thread's next call."""
    spaces = _workspaces.__dict__.setdefault("by_dtype", {})
    numel = rows * cols
    if spaces.get(dtype) is None or spaces[dtype].numel() < numel:
        spaces.pop(dtype, None)  # the smaller buffer goes before the larger one is allocated
        spaces[dtype] = torch.empty(numel, dtype=dtype)
    return spaces[dtype][:numel].view(rows, cols)


def dense_weight_cpu(
    packed: torch.Tensor,
    bits: int,
    in_features: int,
    scale: torch.Tensor,
    center: torch.Tensor,
    group_members: int,
    g_idx: torch.Tensor | None,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """w [out, in] in `dtype` = (u - center) * scale, from `packed` int32 [out, words] holding the stored unsigned
    4- or 8-bit codes u, in one C pass (`dense_weight_cpu.c`); the same bits as those fp32 ops in torch. Written into
    `out` (contiguous [out, in] of `dtype`, e.g. `dense_workspace`) when given, else into a new tensor.

    scale, center: fp32 [out or 1, groups] (one row: the same for every output channel). Input channel j belongs to
    group `j // group_members` (groups * group_members == in), or `g_idx[j]` (int32 [in], act-order) when given,
    which must lie in [0, groups).
    None where the C kernel does not run: not CPU, another bit width or dtype, no compiler, HF_PTQ_NATIVE_KERNELS=0.
    """
    if packed.device.type != "cpu" or bits not in (4, 8) or dtype not in _DENSE_DTYPES:
        return None
    fn = _dense_weight_function(bits, dtype) if native.enabled() else None
    if fn is None:
        return None
    rows = packed.shape[0]
    groups_fit = g_idx is not None or scale.shape[-1] * group_members == in_features
    if scale.dtype != torch.float32 or center.shape != scale.shape or scale.shape[0] not in (1, rows) or not groups_fit:
        raise ValueError(
            f"dense_weight_cpu: scale {tuple(scale.shape)} / center {tuple(center.shape)} for {rows} rows of "
            f"{in_features} inputs in groups of {group_members}"
        )
    packed, scale, center = packed.contiguous(), scale.contiguous(), center.contiguous()
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32).contiguous()
    if out is None:
        out = torch.empty(rows, in_features, dtype=dtype)
    elif out.shape != (rows, in_features) or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"dense_weight_cpu: out {tuple(out.shape)} {out.dtype} for [{rows}, {in_features}] {dtype}")
    fn(
        packed.data_ptr(),
        packed.shape[1] * 4,
        rows,
        in_features,
        scale.data_ptr(),
        center.data_ptr(),
        scale.shape[1] if scale.shape[0] > 1 else 0,
        scale.shape[1],
        group_members,
        None if g_idx is None else g_idx.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


@functools.cache
def _dense_weight_function(bits: int, dtype: torch.dtype):
    lib = native.load("dense_weight_cpu.c")
    if lib is None:
        return None
    fn = getattr(lib, f"dense_weight_{bits}_{_DENSE_DTYPES[dtype]}")
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, i64, p, p, i64, i64, i64, p, p, ctypes.c_int]
    fn.restype = None
    return fn


# --- products of a few rows with packed codes on CPU (decode) ----------------------------------------------------
# HF_PTQ_PACKED_KERNEL=0: decode with torch's int4 / int8 kernels instead (read on every plan, so tests can switch it).
# They decode about 1.1x faster here (benchmarks/decode_kernels.py) but keep a second copy of every layer's codes.
PACKED_KERNEL_ENV = "HF_PTQ_PACKED_KERNEL"


def packed_matmul_cpu_available() -> bool:
    """Whether `packed_matmul_cpu` runs here: the C kernels are on, `HF_PTQ_PACKED_KERNEL` is not 0 and the CPU has
    AVX512-BF16."""
    if os.environ.get(PACKED_KERNEL_ENV, "1") == "0":
        return False
    lib = native.load("packed_matmul_cpu.c") if native.enabled() else None
    return lib is not None and _packed_matmul_supported(lib)


@functools.cache
def _packed_matmul_supported(lib) -> bool:
    lib.packed_matmul_supported.restype = ctypes.c_int
    return bool(lib.packed_matmul_supported())


def packed_matmul_group(in_features: int, group_size: int, bits: int) -> int | None:
    """Input channels per scale `packed_matmul_cpu` runs a layer with (per-channel / per-tensor: the whole row), or
    None for shapes it does not take: in_features a multiple of its block (128 codes at 4 bits, 64 at 8), groups a
    multiple of the block or a divisor of it of at least 8 (4-bit) / 4 (8-bit) codes."""
    block = 128 if bits == 4 else 64
    members = in_features if group_size <= 0 else group_size
    fits = members % block == 0 if members >= block else block % members == 0 and members >= block // 16
    return members if bits in (4, 8) and in_features % block == 0 and in_features % members == 0 and fits else None


def packed_matmul_cpu(
    x: torch.Tensor, packed: torch.Tensor, bits: int, scale: torch.Tensor, center: torch.Tensor, group_members: int
) -> torch.Tensor:
    """x [rows, in] bf16 (contiguous) @ w^T -> [rows, out] bf16, with w = (u - center) * scale read from `packed`
    (int32 [out, words] holding the unsigned 4- or 8-bit codes u) in one pass (`packed_matmul_cpu.c`): fp32
    accumulation, one rounding. scale, center: fp32 [out or 1, groups], contiguous. Callers check
    `packed_matmul_cpu_available()` and `packed_matmul_group` first; fp32 [rows, out] comes back as bf16."""
    fn = _packed_matmul_function(bits)
    rows, in_features = x.shape
    out_features = packed.shape[0]
    out = torch.empty(rows, out_features, dtype=torch.bfloat16)
    status = fn(
        packed.data_ptr(),
        packed.shape[1] * 4,
        out_features,
        in_features,
        scale.data_ptr(),
        center.data_ptr(),
        scale.shape[1] if scale.shape[0] > 1 else 0,
        group_members,
        x.data_ptr(),
        rows,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"packed_matmul_cpu: status {status} for {out_features}x{in_features}, {bits}-bit")
    return out


@functools.cache
def _packed_matmul_function(bits: int):
    lib = native.load("packed_matmul_cpu.c")
    fn = getattr(lib, f"packed_matmul_{bits}")
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, i64, p, p, i64, i64, p, i64, p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn
