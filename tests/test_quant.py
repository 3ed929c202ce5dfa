"""core.quant: quantize / dequantize against a per-group reference loop written here."""

from __future__ import annotations

import pytest
import torch

from hf_ptq.core.quant import dequantize, qrange, quantize

GRANULARITIES = (0, -1, 16, 32)


def ref_group(values: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype):
    """(q, scale, zero_point) of one group of fp32 values, RTN with min/max range."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if sym:
        scale = values.abs().max() / qmax
    else:
        lo, hi = values.min().clamp(max=0.0), values.max().clamp(min=0.0)  # zero stays representable
        scale = (hi - lo) / (2**bits - 1)
    scale = scale.to(scale_dtype).float()  # rounding uses the scale as it will be stored
    if sym:
        return torch.clamp(torch.round(values / scale), qmin, qmax), scale, None
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).item()
    q = torch.clamp(torch.round(values / scale) + zp, qmin, qmax)
    return q, scale, zp


def ref_quant_dequant(w: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype):
    """Reference dequantized weight, scale per element and zero point per element (loops over groups)."""
    out_f, in_f = w.shape
    w = w.float()
    deq, scale_full, zp_full = torch.empty_like(w), torch.empty_like(w), torch.zeros_like(w)
    if group_size == 0:
        slices = [(slice(None), slice(None))]
    elif group_size == -1:
        slices = [(r, slice(None)) for r in range(out_f)]
    else:
        slices = [(r, slice(c, c + group_size)) for r in range(out_f) for c in range(0, in_f, group_size)]
    for idx in slices:
        q, s, z = ref_group(w[idx], bits, sym, scale_dtype)
        deq[idx] = (q - (z or 0)) * s
        scale_full[idx] = s
        zp_full[idx] = z or 0
    return deq, scale_full, zp_full


def weight(shape=(12, 64), seed=0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, :5] = torch.tensor([0.3, -0.2, 0.0, 1e-3, -1e-3])  # an outlier row
    return w.to(dtype)


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
@pytest.mark.parametrize("group_size", GRANULARITIES)
@pytest.mark.parametrize("sym", (True, False))
def test_quantize_matches_reference(bits: int, group_size: int, sym: bool) -> None:
    w = weight()
    qw = quantize(w, bits, group_size, sym)
    qmin, qmax = qrange(bits)
    assert qw.q.dtype == torch.int8 and qw.q.shape == w.shape
    assert qw.q.min() >= qmin and qw.q.max() <= qmax
    groups = {0: None, -1: 1}.get(group_size, 64 // max(group_size, 1))
    assert tuple(qw.scale.shape) == ((1,) if groups is None else (12, groups))
    assert (qw.zero_point is None) == sym
    if not sym:
        assert qw.zero_point.shape == qw.scale.shape
    ref, _, _ = ref_quant_dequant(w, bits, group_size, sym, torch.bfloat16)
    assert torch.equal(qw.dequantize(torch.float32), ref)
    assert torch.equal(dequantize(qw.q, qw.scale, qw.zero_point, group_size), ref)


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("group_size", GRANULARITIES)
@pytest.mark.parametrize("sym", (True, False))
def test_error_at_most_half_a_step(bits: int, group_size: int, sym: bool) -> None:
    """With fp32 scales every weight lies within scale/2 of its grid point (the grid spans [min, max])."""
    w = weight(dtype=torch.float32, seed=3)
    qw = quantize(w, bits, group_size, sym, scale_dtype=torch.float32)
    _, scale_full, _ = ref_quant_dequant(w, bits, group_size, sym, torch.float32)
    err = (qw.dequantize(torch.float32) - w).abs()
    assert torch.all(err <= scale_full / 2 * (1 + 1e-5) + 1e-9), (err / scale_full).max()


@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("group_size", GRANULARITIES)
@pytest.mark.parametrize("sym", (True, False))
def test_error_with_bf16_scales(bits: int, group_size: int, sym: bool) -> None:
    """bf16 scales: weights inside the representable grid are within scale/2 of it.

    Rounding the scale to bf16 (relative error <= 2^-9) can shrink the grid's span of (2^b - 1) steps by up to
    (2^b - 1) * 2^-9 steps, so weights at the range ends may be clamped: still within scale * (1/2 + (2^b-1)/512).
    """
    w = weight(seed=5)
    qw = quantize(w, bits, group_size, sym)
    _, scale_full, zp_full = ref_quant_dequant(w, bits, group_size, sym, torch.bfloat16)
    qmin, qmax = qrange(bits)
    lo, hi = (qmin - zp_full) * scale_full, (qmax - zp_full) * scale_full
    deq, wf = qw.dequantize(torch.float32), w.float()
    err = (deq - wf).abs()
    inside = (wf >= lo) & (wf <= hi)
    assert inside.float().mean() > 0.8
    assert torch.all(err[inside] <= scale_full[inside] / 2 * (1 + 1e-5))
    assert torch.all(err <= scale_full * (0.5 + (2**bits - 1) / 512) * (1 + 1e-5))
    assert torch.all((deq == lo) | (deq == hi) | inside)


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
@pytest.mark.parametrize("group_size", (0, -1, 8))
def test_zero_exactly_representable_asym(bits: int, group_size: int) -> None:
    """Exact zeros survive asymmetric quantization, also in groups that are otherwise all positive/negative."""
    w = torch.rand(6, 32) * 0.1 + 0.01  # rows 0-1 positive
    w[2:4] = -w[2:4]  # rows 2-3 negative
    w[4:] = torch.randn(2, 32) * 0.1  # rows 4-5 mixed
    zeros = torch.zeros_like(w, dtype=torch.bool)
    zeros[:, ::5] = True
    w[zeros] = 0.0
    if group_size == 0:  # per tensor: an all-positive tensor
        w = w[:2]
        zeros = zeros[:2]
    qw = quantize(w, bits, group_size, sym=False)
    deq = qw.dequantize(torch.float32)
    assert torch.all(deq[zeros] == 0.0)
    w_pos = torch.rand(4, 16) + 0.5  # no zero at all: the range still includes 0
    qw = quantize(w_pos, bits, group_size if group_size != 8 else 16, sym=False)
    assert torch.all(qw.zero_point == qrange(bits)[0])


@pytest.mark.parametrize("group_size", (8, 16, 32))
@pytest.mark.parametrize("sym", (True, False))
def test_g_idx_identity_equals_grouped(group_size: int, sym: bool) -> None:
    w = weight()
    qw = quantize(w, 4, group_size, sym)
    g_idx = (torch.arange(64) // group_size).to(torch.int32)
    grouped = dequantize(qw.q, qw.scale, qw.zero_point, group_size)
    assert torch.equal(dequantize(qw.q, qw.scale, qw.zero_point, group_size, g_idx), grouped)


@pytest.mark.parametrize("sym", (True, False))
def test_g_idx_permuted_matches_reference(sym: bool) -> None:
    """Channel c uses the qparams of group g_idx[c] (act-order layout)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 32), generator=g, dtype=torch.int8)
    scale = torch.rand(5, 4, generator=g) + 0.1
    zp = None if sym else torch.randint(-8, 8, (5, 4), generator=g, dtype=torch.int8)
    g_idx = torch.randperm(32, generator=g) // 8
    out = dequantize(q, scale, zp, 8, g_idx.to(torch.int32))
    ref = torch.empty(5, 32)
    for r in range(5):
        for c in range(32):
            z = 0 if zp is None else zp[r, g_idx[c]].item()
            ref[r, c] = (q[r, c].item() - z) * scale[r, g_idx[c]].item()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_dequantize_dtype_and_scale_dtype() -> None:
    w = weight()
    qw = quantize(w, 4, 32, False)
    assert qw.scale.dtype == torch.float32  # fp32 values of scales rounded to the weight dtype
    assert torch.equal(qw.scale, qw.scale.to(torch.bfloat16).float())
    assert qw.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_group_size_not_dividing_raises() -> None:
    with pytest.raises(ValueError, match="group_size=48"):
        quantize(weight(), 4, 48, False)


def test_all_zero_weight() -> None:
    """A zero row/tensor gets a tiny positive scale, not NaN."""
    for sym in (True, False):
        qw = quantize(torch.zeros(4, 32), 4, 16, sym)
        assert torch.all(qw.scale > 0)
        assert torch.equal(qw.dequantize(), torch.zeros(4, 32))
