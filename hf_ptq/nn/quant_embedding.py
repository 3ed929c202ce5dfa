"""Quantized input embedding and output head (`lm_head`): `embeddings="int8" | "int4"` (see `hf_ptq.core.embeddings`).

Buffers are those of a `QuantLinear` of (out, in) = (vocab, hidden), one row per vocabulary entry, so the layout on
disk is the one every quantized Linear has:
    weight_packed      int32 [vocab, ceil(hidden*bits/32)]
    weight_scale       [vocab, groups] in the model's dtype (int8: groups = 1, one scale per row)
    weight_zero_point  asymmetric int4 only: int32 [ceil(vocab*4/32), groups], packed along the vocabulary
    weight_shape       int64 [2] = (vocab, hidden)
Modules:
- `QuantEmbedding`: the input embedding. A lookup unpacks only the looked-up rows (index_select of their words,
  scales and zero points), exactly `(q - zero_point) * scale` rounded once to the model's dtype.
- `QuantOutputHead`: an untied output head with its own tensors (and bias).
- `TiedQuantHead`: the head of a model that ties it to the input embedding (`tie_word_embeddings`), as llama.cpp's
  `token_embd` serves both: it holds no tensor (the embedding is not its submodule), so the state dict, the
  checkpoint and the memory footprint have the packed matrix once, and it multiplies by the embedding's tensors.
The head's matmul is chosen per call as `QuantLinear`'s is (see `hf_ptq.kernels`): hf_ptq's packed CPU kernel, or
torch's int4 / int8 weight-only kernels, for few rows with bf16 activations, else the dense path, which dequantizes
`DENSE_CHUNK_ELEMENTS` values of the matrix at a time (never the whole vocabulary matrix in fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .. import kernels
from ..core.packing import packed_width, unpack_int32, unpack_unsigned_bytes
from ..core.quant import QuantizedWeight, dequantize
from ..core.scheme import WeightScheme
from .frozen_grad import frozen_matmul, needs_input_grad
from .quant_linear import DequantizedWeightAttribute

DENSE_CHUNK_ELEMENTS = 1 << 22  # values of the matrix the dense path dequantizes at a time (16 MB in fp32)


class _Plan(NamedTuple):
    matmul: Callable[..., torch.Tensor] | None  # packed kernel, None: dense path only
    layout: str
    build: Callable[[PackedRows], tuple] | None
    max_rows: int
    dense_dtype: torch.dtype


class PackedRows(DequantizedWeightAttribute):
    """A [rows, cols] matrix stored packed as above, with lookups of rows and products with inputs of cols values."""

    transposed_source = False  # for quantize-on-load, which reads this attribute of every target module

    def __init__(
        self,
        rows: int,
        cols: int,
        scheme: WeightScheme,
        dtype: torch.dtype = torch.bfloat16,
        compute_dtype: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        bits, group_size, sym = scheme.bits, scheme.group_size, scheme.sym
        if bits not in (4, 8) or group_size == 0 or (group_size > 0 and cols % group_size):
            raise ValueError(f"unsupported embedding grid {scheme} for rows of {cols} values")
        self.out_features, self.in_features = rows, cols
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.compute_dtype = compute_dtype
        groups = 1 if group_size == -1 else cols // group_size
        kw = {"device": device}
        self.register_buffer("weight_packed", torch.empty(rows, packed_width(cols, bits), dtype=torch.int32, **kw))
        self.register_buffer("weight_scale", torch.empty(rows, groups, dtype=dtype, **kw))
        if sym:
            self.weight_zero_point = None
        else:
            self.register_buffer(
                "weight_zero_point", torch.empty(packed_width(rows, bits), groups, dtype=torch.int32, **kw)
            )
        self.register_buffer("weight_shape", torch.tensor([rows, cols], dtype=torch.int64, device=device))
        self._kernel_cache: dict[tuple, tuple] = {}
        self._plans: dict[tuple, _Plan] = {}

    @property
    def scheme(self) -> WeightScheme:
        return WeightScheme(self.bits, self.group_size, self.sym)

    # --- filling ---------------------------------------------------------------------------------------------
    def set_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the tensors `hf_ptq.core.embeddings.pack_rows` made (names without prefix) as this module's buffers."""
        for name, value in tensors.items():
            expected = getattr(self, name)
            if expected is None or tuple(value.shape) != tuple(expected.shape):
                got = tuple(value.shape)
                raise ValueError(f"{name}: shape {got} != {None if expected is None else tuple(expected.shape)}")
            setattr(self, name, value)
        self.invalidate_caches()

    def invalidate_caches(self) -> None:
        self._kernel_cache.clear()
        self._plans.clear()

    def _apply(self, fn, recurse: bool = True):
        self.invalidate_caches()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.invalidate_caches()
        super()._load_from_state_dict(*args, **kwargs)

    # --- unpacking -------------------------------------------------------------------------------------------
    def _row_zero_points(self, index: torch.Tensor) -> torch.Tensor:
        """Signed zero points [n, groups] (int32) of the rows `index` (int64 [n]), from the words packed along rows."""
        per_word = 32 // self.bits
        words = self.weight_zero_point.index_select(0, index // per_word)
        shift = ((index % per_word) * self.bits).to(torch.int32).unsqueeze(1)
        return ((words >> shift) & ((1 << self.bits) - 1)) - (1 << (self.bits - 1))

    def dequantized_rows(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows `index` (int64 [n]) of the matrix, [n, cols] in `dtype` (default: the scale's): only their words and
        qparams are read, `(u - 2^(b-1) - zero_point) * scale` in fp32, rounded once."""
        index = index.reshape(-1).to(device=self.weight_packed.device, dtype=torch.int64)
        n, cols = index.numel(), self.in_features
        u = unpack_unsigned_bytes(self.weight_packed.index_select(0, index), self.bits, cols)
        scale = self.weight_scale.index_select(0, index).float()
        center = torch.full_like(scale, float(1 << (self.bits - 1)))
        if self.weight_zero_point is not None:
            center += self._row_zero_points(index).float()
        w = u.reshape(n, scale.shape[1], -1).float().sub_(center.unsqueeze(-1)).mul_(scale.unsqueeze(-1))
        return w.reshape(n, cols).to(dtype or self.weight_scale.dtype)

    def quantized_weight(self) -> QuantizedWeight:
        """The signed integers [rows, cols] and qparams (zero points [rows, groups] unpacked)."""
        q = unpack_int32(self.weight_packed, self.bits, self.in_features, dim=1)
        zp = None
        if self.weight_zero_point is not None:
            zp = unpack_int32(self.weight_zero_point, self.bits, self.out_features, dim=0)
        return QuantizedWeight(q, self.weight_scale, zp, self.bits, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole matrix [rows, cols] in `dtype` (default: the scale's), as `core.quant.dequantize` gives it."""
        qw = self.quantized_weight()
        return dequantize(qw.q, qw.scale, qw.zero_point, self.group_size, None, dtype or self.weight_scale.dtype)

    # --- products with the matrix (the output head) ----------------------------------------------------------
    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., cols] @ matrix^T (+ bias) -> [..., rows] in x's dtype (with gradients for x and the bias where
        autograd needs them: `hf_ptq.nn.frozen_grad`)."""
        if needs_input_grad(x, bias):
            dense = kernels.compute_dtypes(self.compute_dtype, x)[1]
            forward = lambda x: self._matmul_frozen(x, bias)  # noqa: E731
            return frozen_matmul(x, bias, forward, lambda g: self._input_grad(g, dense))
        return self._matmul_frozen(x, bias)

    def _matmul_frozen(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        plan = self._plans.get((x.device, x.dtype))
        if plan is None:
            plan = self._plans[(x.device, x.dtype)] = self._plan(x)
        x2 = x.reshape(-1, self.in_features)
        if plan.matmul is not None and x2.shape[0] <= plan.max_rows:
            rows = x2 if x2.dtype == torch.bfloat16 and x2.is_contiguous() else x2.to(torch.bfloat16).contiguous()
            y = plan.matmul(rows, *self._cached(plan.layout, x2.device, plan.build))
            if bias is not None:
                y = y + bias.to(y.dtype)
        else:
            y = self._dense_matmul(x2.to(plan.dense_dtype), bias)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def matmul_reference(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 dequantize-then-matmul: what every path is checked against."""
        b = None if bias is None else bias.float()
        return kernels.dense_matmul(x.float(), self.dequantized_weight(torch.float32), b)

    def _plan(self, x: torch.Tensor) -> _Plan:
        """Which packed kernel runs inputs like x, for how many rows, and the dense path's dtype (as `QuantLinear`)."""
        kernel_dtype, dense_dtype = kernels.compute_dtypes(self.compute_dtype, x)
        device = x.device
        max_rows = kernels.kernel_max_rows(self.bits, device.type)
        dense_only = _Plan(None, "", None, 0, dense_dtype)
        if kernel_dtype != torch.bfloat16 or max_rows <= 0:
            return dense_only
        members = kernels.packed_matmul_group(self.in_features, self.group_size, self.bits)
        if device.type == "cpu" and members is not None and kernels.packed_matmul_cpu_available():
            return _Plan(kernels.packed_matmul_cpu, "packed_cpu", PackedRows._build_packed_cpu, max_rows, dense_dtype)
        if device.type == "cpu" and self.bits == 4:
            if kernels.int4_kernel_group(self.in_features, self.group_size) is None:
                return dense_only
            return _Plan(kernels.int4_cpu_matmul, "int4_cpu", PackedRows._build_int4_cpu, max_rows, dense_dtype)
        if self.bits == 8 and self.sym and self.group_size == -1 and device.type in ("cpu", "cuda"):
            return _Plan(kernels.int8_matmul, "int8", PackedRows._build_int8, max_rows, dense_dtype)
        return dense_only

    def _cached(self, name: str, device: torch.device, build: Callable[[PackedRows], tuple]) -> tuple:
        key = (name, device)
        if key not in self._kernel_cache:
            self._kernel_cache[key] = build(self)
        return self._kernel_cache[key]

    def _build_packed_cpu(self) -> tuple:
        """Arguments of `kernels.packed_matmul_cpu` after x: the packed codes (no copy), fp32 scales and centers
        `2^(b-1) + zero_point` [rows, groups]."""
        scale = self.weight_scale.float().contiguous()
        center = torch.full_like(scale, float(1 << (self.bits - 1)))
        if self.weight_zero_point is not None:
            rows = torch.arange(self.out_features, device=scale.device)
            center += self._row_zero_points(rows).float()
        members = kernels.packed_matmul_group(self.in_features, self.group_size, self.bits)
        return self.weight_packed, self.bits, scale, center.contiguous(), members

    def _build_int4_cpu(self) -> tuple:
        qw = self.quantized_weight()
        return kernels.prepare_int4_cpu(qw.q, qw.scale, qw.zero_point, self.group_size)

    def _build_int8(self) -> tuple:
        qw = self.quantized_weight()
        return qw.q.contiguous(), qw.scale.reshape(-1)

    def _dense_matmul(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x2 [n, cols] (the dense dtype) @ matrix^T, the matrix dequantized `DENSE_CHUNK_ELEMENTS` values at a time."""
        step = max(1, DENSE_CHUNK_ELEMENTS // self.in_features)
        if step >= self.out_features:
            weight = self.dequantized_rows(torch.arange(self.out_features, device=x2.device), x2.dtype)
            return kernels.dense_matmul(x2, weight, None if bias is None else bias.to(x2.dtype))
        y = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            weight = self.dequantized_rows(torch.arange(start, stop, device=x2.device), x2.dtype)
            y[:, start:stop] = kernels.dense_matmul(x2, weight, None)
        return y if bias is None else y.add_(bias.to(y.dtype))

    def _input_grad(self, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """g [n, rows] @ matrix -> [n, cols] in `dtype`, the matrix dequantized `DENSE_CHUNK_ELEMENTS` values at a
        time as in `_dense_matmul` (a 128k-vocabulary head is never whole in float)."""
        step = max(1, DENSE_CHUNK_ELEMENTS // self.in_features)
        g = g.to(dtype)
        out = torch.zeros(g.shape[0], self.in_features, dtype=torch.float32, device=g.device)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            weight = self.dequantized_rows(torch.arange(start, stop, device=g.device), dtype)
            out += (g[:, start:stop] @ weight).float()
        return out

    def _grid_repr(self) -> str:
        gran = "per-row" if self.group_size == -1 else f"group_size={self.group_size}"
        return f"bits={self.bits}, {gran}, sym={self.sym}"


class QuantEmbedding(PackedRows):
    """`nn.Embedding` replacement holding the packed matrix [num_embeddings, embedding_dim]."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        scheme: WeightScheme,
        dtype: torch.dtype = torch.bfloat16,
        padding_idx: int | None = None,
        embed_scale: float | None = None,
        compute_dtype: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, scheme, dtype, compute_dtype, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        # Gemma-style scaled embeddings multiply the looked-up rows by a constant (`scalar_embed_scale`), as a
        # Python float: a buffer would be re-created empty by transformers' loading (non-persistent buffers)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.dequantized_rows(input_ids.reshape(-1)).reshape(*input_ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, device=out.device).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        scaled = "" if self.embed_scale is None else f", embed_scale={self.embed_scale:g}"
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._grid_repr()}{scaled}"


class QuantOutputHead(PackedRows):
    """`nn.Linear` replacement for an untied output head (`lm_head`), with its own packed matrix [out, in]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        scheme: WeightScheme,
        dtype: torch.dtype = torch.bfloat16,
        compute_dtype: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(out_features, in_features, scheme, dtype, compute_dtype, device)
        kw = {"device": device, "dtype": dtype}
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._grid_repr()}"


class TiedQuantHead(nn.Module):
    """The output head of a tied model: multiplies by its `QuantEmbedding`'s tensors, holds none itself."""

    transposed_source = False

    def __init__(self, embedding: QuantEmbedding, bias: bool = False, device: torch.device | str | None = None):
        super().__init__()
        self.__dict__["_embedding"] = embedding  # not a submodule: its tensors are saved (and counted) once
        dtype = embedding.weight_scale.dtype
        self.bias = (
            nn.Parameter(torch.empty(embedding.num_embeddings, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @property
    def embedding(self) -> QuantEmbedding:
        return self.__dict__["_embedding"]

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.matmul(x, self.bias)

    def extra_repr(self) -> str:
        return f"tied to the input embedding ({self.out_features} x {self.in_features}, {self.embedding._grid_repr()})"


EMBEDDING_MODULES = (QuantEmbedding, QuantOutputHead, TiedQuantHead)
