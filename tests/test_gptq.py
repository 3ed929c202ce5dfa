"""GPTQ on single weights: Hessian, error against RTN, agreement with a naive reference, act-order grids."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_ptq import PtqConfig
from hf_ptq.core.clip_search import clipped_qparams
from hf_ptq.core.cpu import cpu_has_fast_bf16
from hf_ptq.core.quant import compute_qparams, dequantize, quantize, quantize_with
from hf_ptq.methods.gptq import GPTQ, gptq_quantize, inverse_hessian_factor


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """x [n, dim] with strongly correlated channels and uneven scales (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    scales = torch.exp(torch.randn(dim, generator=g))
    latent = torch.randn(n, dim // 4, generator=g)
    low_rank = latent @ torch.randn(dim // 4, dim, generator=g)
    return (low_rank + 0.3 * torch.randn(n, dim, generator=g)) @ mix * scales


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    x = x.double().reshape(-1, x.shape[-1])
    return (2 * x.T @ x / x.shape[0]).float()


def out_err(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return (x.double() @ (w.double() - wq.double()).T).norm().item()


def reference_gptq(
    w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, sym: bool, damp: float = 0.01
) -> torch.Tensor:
    """Dequantized GPTQ weight written from the paper's equations, in float64, without any of the speed-ups.

    Column j in order: fix its qparams at the start of its group from the current weights, q = round(w_j),
    then spread the error over the later columns with the current inverse Hessian,
    w_k -= (w_j - q_j) / Hinv[j, j] * Hinv[j, k], and remove column j from Hinv (Schur complement).
    """
    w = w.double().clone()
    h = h.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    out_f, in_f = w.shape
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    gs = group_size if group_size > 0 else in_f
    result = torch.zeros_like(w)
    for j in range(in_f):
        if j % gs == 0:
            block = w[:, j : j + gs].float()
            scale, zero = compute_qparams(block.amin(1), block.amax(1), bits, sym, torch.bfloat16)
            scale = scale.double()
            zero = torch.zeros_like(scale) if zero is None else zero.double()
        q = torch.clamp(torch.round(w[:, j] / scale) + zero, qmin, qmax)
        result[:, j] = (q - zero) * scale
        err = (w[:, j] - result[:, j]) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return result.float()


def test_hessian_matches_direct_computation() -> None:
    acc = GPTQ(24)
    batches = [correlated_inputs(n, 24, seed=n).reshape(-1, n // 5 if n % 5 == 0 else 1, 24) for n in (5, 40, 13)]
    for x in batches:
        acc.add_batch(x.to(torch.bfloat16))
    x_all = torch.cat([b.reshape(-1, 24).to(torch.bfloat16) for b in batches])
    assert acc.rows == 58 and acc.hessian.dtype == torch.float32
    expected = hessian_of(x_all.float())
    # where bf16 matmuls are native, each batch's sum is rounded to bf16 (relative 2^-9) before the fp32 total
    tol = 2**-8 if cpu_has_fast_bf16() else 1e-6
    torch.testing.assert_close(acc.hessian, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("dim", [600, 1100])
def test_tiled_hessian_matches_direct_computation(dim: int) -> None:
    """Wide inputs accumulate only the tiles on and above the diagonal; the mirrored result is the full XᵀX."""
    acc = GPTQ(dim)
    batches = [torch.randn(n, dim, generator=torch.Generator().manual_seed(n)) for n in (70, 33)]
    for x in batches:
        acc.add_batch(x)
    first = acc.hessian.clone()
    acc.add_batch(torch.zeros(0, dim))  # an empty batch changes nothing
    torch.testing.assert_close(acc.hessian, first)
    torch.testing.assert_close(acc.hessian, hessian_of(torch.cat(batches)), rtol=1e-5, atol=1e-4)
    assert torch.equal(acc.hessian, acc.hessian.T)


def _row_errors(w: torch.Tensor, scale, zero, bits: int, importance: torch.Tensor) -> torch.Tensor:
    s, z = scale[:, None], None if zero is None else zero[:, None]
    return ((w - dequantize(quantize_with(w, s, z, bits, -1), s, z, -1)) ** 2) @ importance


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_never_worse_than_min_max(sym: bool) -> None:
    """On its own objective (importance-weighted squared rounding error) the searched range beats or ties min/max on
    every row, and beats it on most rows of heavy-tailed weights."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g) * torch.exp(0.5 * torch.randn(64, 32, generator=g))  # heavy tails
    importance = torch.rand(32, generator=g) + 0.1
    plain = compute_qparams(w.amin(1), w.amax(1), 4, sym, torch.bfloat16)
    searched = clipped_qparams(w, 4, sym, torch.bfloat16, importance)
    assert searched[0].dtype == torch.float32 and (searched[1] is None) == sym
    before, after = _row_errors(w, *plain, 4, importance), _row_errors(w, *searched, 4, importance)
    assert bool((after <= before).all())
    assert float((after < before).float().mean()) > 0.5 and float(after.sum()) < 0.95 * float(before.sum())
    assert torch.equal(searched[0], searched[0].to(torch.bfloat16).float())  # scales as they will be stored


def test_gptq_with_clip_search_lowers_output_error() -> None:
    """Searched group ranges (dynamic groups, natural order) give a lower output error than min/max ranges on
    heavy-tailed weights, summed over a few draws (a heuristic: not on every single draw)."""
    clipped_total = plain_total = 0.0
    for seed in range(3):
        torch.manual_seed(seed)
        w = torch.randn(64, 64) * torch.exp(0.5 * torch.randn(64, 64))
        x = correlated_inputs(512, 64, seed)
        h = hessian_of(x)
        plain = gptq_quantize(w, h, 4, 16, False, scale_dtype=torch.bfloat16)
        clipped = gptq_quantize(w, h, 4, 16, False, clip=True, scale_dtype=torch.bfloat16)
        plain_total += out_err(w, plain.dequantize(), x)
        clipped_total += out_err(w, clipped.dequantize(), x)
    assert clipped_total < 0.9 * plain_total


@pytest.mark.parametrize(
    ("bits", "group_size", "sym"), [(4, 32, False), (4, -1, True), (3, 16, False), (2, 32, False), (8, 32, True)]
)
def test_output_error_below_rtn(bits: int, group_size: int, sym: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    x = correlated_inputs(512, 64)
    qw = gptq_quantize(w, hessian_of(x), bits, group_size, sym, scale_dtype=torch.bfloat16)
    rtn = quantize(w, bits, group_size, sym, torch.bfloat16)
    assert qw.q.dtype == torch.int8 and qw.scale.shape == rtn.scale.shape
    assert (qw.zero_point is None) == sym
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert int(qw.q.min()) >= lo and int(qw.q.max()) <= hi
    gptq_err, rtn_err = out_err(w, qw.dequantize(), x), out_err(w, rtn.dequantize(), x)
    assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)


@pytest.mark.parametrize(("group_size", "block_size"), [(16, 128), (16, 5), (-1, 7), (32, 8)])
def test_matches_naive_reference(group_size: int, block_size: int) -> None:
    """Lazy block updates + Cholesky factor give the paper's result (block sizes not aligned to groups too)."""
    torch.manual_seed(1)
    w = torch.randn(40, 64)
    h = hessian_of(correlated_inputs(256, 64, seed=3))
    qw = gptq_quantize(w, h, 4, group_size, False, block_size=block_size, scale_dtype=torch.bfloat16)
    ref = reference_gptq(w, h, 4, group_size, False)
    deq = qw.dequantize()
    same = (deq == ref).float().mean().item()
    assert same > 0.99, same  # a handful of values may land on the other side of a rounding boundary
    assert out_err(w, deq, torch.eye(64)) == pytest.approx(out_err(w, ref, torch.eye(64)), rel=0.02)


def test_act_order_with_static_groups_keeps_the_natural_grid() -> None:
    """static_groups: act-order changes the rounding order but not the grid: the qparams are RTN's, per natural
    group, identical with and without reordering, and no g_idx is needed."""
    torch.manual_seed(2)
    w = torch.randn(32, 64)
    h = hessian_of(correlated_inputs(256, 64, seed=5))
    ordered = gptq_quantize(w, h, 4, 16, False, desc_act=True, static_groups=True, scale_dtype=torch.bfloat16)
    plain = gptq_quantize(w, h, 4, 16, False, desc_act=False, static_groups=True, scale_dtype=torch.bfloat16)
    rtn = quantize(w, 4, 16, False, torch.bfloat16)
    assert ordered.g_idx is None and plain.g_idx is None
    for qw in (ordered, plain):
        assert torch.equal(qw.scale, rtn.scale) and torch.equal(qw.zero_point, rtn.zero_point)
    assert not torch.equal(ordered.q, plain.q)  # the visiting order did change the result


def test_act_order_dynamic_groups_follow_hessian_order() -> None:
    """Without static groups, group k holds the k-th run of `group_size` columns by decreasing H diagonal."""
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    h = hessian_of(correlated_inputs(256, 64, seed=7))
    qw = gptq_quantize(w, h, 4, 16, True, desc_act=True, scale_dtype=torch.bfloat16)
    order = torch.argsort(h.diagonal(), descending=True)
    expected = torch.empty(64, dtype=torch.int32)
    expected[order] = torch.arange(64, dtype=torch.int32) // 16
    assert torch.equal(qw.g_idx, expected)
    assert torch.bincount(qw.g_idx.long()).tolist() == [16] * 4
    # dequantization through g_idx is what the reference computes when visiting columns in that order
    ref = reference_gptq(w[:, order], h[order][:, order], 4, 16, True)
    same = (qw.dequantize()[:, order] == ref).float().mean().item()
    assert same > 0.99, same


def test_act_order_helps_on_uneven_inputs() -> None:
    torch.manual_seed(4)
    w = torch.randn(64, 128)
    x = correlated_inputs(1024, 128, seed=11)
    h = hessian_of(x)
    plain = gptq_quantize(w, h, 3, -1, False, scale_dtype=torch.bfloat16)
    ordered = gptq_quantize(w, h, 3, -1, False, desc_act=True, scale_dtype=torch.bfloat16)
    assert out_err(w, ordered.dequantize(), x) < out_err(w, plain.dequantize(), x)


def test_dead_inputs_get_zero_weights() -> None:
    torch.manual_seed(5)
    w = torch.randn(16, 32)
    x = correlated_inputs(128, 32)
    x[:, [3, 17]] = 0
    qw = gptq_quantize(w, hessian_of(x), 4, 16, False, scale_dtype=torch.bfloat16)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[:, [3, 17]], torch.zeros(16, 2))
    rtn = quantize(w, 4, 16, False, torch.bfloat16).dequantize()
    assert out_err(w, deq, x) < out_err(w, rtn, x)


def test_cholesky_failure_retries_with_more_damping(caplog: pytest.LogCaptureFixture) -> None:
    h = torch.tensor([[1.25, 1.75], [1.75, 1.25]])  # eigenvalues 3 and -0.5: not a Hessian, no Cholesky at 1%
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        upper, damp = inverse_hessian_factor(h, 0.01)
    assert damp >= 1.0  # 0.01 and 0.1 leave a negative eigenvalue
    assert "damp_percent=0.01" in caplog.text and "not positive definite" in caplog.text
    damped = h + damp * 1.25 * torch.eye(2)  # damp is relative to the mean diagonal
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped))
    with pytest.raises(ValueError, match="singular"):
        inverse_hessian_factor(torch.full((2, 2), float("nan")), 0.01)


def test_per_tensor_and_sym_shapes() -> None:
    torch.manual_seed(6)
    w = torch.randn(8, 32)
    h = hessian_of(correlated_inputs(64, 32))
    qw = gptq_quantize(w, h, 4, 0, False, scale_dtype=torch.bfloat16)
    assert qw.scale.shape == (1,) and qw.zero_point.shape == (1,)
    qw = gptq_quantize(w, h, 8, -1, True, scale_dtype=torch.bfloat16)
    assert qw.scale.shape == (8, 1) and qw.zero_point is None
    assert (qw.dequantize() - w).abs().mean() < qw.scale.mean()  # GPTQ trades per-weight for output error


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "rtn", "desc_act": True}, "desc_act"),
        ({"method": "int8", "damp_percent": 0.1}, "damp_percent"),
        ({"method": "rtn", "static_groups": False}, "static_groups"),
        ({"method": "gptq", "damp_percent": 0}, "damp_percent"),
        ({"method": "gptq", "damp_percent": 1.5}, "damp_percent"),
        ({"method": "gptq", "desc_act": "yes"}, "desc_act"),
        ({"method": "gptq", "true_sequential": 1}, "true_sequential"),
        ({"method": "gptq", "block_size": 0}, "block_size"),
        ({"method": "gptq", "clip": "mse"}, "clip"),
        ({"method": "rtn", "clip": True}, "clip"),
        ({"method": "gptq", "tokenizer": 3}, "tokenizer"),
    ],
)
def test_gptq_config_fields_validated(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PtqConfig(**kwargs)


def test_gptq_config_defaults_and_round_trip() -> None:
    cfg = PtqConfig(method="gptq", group_size=64, desc_act=True, dataset=["some calibration text"], tokenizer="tok")
    assert (cfg.desc_act, cfg.static_groups, cfg.damp_percent, cfg.true_sequential) == (True, False, 0.01, True)
    assert cfg.act_order_modules and not PtqConfig(method="gptq", desc_act=True, static_groups=True).act_order_modules
    data = cfg.to_dict()
    assert data["dataset"] is None and data["tokenizer"] == "tok"
    assert PtqConfig(**data) == cfg
    rtn = PtqConfig().to_dict()
    assert rtn["desc_act"] is None and PtqConfig(**rtn) == PtqConfig()
    assert PtqConfig(method="gptq").dataset_description == {"source": "sampled-from-model"}


def test_factorization_keeps_the_callers_thread_count(monkeypatch) -> None:
    """gptq_quantize runs its small ops on one CPU thread, but the factorization of H (whose LAPACK bits depend on
    the thread count) with the caller's count; the caller's count is restored afterwards."""
    import hf_ptq.methods.gptq as gptq_module

    seen = {}
    factor, search = torch.cholesky_inverse, gptq_module.clipped_qparams

    def recording_factor(*args, **kwargs):
        seen["factor"] = torch.get_num_threads()
        return factor(*args, **kwargs)

    def recording_search(*args, **kwargs):
        seen.setdefault("search", set()).add(torch.get_num_threads())
        return search(*args, **kwargs)

    monkeypatch.setattr(torch, "cholesky_inverse", recording_factor)
    monkeypatch.setattr(gptq_module, "clipped_qparams", recording_search)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = correlated_inputs(256, 64)
        w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
        gptq_quantize(w, hessian_of(x), 4, 32, False, desc_act=True, clip=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == {"factor": 2, "search": {1}}  # a 48 x 32 range search is small work
