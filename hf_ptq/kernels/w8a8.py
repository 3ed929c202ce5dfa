"""int8 x int8 -> int32 matmuls for W8A8 layers, and the activation quantization they need.

Activations are quantized symmetrically to [-127, 127]: per token (one scale per row, `max|x_row| / 127`,
computed on every call: "dynamic") or per tensor with a scale fixed at calibration ("static"). `torch._int_mm`
multiplies the int8 activations by the int8 weight with int32 accumulation (VNNI / AMX on x86 CPUs, tensor cores on
CUDA), and the int32 result is rescaled by `input_scale[row] * weight_scale[out]` in fp32.

For few rows (decoding), quantizing the activations costs more than the matmul saves: there `W8A8Linear` uses the
int8 weight-only kernel with bf16 activations instead (see `weight_only_max_rows`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading

import torch
import torch.nn.functional as F

from .. import kernels
from ..core.quant import qrange
from . import native

INT8_MAX = qrange(8)[1]  # activations use the symmetric range [-127, 127]

# Up to this many rows a W8A8 layer runs the int8 weight-only kernel (bf16 activations, not quantized); more rows
# quantize the activations and run `torch._int_mm`. Crossovers measured on a 2-core AMD EPYC (Zen 5, AVX512-VNNI
# and AVX512-BF16) for SmolLM2's layer shapes (576x576, 1536x576, 576x1536), per decoder block: between 4 and 6 rows
# with the C quantization / rescale loops, about 16 with them as torch ops (and on CUDA, unmeasured there: its
# `_int_mm` needs more than 16 rows anyway); see docs/smoothquant.md.
WEIGHT_ONLY_MAX_ROWS = 4
WEIGHT_ONLY_MAX_ROWS_TORCH_OPS = 16
# `torch._int_mm` on CUDA needs more than 16 rows and inner / outer sizes that are multiples of 8.
_CUDA_MIN_ROWS = 17
_CUDA_MULTIPLE = 8


def weight_only_max_rows(x: torch.Tensor) -> int:
    """Most rows a W8A8 layer sends through the weight-only kernel for activations like x;
    `HF_PTQ_KERNEL_MAX_ROWS` overrides it (0: every call quantizes its activations)."""
    override = kernels.KERNEL_MAX_ROWS
    if override is not None:
        return override
    if x.device.type == "cpu" and _c_kernels(x.dtype, x.dtype) is not None:
        return WEIGHT_ONLY_MAX_ROWS
    return WEIGHT_ONLY_MAX_ROWS_TORCH_OPS


def int_mm_supported(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


def quantize_per_token(x: torch.Tensor, workspace: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [rows, in], scale fp32 [rows, 1]) with `x ≈ q * scale` for x [rows, in]: one scale per row,
    `scale = max|x_row| / 127`, `q = round_half_even(x * (127 / max|x_row|))` (no clamp needed: |q| <= 127).
    Rows of zeros quantize to 0. One fp32 copy of x, then in-place ops (faster than dividing: docs/kernels.md);
    the temporaries and q come from `workspace` when given."""
    xf = _buffer(workspace, "x", x, torch.float32)
    xf.copy_(x)
    magnitude = torch.abs(xf, out=_buffer(workspace, "f32", x, torch.float32))
    amax = magnitude.amax(1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
    q = _to_int8(xf.mul_(INT8_MAX / amax).round_(), workspace)
    return q, amax.div_(INT8_MAX)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """q int8 [rows, in] with `x ≈ q * scale` for x [rows, in] and a fixed fp32 scale [1]:
    `q = clamp(round_half_even(x * (1 / scale)), -127, 127)` (values beyond 127 * scale saturate; a product, not a
    division, as the C loop computes it, where it is the faster of the two)."""
    xf = _buffer(workspace, "x", x, torch.float32)
    xf.copy_(x)
    return _to_int8(xf.mul_(torch.reciprocal(scale)).round_().clamp_(-INT8_MAX, INT8_MAX), workspace)


def _to_int8(values: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
    """Integral fp32 values in [-127, 127] as int8 (exact)."""
    q = _buffer(workspace, "q", values, torch.int8)
    return q.copy_(values)


def int8_mm(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """q int8 [rows, in] @ weight int8 [out, in]ᵀ -> int32 [rows, out], exact (int32 accumulation).

    On CUDA the operands are zero-padded to the shapes `torch._int_mm` accepts (`padded_int_mm`)."""
    if q.device.type == "cuda":
        return padded_int_mm(q, weight, _CUDA_MIN_ROWS, _CUDA_MULTIPLE)
    return torch._int_mm(q, weight.t())


def padded_int_mm(q: torch.Tensor, weight: torch.Tensor, min_rows: int, multiple: int) -> torch.Tensor:
    """`int8_mm` with q zero-padded to at least `min_rows` rows and the inner and output sizes to multiples of
    `multiple`; the padding only adds zero products, and the result is cut back to [rows, out]."""
    rows, inner = q.shape
    out = weight.shape[0]
    pad_rows, pad_inner, pad_out = max(min_rows - rows, 0), -inner % multiple, -out % multiple
    if pad_rows or pad_inner:
        q = F.pad(q, (0, pad_inner, 0, pad_rows))
    if pad_inner or pad_out:
        weight = F.pad(weight, (0, pad_inner, 0, pad_out))
    return torch._int_mm(q, weight.t())[:rows, :out]


def w8a8_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    out_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [rows, in] -> [rows, out] in `out_dtype`: activations quantized (per token when `input_scale` is None,
    else with that fp32 [1] scale), int8 matmul against weight int8 [out, in], rescaled in fp32 by the activation
    scale and weight_scale fp32 [out], plus bias fp32 [out] when given, then rounded once to `out_dtype`.

    On CPU the rows run in chunks whose temporaries fit this thread's `Workspace` (results do not depend on the
    chunking: every row is quantized and rescaled on its own), and the quantization and rescale run as C loops
    (`w8a8_cpu.c`) for bf16 / fp32 activations and outputs, with the same bits as the torch ops."""
    if x.device.type != "cpu":
        q, scale = _quantize(x, input_scale, None)
        return rescale(int8_mm(q, weight), scale, weight_scale, bias).to(out_dtype)
    rows, out = x.shape[0], weight.shape[0]
    y = torch.empty(rows, out, dtype=out_dtype)
    step = max(1, WORKSPACE_ELEMENTS // max(x.shape[1], out))
    workspace = _WORKSPACE
    c = _c_kernels(x.dtype, out_dtype)
    with torch.no_grad():  # the temporaries are reused across calls; keep them out of any autograd graph
        for start in range(0, rows, step):
            chunk, y_chunk = (x, y) if step >= rows else (x[start : start + step], y[start : start + step])
            q, scale = (
                _quantize(chunk, input_scale, workspace) if c is None else c.quantize(chunk, input_scale, workspace)
            )
            acc = torch._int_mm(q, weight.t(), out=workspace.take("i32", (q.shape[0], out), torch.int32))
            if c is None:
                rescaled = workspace.take("f32", acc.shape, torch.float32).copy_(acc)
                y_chunk.copy_(rescale(rescaled, scale, weight_scale, bias))
            else:
                c.rescale(acc, scale, weight_scale, bias, y_chunk)
    return y


def _quantize(
    x: torch.Tensor, input_scale: torch.Tensor | None, workspace: Workspace | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if input_scale is None:
        return quantize_per_token(x, workspace)
    return quantize_per_tensor(x, input_scale, workspace), input_scale


def rescale(
    acc: torch.Tensor, scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """fp32 [rows, out] = acc [rows, out] * scale [rows, 1] or [1] * weight_scale [out] (+ bias [out]), in place
    when acc is already fp32: the W8A8 rescale of an int32 (or integral float) product."""
    y = acc.float().mul_(scale).mul_(weight_scale)
    return y if bias is None else y.add_(bias)


class _CKernels:
    """ctypes calls of `w8a8_cpu.c` for one activation dtype and one output dtype (bf16 or fp32)."""

    _NAMES = {torch.bfloat16: "bf16", torch.float32: "f32"}

    def __init__(self, lib: ctypes.CDLL, x_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        self._per_token = getattr(lib, f"quantize_per_token_{self._NAMES[x_dtype]}")
        self._per_token.argtypes = [p, i64, i64, i64, p, p, i32]
        self._per_tensor = getattr(lib, f"quantize_per_tensor_{self._NAMES[x_dtype]}")
        self._per_tensor.argtypes = [p, i64, i64, i64, f32, p, i32]
        self._rescale = getattr(lib, f"rescale_{self._NAMES[out_dtype]}")
        self._rescale.argtypes = [p, i64, i64, p, i64, p, p, p, i32]
        for f in (self._per_token, self._per_tensor, self._rescale):
            f.restype = None

    def quantize(
        self, x: torch.Tensor, input_scale: torch.Tensor | None, workspace: Workspace
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`quantize_per_token(x)` or `quantize_per_tensor(x, input_scale)`, q in the workspace."""
        if x.stride(1) != 1:
            x = x.contiguous()
        rows, cols = x.shape
        q = workspace.take("q", x.shape, torch.int8)
        if input_scale is not None:
            scale = float(input_scale)
            self._per_tensor(x.data_ptr(), rows, cols, x.stride(0), scale, q.data_ptr(), torch.get_num_threads())
            return q, input_scale
        scale = workspace.take("scale", (rows, 1), torch.float32)
        self._per_token(x.data_ptr(), rows, cols, x.stride(0), q.data_ptr(), scale.data_ptr(), torch.get_num_threads())
        return q, scale

    def rescale(
        self,
        acc: torch.Tensor,
        scale: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
    ) -> None:
        """out[:] = `rescale(acc, scale, weight_scale, bias)` rounded to out's dtype; scale fp32 [rows, 1] or
        [1], weight_scale and bias contiguous fp32 [out]."""
        rows, cols = acc.shape
        sx_stride = 1 if scale.numel() > 1 else 0
        bias_ptr = None if bias is None else bias.data_ptr()
        self._rescale(
            acc.data_ptr(),
            rows,
            cols,
            scale.data_ptr(),
            sx_stride,
            weight_scale.data_ptr(),
            bias_ptr,
            out.data_ptr(),
            torch.get_num_threads(),
        )


def _c_kernels(x_dtype: torch.dtype, out_dtype: torch.dtype) -> _CKernels | None:
    """The C kernels for these dtypes, or None where they do not apply or cannot be built (torch ops run)."""
    if x_dtype not in _CKernels._NAMES or out_dtype not in _CKernels._NAMES or not native.enabled():
        return None
    return _c_kernels_for(x_dtype, out_dtype)


@functools.cache
def _c_kernels_for(x_dtype: torch.dtype, out_dtype: torch.dtype) -> _CKernels | None:
    lib = native.load("w8a8_cpu.c")
    return None if lib is None else _CKernels(lib, x_dtype, out_dtype)


# --- reusable temporaries --------------------------------------------------------------------------------------
# A W8A8 call on CPU needs fp32, int8 and int32 temporaries of [rows, in] / [rows, out]. Allocated fresh on every
# call, the multi-MB ones are returned to the OS when freed and page-faulted back on the next call: measured on a
# SmolLM2-135M prefill of 512 tokens, 20-25% of the W8A8 layers' time (abs and fp32 copies of [512, 1536] took
# 0.5 ms instead of 30 us). Each thread keeps one buffer per (name, dtype) instead, of at most
# `WORKSPACE_ELEMENTS` elements; longer calls run in row chunks that fit. At most about 13 bytes x
# WORKSPACE_ELEMENTS (27 MB) per thread that runs W8A8 layers on CPU, for the life of the thread.
WORKSPACE_ELEMENTS = 1 << 21


class Workspace(threading.local):
    """This thread's reusable CPU temporaries, one flat buffer per (name, dtype), grown on demand."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.views: dict[tuple, torch.Tensor] = {}  # the views handed out, by (name, dtype, shape): fewer ops

    def take(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape` and `dtype` (uninitialized) over buffer `name`; valid until the next
        `take` of the same name and dtype."""
        key = (name, dtype, tuple(shape))
        view = self.views.get(key)
        if view is not None:
            return view
        n = math.prod(shape)
        with torch.inference_mode(False):  # normal tensors, so in-place use is allowed in and out of it
            buffer = self.buffers.get((name, dtype))
            if buffer is None or buffer.numel() < n:
                buffer = self.buffers[(name, dtype)] = torch.empty(n, dtype=dtype)
                self.views = {k: v for k, v in self.views.items() if k[:2] != (name, dtype)}
            if len(self.views) >= 256:  # many prompt lengths: start over rather than grow
                self.views.clear()
            view = self.views[key] = buffer[:n].view(shape)
        return view


_WORKSPACE = Workspace()  # a threading.local: each thread sees its own buffers


def _buffer(workspace: Workspace | None, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor shaped like `like` on its device: from the workspace (CPU), else freshly allocated."""
    if workspace is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return workspace.take(name, like.shape, dtype)
