"""gguf_kquants: Q4_K / Q5_K / Q6_K bytes as gguf (the reference reader) decodes them: exact on representable grids,
the packing against the encoder's own reconstruction, quality against a naive encoder, the grid= path, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from optional_extras import import_optional

from hf_ptq.formats import gguf_kquants as kq

pytestmark = pytest.mark.extra("gguf")
gguf = import_optional("gguf")  # None without the extra: every test here is skipped then

NMAX = {"Q4_K": 15, "Q5_K": 31}


def decode(data: np.ndarray, type_name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, type_name)))


def fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def top_half(g: torch.Generator, shape: tuple[int, ...], lo: int, hi: int) -> torch.Tensor:
    """Random integers in [lo, hi], one per last-dim row set into the upper half of the range (a full-range lattice,
    as any encoder using the sub-scales' bits leaves it)."""
    v = torch.randint(lo, hi + 1, shape, generator=g)
    top = torch.randint((hi + 1) // 2 + 1, hi + 1, shape[:-1], generator=g)
    return v.scatter(-1, torch.randint(0, shape[-1], (*shape[:-1], 1), generator=g), top.unsqueeze(-1))


def representable(type_name: str, rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """A weight exactly on a `type_name` grid (random fp16 d / dmin, sub-scales, integers), computed as the reader
    computes it. Each sub-block uses its whole integer range (0 and nmax; Q6_K: -32): an encoder anchored on the
    sub-block's extremes cannot tell other sub-blocks from a grid with a different min."""
    g = torch.Generator().manual_seed(seed)
    nb = n // 256
    d = fp16(torch.empty(rows, nb, 1).uniform_(1e-4, 1e-2, generator=g))
    if type_name == "Q6_K":
        sc = top_half(g, (rows, nb, 16), 0, 127) * (torch.randint(0, 2, (rows, nb, 16), generator=g) * 2 - 1)
        q = torch.randint(0, 64, (rows, nb, 16, 16), generator=g)
        q[..., 0] = 0
        return ((d * sc).unsqueeze(-1) * (q - 32)).reshape(rows, n)
    nmax = NMAX[type_name]
    dmin = fp16(torch.empty(rows, nb, 1).uniform_(1e-4, 1e-2, generator=g))
    sc, m = top_half(g, (rows, nb, 8), 0, 63), top_half(g, (rows, nb, 8), 0, 63)
    q = torch.randint(0, nmax + 1, (rows, nb, 8, 32), generator=g)
    q[..., 0], q[..., 1] = 0, nmax
    return ((d * sc).unsqueeze(-1) * q - (dmin * m).unsqueeze(-1)).reshape(rows, n)


def gaussian(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with 0.2% outliers of 8 sigma."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * 0.02
    idx = torch.randint(0, w.numel(), (w.numel() // 500,), generator=g)
    w.view(-1)[idx] *= 8
    return w


def naive(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """Reference: per sub-block min / max (Q6_K: largest |w|) scale, sub-scales rounded to 6 (8) bits of
    max / 63 (max / 128), weights rounded to nearest; the reconstruction."""
    rows, n = w.shape
    if type_name == "Q6_K":
        x = w.reshape(rows, -1, 16, 16)
        s = -x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1) / 32
        d = fp16(-s.gather(-1, s.abs().argmax(-1, keepdim=True)) / 128)
        step = (d * torch.where(d != 0, s / d, 0).round().clamp(-128, 127)).unsqueeze(-1)
        return (step * torch.where(step != 0, x / step, 0).round().clamp(-32, 31)).reshape(rows, n)
    x = w.reshape(rows, -1, 8, 32)
    lo = x.amin(-1).clamp(max=0)
    s, m = (x.amax(-1) - lo) / NMAX[type_name], -lo
    d, dmin = fp16(s.amax(-1, keepdim=True) / 63), fp16(m.amax(-1, keepdim=True) / 63)
    step = (d * torch.where(d > 0, s / d, 0).round().clamp(0, 63)).unsqueeze(-1)
    off = (dmin * torch.where(dmin > 0, m / dmin, 0).round().clamp(0, 63)).unsqueeze(-1)
    q = torch.where(step > 0, (x + off) / step, 0).round().clamp(0, NMAX[type_name])
    return (step * q - off).reshape(rows, n)


def rel_rms(w_hat: torch.Tensor, w: torch.Tensor, imp: torch.Tensor | None = None) -> float:
    imp = torch.ones(w.shape[1]) if imp is None else imp
    return (((w_hat - w) ** 2 * imp).sum() / (w**2 * imp).sum()).sqrt().item()


def grid_weight(rows: int, n: int, equal: bool, seed: int = 0):
    """A weight on a 4-bit asymmetric grid of groups of 32 (w = scale * u - offset, offset = scale * zero, integer
    zero-points, fp16 scales): with `equal`, one scale per super-block; else per group in [0.6, 1] x the largest."""
    g = torch.Generator().manual_seed(seed)
    groups = n // 32
    top = fp16(torch.empty(rows, n // 256, 1).uniform_(1e-3, 2e-2, generator=g))
    ratio = torch.ones(rows, n // 256, 8) if equal else torch.empty(rows, n // 256, 8).uniform_(0.6, 1, generator=g)
    scale = fp16(top * ratio).reshape(rows, groups)
    offset = scale * torch.randint(0, 16, (rows, groups), generator=g)
    u = torch.randint(0, 16, (rows, groups, 32), generator=g)
    w = (scale.unsqueeze(-1) * u - offset.unsqueeze(-1)).reshape(rows, n)
    return w, (scale, offset), u


@pytest.mark.parametrize("type_name", kq.K_TYPES)
def test_representable_grid_is_exact(type_name):
    w = representable(type_name, 8, 1024)
    data = kq.encode(w, type_name)
    assert data.dtype == np.uint8 and data.shape == (8, 4 * kq.BLOCK_BYTES[type_name])
    torch.testing.assert_close(decode(data, type_name), w, rtol=0, atol=0)


EDGE = {
    "zeros": torch.zeros(2, 512),
    "constant positive": torch.full((2, 512), 0.37),
    "constant negative": torch.full((2, 512), -2.5),
    "positive only": torch.rand(2, 512, generator=torch.Generator().manual_seed(1)) + 0.5,
    "negative only": -torch.rand(2, 512, generator=torch.Generator().manual_seed(2)) - 0.5,
    "zero super-block": torch.cat([torch.zeros(2, 256), gaussian(2, 256)], 1),
    "large": gaussian(2, 512) * 1e6,
    "small": gaussian(2, 512) * 1e-3,
    "magnitudes": gaussian(2, 512) * torch.logspace(-2, 3, 512),
}


@pytest.mark.parametrize("type_name", kq.K_TYPES)
@pytest.mark.parametrize("case", EDGE)
def test_bytes_decode_to_the_reconstruction(type_name, case):
    """A wrong packing (bit order, sub-scale layout, field offsets) decodes to something else."""
    w = EDGE[case]
    data, recon = kq._encode(w, type_name, None, None, reconstruct=True)
    w_hat = decode(data, type_name)
    torch.testing.assert_close(w_hat, recon, rtol=0, atol=0)
    bound = {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.04}[type_name]  # ~1.5x the Gaussian error: nothing degenerate
    if case == "zeros":
        assert (w_hat == 0).all()
    elif case.startswith("constant"):
        assert (w_hat - w).abs().max() <= 1e-3 * w.abs().max()  # fp16 precision of d * sc
    elif case == "magnitudes":  # each super-block on its own scale
        for b in range(2):
            blk = slice(256 * b, 256 * (b + 1))
            assert rel_rms(w_hat[:, blk], w[:, blk]) < bound
    else:
        assert rel_rms(w_hat, w) < bound


@pytest.mark.parametrize("type_name", kq.K_TYPES)
def test_packing_with_importance_and_grid(type_name):
    w = gaussian(4, 768)
    imp = torch.rand(768, generator=torch.Generator().manual_seed(3)) ** 4
    data, recon = kq._encode(w, type_name, imp, None, reconstruct=True)
    torch.testing.assert_close(decode(data, type_name), recon, rtol=0, atol=0)
    if type_name != "Q6_K":
        w, grid, _ = grid_weight(4, 768, equal=False)
        data, recon = kq._encode(w, type_name, None, grid, reconstruct=True)
        torch.testing.assert_close(decode(data, type_name), recon, rtol=0, atol=0)


@pytest.mark.parametrize("type_name", kq.K_TYPES)
def test_quality(type_name):
    w = gaussian(64, 1024)
    err = rel_rms(decode(kq.encode(w, type_name), type_name), w)
    assert err < 0.97 * rel_rms(naive(w, type_name), w)
    # importance: a few inputs matter much more (as a Hessian diagonal's heavy columns)
    imp = torch.rand(1024, generator=torch.Generator().manual_seed(4)) ** 6 * 100 + 0.01
    without = rel_rms(decode(kq.encode(w, type_name), type_name), w, imp)
    with_imp = rel_rms(decode(kq.encode(w, type_name, importance=imp), type_name), w, imp)
    assert with_imp < 0.95 * without


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K"])
def test_grid_equal_subscales_is_exact(type_name):
    w, grid, u = grid_weight(8, 1024, equal=True)
    data = kq.encode(w, type_name, grid=grid)
    torch.testing.assert_close(decode(data, type_name), w, rtol=0, atol=0)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K"])
def test_grid_unequal_subscales(type_name):
    """Bound: each sub-scale is d * round(scale / d), within d / 2 of the grid's, and each sub-min is re-fitted to
    it within dmin / 2, so keeping the grid's integers u in [0, 15] moves a weight by at most 15 d / 2 + dmin / 2;
    rounding to nearest only comes closer. With sub-scales in [0.6, 1] x the largest (d about largest / 63) that is
    well under half a grid step, so most integers are kept."""
    w, grid, u = grid_weight(16, 1024, equal=False)
    data = kq.encode(w, type_name, grid=grid)
    w_hat = decode(data, type_name)
    blocks = data.reshape(16, 4, -1)
    d, dmin = (torch.from_numpy(blocks[..., i : i + 2].copy().view(np.float16)).float() for i in (0, 2))
    bound = (7.5 * d + 0.5 * dmin).repeat_interleave(256, 1).reshape(16, 1024)
    err = (w_hat - w).abs()
    assert (err <= bound * (1 + 1e-3) + 1e-7).all()
    step = grid[0].repeat_interleave(32, 1)
    assert (err / step).max() < 0.5
    assert ((err**2).mean() / (step**2).mean()).sqrt() < 0.1


def test_errors():
    w = torch.randn(2, 512)
    with pytest.raises(ValueError, match="multiple of 256"):
        kq.encode(torch.randn(2, 300), "Q4_K")
    with pytest.raises(ValueError, match="2-D"):
        kq.encode(torch.randn(512), "Q4_K")
    with pytest.raises(ValueError, match="type_name"):
        kq.encode(w, "Q3_K")
    with pytest.raises(ValueError, match="importance"):
        kq.encode(w, "Q4_K", importance=torch.ones(256))
    with pytest.raises(ValueError, match="non-negative"):
        kq.encode(w, "Q5_K", importance=-torch.ones(512))
    with pytest.raises(ValueError, match="not Q6_K"):
        kq.encode(w, "Q6_K", grid=(torch.ones(2, 16), torch.ones(2, 16)))
    with pytest.raises(ValueError, match="grid"):
        kq.encode(w, "Q4_K", grid=(torch.ones(2, 8), torch.ones(2, 8)))
    with pytest.raises(ValueError, match="non-finite"):
        kq.encode(torch.full((1, 256), float("nan")), "Q6_K")
    for type_name in kq.K_TYPES:
        for scale in (1e9, 1e-9):
            with pytest.raises(ValueError, match="fp16"):
                kq.encode(torch.randn(2, 512) * scale, type_name)
        assert kq.encode(torch.zeros(0, 256), type_name).shape == (0, kq.BLOCK_BYTES[type_name])
