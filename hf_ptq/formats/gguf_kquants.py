"""Encoders for llama.cpp's K-quant GGUF block types Q4_K, Q5_K and Q6_K (gguf-py reads them but cannot write them).

A row is cut into super-blocks of 256 consecutive inputs; each is one block of bytes (little-endian):
    Q4_K (144 bytes): fp16 d, fp16 dmin, 12 bytes packing 8 six-bit sub-scales sc_j and 8 six-bit sub-mins m_j,
          128 bytes of nibbles. Sub-blocks of 32: w = d * sc_j * q - dmin * m_j, q in [0, 15].
    Q5_K (176 bytes): as Q4_K, with 32 bytes of fifth bits between the scales and the nibbles; q in [0, 31].
    Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 sub-scales (sub-blocks of 16),
          fp16 d. w = d * sc_j * (q - 32), q in [0, 63].

How the scales are chosen (vectorised over chunks of rows; the objective is sum_i imp_i (w_i - w^_i)^2 with imp_i
the `importance` of input i, uniform when None):
1. Each sub-block's float (scale, min): its range [min(w_min, 0), w_max] is split into nmax - 1 .. nmax + 1 steps
   (5 candidates; above nmax the ends clip), each rounding is fitted by weighted least squares with min >= 0 (the
   format's offset is -dmin * m_j, m_j >= 0: as in llama.cpp, a sub-block of positive weights gets min 0, its grid
   starting at 0), the best kept and refined by one re-round and refit. Q6_K: a signed scale, its largest |w|
   mapped to about -32.
2. fp16 d is picked among fp16(largest sub-scale / c) (c: powers of two, then 33..63, or 64..128 for Q6_K's
   signed 8-bit sub-scales) by the exact weighted error of the rounded sub-scales given each sub-block's integers,
   each sub-min re-fitted to its rounded sub-scale; dmin and the 6-bit sub-mins are then picked the same way.
3. The weights are rounded to nearest onto the final grid; Q4_K / Q5_K: d and dmin are then re-fitted by least
   squares and the weights re-rounded, kept per super-block where that lowers the error.
Weights on a representable grid come back exactly where each sub-block spans its integer range (it has 0 and nmax;
Q6_K: its largest |w| at -32) and the largest sub-scale is a power of two or in the upper half of its range.
With `grid` (Q4_K / Q5_K), step 1 is the given grid (its integers u = round((w + offset) / scale)): step 2 then
measures the error to the grid's own reconstruction, so the grid is reproduced as closely as fp16 d and 6-bit
sub-scales allow (exactly where representable, e.g. equal fp16 scales and integer zero-points in a super-block),
and step 3 only rounds the weights onto it: they keep their integers wherever it is reproduced.
Each super-block is computed in units of a power of two near its largest |w| (exact). A super-block whose d or
dmin exceeds fp16's range, or whose sub-scales need a d below fp16's smallest subnormal (2^-24: |w| below about
1e-7 to 1e-6 by type) raises ValueError; just above that, precision degrades through fp16's subnormals (as in
llama.cpp).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
SUPER_BLOCK = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

_CHUNK = 1 << 17  # weights per chunk of rows (the searches hold a few times 5 floats per weight)
_TINY = 2.0**-24  # smallest fp16 subnormal
_HUGE = 2.0**60  # beyond any fp16 d; also keeps the units finite
_NMAX = {"Q4_K": 15, "Q5_K": 31}
# step 1: numbers of steps the sub-block's range is split into (nmax - 1 .. nmax + 1; above nmax the ends clip)
_RANGE_LEVELS = {t: torch.arange(-1.0, 1.01, 0.5) + top for t, top in (("Q4_K", 15), ("Q5_K", 31), ("Q6_K", 32))}
# step 2: c, the largest sub-scale's integer: powers of two (any fp16 target is then exact), the upper half of the
# range (a full-range lattice: exact where the targets are such) and halves near the top
_POW2 = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
_SCALE_STEPS = torch.tensor(_POW2 + [c + 0.0 for c in range(33, 64)] + [60.5, 61.5, 62.5, 63.5])
_SCALE_STEPS_Q6 = torch.tensor(_POW2 + [c + 0.0 for c in range(64, 129)])


def encode(
    weight: torch.Tensor,
    type_name: str,
    importance: torch.Tensor | None = None,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> np.ndarray:
    """`weight` (float [rows, n], n a multiple of 256) as `type_name` blocks: uint8 [rows, n // 256 * block bytes],
    the bytes gguf / llama.cpp read. `importance`: non-negative weights [n] of the inputs in the squared error
    (uniform when None). `grid` (Q4_K / Q5_K only): (scale, offset) fp32 [rows, n / 32] of a 4-bit grid of groups of
    32 the weight already lies on, `w = scale * u - offset`, u integer: reproduced as closely as fp16 d and 6-bit
    sub-scales allow, the weights then rounded onto it."""
    return _encode(weight, type_name, importance, grid, reconstruct=False)[0]


def _encode(
    weight: torch.Tensor,
    type_name: str,
    importance: torch.Tensor | None,
    grid: tuple[torch.Tensor, torch.Tensor] | None,
    reconstruct: bool,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """`encode`'s bytes, and (with `reconstruct`) the fp32 weight [rows, n] they stand for, computed from the integer
    fields as the readers compute it (not from the bytes)."""
    rows, n = _check(weight, type_name, importance, grid)
    imp = _importance(importance, n)
    out = np.empty((rows, n // SUPER_BLOCK * BLOCK_BYTES[type_name]), np.uint8)
    recon = torch.empty(rows, n) if reconstruct else None
    step = max(1, _CHUNK // n)
    for r0 in range(0, rows, step):
        part = slice(r0, min(rows, r0 + step))
        x = weight[part].detach().to("cpu", torch.float32).reshape(-1, n // SUPER_BLOCK, SUPER_BLOCK)
        x, unit = _normalise(x, r0)
        if type_name == "Q6_K":
            fields, w_hat = _quantize_q6(x, unit, imp, r0)
        else:
            g = None if grid is None else tuple(t[part].detach().to("cpu", torch.float32) for t in grid)
            fields, w_hat = _quantize_q45(x, unit, imp, _NMAX[type_name], g, r0)
        out[part] = _pack(type_name, fields)
        if recon is not None:
            recon[part] = (w_hat * unit.unsqueeze(-1)).reshape(-1, n)
    return out, recon


def _check(weight, type_name, importance, grid) -> tuple[int, int]:
    if type_name not in K_TYPES:
        raise ValueError(f"type_name must be one of {K_TYPES}, got {type_name!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [rows, n], got {getattr(weight, 'shape', type(weight))}")
    rows, n = weight.shape
    if n == 0 or n % SUPER_BLOCK:
        raise ValueError(f"{type_name} needs rows of a multiple of {SUPER_BLOCK} inputs (whole super-blocks), got {n}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite values")
    if importance is not None:
        if importance.shape != (n,):
            raise ValueError(f"importance must have shape [{n}] (one weight per input), got {tuple(importance.shape)}")
        if not torch.isfinite(importance).all() or (importance < 0).any():
            raise ValueError("importance must be finite and non-negative")
    if grid is not None:
        if type_name == "Q6_K":
            raise ValueError("grid= is for Q4_K / Q5_K (asymmetric sub-blocks of 32), not Q6_K")
        if len(grid) != 2 or any(t.shape != (rows, n // 32) for t in grid):
            raise ValueError(f"grid must be (scale, offset), each [{rows}, {n // 32}] (one per 32 inputs)")
        if not all(torch.isfinite(t).all() for t in grid):
            raise ValueError("grid has non-finite values")
    return rows, n


def _importance(importance: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per-input weights [n / SUPER_BLOCK, SUPER_BLOCK], mean 1, floored at 1e-6 (so sub-blocks of zero importance
    stay well-posed: they are fitted as if uniform, at no cost to the objective)."""
    if importance is None:
        return torch.ones(n // SUPER_BLOCK, SUPER_BLOCK)
    imp = importance.detach().to("cpu", torch.float64)
    mean = imp.mean()
    imp = imp / mean if mean > 0 else torch.ones_like(imp)
    return imp.clamp(min=1e-6).float().reshape(-1, SUPER_BLOCK)


def _normalise(x: torch.Tensor, r0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, nb, 256] divided per super-block by its unit, a power of two (fp32 [R, nb]), so that its largest |x| is
    in [0.5, 1) (exact: only exponents change)."""
    amax = x.abs().amax(-1)
    bad = ((amax > 0) & (amax < _TINY)) | (amax > _HUGE)
    if bad.any():
        r, b = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"row {r0 + r}, super-block {b}: largest |w| {float(amax[r, b]):.3g} is outside what a float16 scale "
            f"can represent (2^-24 .. 65504 per step): its scale cannot be stored in fp16"
        )
    unit = torch.ldexp(torch.ones_like(amax), torch.frexp(amax)[1])
    return x / unit.unsqueeze(-1), unit


def _half(v: torch.Tensor, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v (in units of `unit`, broadcastable) rounded to fp16 in real units: (fp16 real value, the same in units)."""
    h = (v * unit).to(torch.float16)
    return h, h.float() / unit


def _check_fp16(h: torch.Tensor, needed: torch.Tensor, what: str, r0: int) -> None:
    """ValueError where the fp16 scale h [R, nb] overflowed, or flushed to 0 although `needed` [R, nb] is nonzero."""
    for bad, why in ((~torch.isfinite(h), "exceeds float16's range (65504)"), ((h == 0) & (needed != 0), "is below")):
        if bad.any():
            r, b = (int(i) for i in bad.nonzero()[0])
            why = why if why != "is below" else f"({float(needed[r, b]):.3g} per step) is below float16's range (2^-24)"
            raise ValueError(f"row {r0 + r}, super-block {b}: its {what} {why}: it cannot be stored in fp16")


class _Stats(NamedTuple):
    """Weighted sums over a sub-block for integers L: w, w x, w x^2, w L, w L^2, w x L."""

    sw: torch.Tensor
    sx: torch.Tensor
    sxx: torch.Tensor
    sl: torch.Tensor
    sl2: torch.Tensor
    sxl: torch.Tensor


def _stats(x: torch.Tensor, w: torch.Tensor, L: torch.Tensor) -> _Stats:
    """x [..., E] (L [..., K, E] or [..., E]), w broadcastable to x: _Stats [...] (or [..., K])."""
    wx = w * x
    sw, sx, sxx = w.sum(-1).expand(x.shape[:-1]), wx.sum(-1), (wx * x).sum(-1)
    cand = L.dim() > x.dim()
    if not cand:
        L = L.unsqueeze(-2)
    ww = torch.stack(torch.broadcast_tensors(w, wx), -1)  # [..., E, 2]
    sums = L @ ww  # [..., K, 2]
    sl2 = (L * L) @ ww[..., :1]
    sl, sxl, sl2 = sums[..., 0], sums[..., 1], sl2[..., 0]
    if cand:
        sw, sx, sxx = sw.unsqueeze(-1), sx.unsqueeze(-1), sxx.unsqueeze(-1)
    else:
        sl, sxl, sl2 = sl[..., 0], sxl[..., 0], sl2[..., 0]
    return _Stats(sw, sx, sxx, sl, sl2, sxl)


def _error(st: _Stats, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum w (x - (s L - m))^2 from the sums."""
    return st.sxx - 2 * s * st.sxl + 2 * m * st.sx + s * s * st.sl2 - 2 * s * m * st.sl + m * m * st.sw


def _error_change(st: _Stats, s0, m0, ds, dm) -> torch.Tensor:
    """The change of `_error` from (s0, m0) to (s0 + ds, m0 + dm): the quadratic expanded around (s0, m0), so that
    near the fit it is not lost in the cancellation of `_error`'s terms."""
    gs = 2 * (s0 * st.sl2 - st.sxl - m0 * st.sl)  # gradient (0 at an unconstrained fit)
    gm = 2 * (st.sx - s0 * st.sl + m0 * st.sw)
    return ds * (gs + ds * st.sl2 - 2 * dm * st.sl) + dm * (gm + dm * st.sw)


def _fit(st: _Stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares (s >= 0, m >= 0) of x ~ s L - m for fixed integers: (s, m, error)."""
    det = st.sw * st.sl2 - st.sl * st.sl
    ok = det > 1e-6 * st.sw * st.sl2
    det = torch.where(ok, det, 1.0)
    s = (st.sw * st.sxl - st.sx * st.sl) / det
    m = (st.sl * st.sxl - st.sl2 * st.sx) / det
    ok &= (s >= 0) & (m >= 0)
    s_only = (st.sxl / st.sl2.clamp(min=1e-30)).clamp(min=0)  # m = 0
    m_only = (-st.sx / st.sw).clamp(min=0)  # s = 0: a constant sub-block
    zero = torch.zeros_like(s_only)
    s, m = torch.where(ok, s, s_only), torch.where(ok, m, 0.0)
    err = _error(st, s, m)
    for s_alt, m_alt in ((s_only, zero), (zero, m_only)):
        err_alt = _error(st, s_alt, m_alt)
        better = err_alt < err
        s, m, err = torch.where(better, s_alt, s), torch.where(better, m_alt, m), torch.where(better, err_alt, err)
    return s, m, err


def _best(err: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
    """Per position, the values at the candidate (dim `err.dim() - 1`) of least error (non-finite: never)."""
    err = torch.where(torch.isfinite(err), err, torch.inf)
    idx = err.argmin(-1, keepdim=True)
    out = []
    for v in (err, *values):
        i = idx if v.dim() == err.dim() else idx.unsqueeze(-1).expand(*idx.shape, v.shape[-1])
        out.append(v.gather(err.dim() - 1, i).squeeze(err.dim() - 1))
    return out


def _search_asym(x: torch.Tensor, w: torch.Tensor, nmax: int, levels: torch.Tensor):
    """Step 1 for sub-blocks x [..., 32] (weights w broadcastable): (s, m, integers L, their _Stats), each [...]."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    span = (x.amax(-1, keepdim=True) - lo).clamp(min=1e-30)
    L = ((x - lo).unsqueeze(-2) * (levels.unsqueeze(-1) / span.unsqueeze(-1))).round_().clamp_(0, nmax)
    st = _stats(x, w, L)
    s, m, err = _fit(st)
    err, s, m, L, sl, sl2, sxl = _best(err, s, m, L, st.sl, st.sl2, st.sxl)
    st = _Stats(st.sw.squeeze(-1), st.sx.squeeze(-1), st.sxx.squeeze(-1), sl, sl2, sxl)
    # one re-round onto the fitted grid and refit
    L2 = torch.where(s.unsqueeze(-1) > 0, ((x + m.unsqueeze(-1)) / s.unsqueeze(-1)).round(), L).clamp_(0, nmax)
    st2 = _stats(x, w, L2)
    s2, m2, err2 = _fit(st2)
    better = err2 < err
    s, m = torch.where(better, s2, s), torch.where(better, m2, m)
    L = torch.where(better.unsqueeze(-1), L2, L)
    return s, m, L, _Stats(*(torch.where(better, a, b) for a, b in zip(st2, st, strict=True)))


def _lattice(target: torch.Tensor, steps: torch.Tensor, unit: torch.Tensor, lo: int, hi: int, sign: float = 1.0):
    """Candidate fp16 super-block scales d_c = fp16(sign * extreme / c) of the targets [R, nb, J] (extreme: the
    largest |target|, signed) and their integer multiples of the targets: (d16 [R, nb, C], d [R, nb, C] in
    units, ints [R, nb, C, J] in [lo, hi])."""
    ext = target.gather(-1, target.abs().argmax(-1, keepdim=True))  # [R, nb, 1]
    d16, d = _half(sign * ext / steps, unit.unsqueeze(-1))
    safe = torch.where(d != 0, d, 1.0).unsqueeze(-1)
    ints = torch.where(d.unsqueeze(-1) != 0, (target.unsqueeze(-2) / safe).round(), 0).clamp_(lo, hi)
    return d16, d, ints


def _quantize_q45(x, unit, imp, nmax, grid, r0):
    """Q4_K / Q5_K fields for x [R, nb, 256] in units of `unit` [R, nb]: (fields dict, reconstruction [R, nb, 256])."""
    R, nb, _ = x.shape
    xs = x.reshape(R, nb, 8, 32)
    w = imp.reshape(nb, 8, 32)
    if grid is None:
        s, m, _, st = _search_asym(xs, w, nmax, _RANGE_LEVELS["Q4_K" if nmax == 15 else "Q5_K"])
    else:  # the grid's integers and its reconstruction (in units of the super-block) stand in for the weights' own fit
        scale, offset = (t.reshape(R, nb, 8) / unit.unsqueeze(-1) for t in grid)
        s, m = scale.clamp(min=0), offset
        safe = torch.where(s > 0, s, 1.0).unsqueeze(-1)
        u = torch.where(s.unsqueeze(-1) > 0, ((xs + m.unsqueeze(-1)) / safe).round(), 0).clamp_(0, nmax)
        st = _stats(s.unsqueeze(-1) * u - m.unsqueeze(-1), w, u)
    # step 2: d and the sub-scales (each sub-min re-fitted to its rounded sub-scale), then dmin and the sub-mins
    d16, d, ls = _lattice(s, _SCALE_STEPS, unit, 0, 63)
    st_c, s0, m0 = _Stats(*(t.unsqueeze(-2) for t in st)), s.unsqueeze(-2), m.unsqueeze(-2)
    ds = d.unsqueeze(-1) * ls - s0
    gm = 2 * (st_c.sx - s0 * st_c.sl + m0 * st_c.sw)
    dm = (m0 + (2 * ds * st_c.sl - gm) / (2 * st_c.sw)).clamp(min=0) - m0  # the min re-fitted to the rounded scale
    _, d16, d, ls, ds, m_fit = _best(_error_change(st_c, s0, m0, ds, dm).sum(-1), d16, d, ls, ds, m0 + dm)
    dmin16, dmin, lm = _lattice(m_fit, _SCALE_STEPS, unit, 0, 63)
    dm = dmin.unsqueeze(-1) * lm - m0
    _, dmin16, dmin, lm = _best(_error_change(st_c, s0, m0, ds.unsqueeze(-2), dm).sum(-1), dmin16, dmin, lm)
    _check_fp16(d16, s.amax(-1) * unit, "scale d", r0)
    _check_fp16(dmin16, torch.zeros_like(unit), "min scale dmin", r0)  # a min below fp16 is only lost in rounding
    # step 3: round onto the grid; without a grid to keep, re-fit d and dmin by least squares where that helps
    err, q, w_hat = _round_q45(xs, w, d, dmin, ls, lm, nmax)
    if grid is None:
        d16_n, d_n, dmin16_n, dmin_n = _refit_q45(xs, w, unit, dmin, ls, lm, q)
        err_n, q_n, w_hat_n = _round_q45(xs, w, d_n, dmin_n, ls, lm, nmax)
        better = err_n < err  # False where NaN: a re-fit beyond fp16
        d16, dmin16 = torch.where(better, d16_n, d16), torch.where(better, dmin16_n, dmin16)
        q = torch.where(better[..., None, None], q_n, q)
        w_hat = torch.where(better[..., None, None], w_hat_n, w_hat)
    fields = {"d": d16, "dmin": dmin16, "sc": ls.to(torch.uint8), "m": lm.to(torch.uint8), "q": q.to(torch.uint8)}
    return fields, w_hat.reshape(R, nb, SUPER_BLOCK)


def _refit_q45(xs, w, unit, dmin, ls, lm, q):
    """Least-squares d, dmin (d >= 0, dmin >= 0) of xs ~ d * ls_j * q - dmin * lm_j for fixed integers, in fp16:
    (d16, d, dmin16, dmin), each [R, nb]."""
    a = ls.unsqueeze(-1) * q
    wa = w * a
    saa, sxa = (wa * a).sum((-1, -2)), (wa * xs).sum((-1, -2))
    sab, sbb, sxb = (wa.sum(-1) * lm).sum(-1), (w.sum(-1) * lm * lm).sum(-1), ((w * xs).sum(-1) * lm).sum(-1)
    det = saa * sbb - sab * sab
    ok = det > 1e-6 * saa * sbb
    det = torch.where(ok, det, 1.0)
    d = torch.where(ok, (sxa * sbb - sxb * sab) / det, (sxa + dmin * sab) / saa.clamp(min=1e-30))  # else: dmin kept
    dmin = torch.where(ok, (sxa * sab - sxb * saa) / det, dmin)
    return *_half(d.clamp(min=0), unit), *_half(dmin.clamp(min=0), unit)


def _round_q45(xs, w, d, dmin, ls, lm, nmax):
    """Weights xs [R, nb, 8, 32] rounded onto d * ls_j * q - dmin * lm_j: (error [R, nb], q, reconstruction)."""
    step = (d.unsqueeze(-1) * ls).unsqueeze(-1)
    off = (dmin.unsqueeze(-1) * lm).unsqueeze(-1)
    q = torch.where(step > 0, (xs + off) / torch.where(step > 0, step, 1.0), 0).round_().clamp_(0, nmax)
    w_hat = step * q - off
    return (w * (xs - w_hat) ** 2).sum((-1, -2)), q, w_hat


def _quantize_q6(x, unit, imp, r0):
    """Q6_K fields for x [R, nb, 256] in units of `unit` [R, nb]: (fields dict, reconstruction [R, nb, 256])."""
    R, nb, _ = x.shape
    xs = x.reshape(R, nb, 16, 16)
    w = imp.reshape(nb, 16, 16)
    # step 1: per sub-block of 16, s (signed) with integers in [-32, 31]; the largest |x| maps to about -32
    ext = xs.gather(-1, xs.abs().argmax(-1, keepdim=True))
    inv = torch.where(ext != 0, -1 / torch.where(ext != 0, ext, 1.0), 0.0)  # [..., 1]
    levels = _RANGE_LEVELS["Q6_K"]
    L = (xs.unsqueeze(-2) * (inv.unsqueeze(-1) * levels.unsqueeze(-1))).round_().clamp_(-32, 31)
    wx = w * xs
    sxx = (wx * xs).sum(-1)
    wl = L * w.unsqueeze(-2)
    sl2, sxl = (wl * L).sum(-1), (L * wx.unsqueeze(-2)).sum(-1)
    s = sxl / sl2.clamp(min=1e-30)
    err, s, L, sl2, sxl = _best(sxx.unsqueeze(-1) - s * sxl, s, L, sl2, sxl)
    L2 = torch.where(s.unsqueeze(-1) != 0, xs / torch.where(s != 0, s, 1.0).unsqueeze(-1), 0).round_().clamp_(-32, 31)
    sl2_2, sxl_2 = (w * L2 * L2).sum(-1), (wx * L2).sum(-1)
    s2 = sxl_2 / sl2_2.clamp(min=1e-30)
    better = sxx - s2 * sxl_2 < err
    s, sl2, sxl = torch.where(better, s2, s), torch.where(better, sl2_2, sl2), torch.where(better, sxl_2, sxl)
    L = torch.where(better.unsqueeze(-1), L2, L)
    # a sub-block not using -32 may flip sign: give those the sign of the super-block's largest, whose sub-scale is
    # then negative, so that theirs range down to -128 too
    s_ext = s.gather(-1, s.abs().argmax(-1, keepdim=True))
    flip = (L.amin(-1) > -32) & (s * s_ext < 0)
    s, sxl = torch.where(flip, -s, s), torch.where(flip, -sxl, sxl)
    # step 2: fp16 d and int8 sub-scales by the exact error given the integers
    d16, d, sc = _lattice(s, _SCALE_STEPS_Q6, unit, -128, 127, sign=-1.0)
    ds = d.unsqueeze(-1) * sc - s.unsqueeze(-2)  # s is the least-squares fit: the error grows by ds^2 sum w L^2
    _, d16, d, sc = _best((ds * ds * sl2.unsqueeze(-2)).sum(-1), d16, d, sc)
    _check_fp16(d16, s.abs().amax(-1) * unit, "scale d", r0)
    # step 3: round to nearest (re-fitting d, as for Q4_K, gains nothing measurable with 8-bit sub-scales)
    _, L, w_hat = _round_q6(xs, w, d, sc)
    fields = {"d": d16, "sc": sc.to(torch.int8), "q": (L + 32).to(torch.uint8)}
    return fields, w_hat.reshape(R, nb, SUPER_BLOCK)


def _round_q6(xs, w, d, sc):
    """Weights xs [R, nb, 16, 16] rounded onto d * sc_j * L, L in [-32, 31]: (error [R, nb], L, reconstruction)."""
    step = (d.unsqueeze(-1) * sc).unsqueeze(-1)
    L = torch.where(step != 0, xs / torch.where(step != 0, step, 1.0), 0).round_().clamp_(-32, 31)
    w_hat = step * L
    return (w * (xs - w_hat) ** 2).sum((-1, -2)), L, w_hat


def _pack(type_name: str, f: dict[str, torch.Tensor]) -> np.ndarray:
    """The blocks' bytes [R, nb * block bytes] from the fields ([R, nb] fp16 d / dmin, [R, nb, J] sub-scales
    (and sub-mins), [R, nb, 256] uint8 integers)."""
    R, nb = f["d"].shape
    q = f["q"].reshape(R, nb, SUPER_BLOCK)

    def b(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(torch.uint8).reshape(R, nb, -1)

    if type_name == "Q6_K":
        v = q.reshape(R, nb, 2, 4, 32)  # half, quarter of the half, position
        ql = torch.cat(
            [v[:, :, :, 0] & 15 | (v[:, :, :, 2] & 15) << 4, v[:, :, :, 1] & 15 | (v[:, :, :, 3] & 15) << 4], -1
        )
        qh = (v >> 4).to(torch.int32) << (2 * torch.arange(4, dtype=torch.int32)).reshape(4, 1)
        parts = [ql, qh.sum(-2).to(torch.uint8), b(f["sc"]), b(f["d"].unsqueeze(-1))]
    else:
        sc, m = f["sc"], f["m"]
        scales = torch.cat(
            [
                sc[..., :4] | (sc[..., 4:] >> 4) << 6,
                m[..., :4] | (m[..., 4:] >> 4) << 6,
                sc[..., 4:] & 15 | (m[..., 4:] & 15) << 4,
            ],
            -1,
        )
        v = q.reshape(R, nb, 4, 2, 32)  # pair of sub-blocks, which of the pair, position
        parts = [b(f["d"].unsqueeze(-1)), b(f["dmin"].unsqueeze(-1)), scales]
        if type_name == "Q5_K":
            bits = (q.reshape(R, nb, 8, 32) >> 4).to(torch.int32) << torch.arange(8, dtype=torch.int32).reshape(8, 1)
            parts.append(bits.sum(-2).to(torch.uint8))
        parts.append((v[:, :, :, 0] & 15 | (v[:, :, :, 1] & 15) << 4).reshape(R, nb, 128))
    return torch.cat([b(p) for p in parts], -1).reshape(R, -1).numpy()
