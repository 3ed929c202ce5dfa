"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding error over the
columns not yet quantized so as to minimise the layer's output error `||WX - ŴX||²` on calibration inputs X.

The statistic is the Hessian of that error, `H = 2 X Xᵀ / N` ([in, in], fp32, accumulated over batches by `GPTQ`).
`gptq_quantize` works on the upper Cholesky factor U of `H⁻¹` (`H⁻¹ = Uᵀ U`): quantizing column j moves the
remaining columns by `-(w_j - q_j) / U[j, j] * U[j, j:]`. Updates are applied lazily in blocks of `block_size`
columns (one matmul per block for the columns to the right). Options: `desc_act` (act-order) visits columns by
decreasing `H[j, j]`; groups then follow that order and `g_idx` maps every input channel to its group, unless
`static_groups`, where scales are fixed up front from the weight's natural groups (no `g_idx` needed); `full_range`
(symmetric only) puts every group on the grid of all 2^b levels (`hf_ptq.core.quant.compute_qparams`).
Linears that share an input share `H`; GPTQ treats rows independently, so their weights may be stacked row-wise.
"""

from __future__ import annotations

import logging

import torch

from ..core.clip_search import clipped_qparams
from ..core.cpu import cpu_has_fast_bf16, cpu_threads, full_thread_count
from ..core.finite import non_finite_counts
from ..core.quant import QuantizedWeight, compute_qparams, qrange
from ..core.scheme import WeightScheme
from ..core.warn_once import warn_once
from .options import GPTQOptions
from .registry import register_method
from .rtn import rtn

logger = logging.getLogger("hf_ptq")

DAMP_FLOOR = 0.01  # the first retry damps at least this much (GPTQ's default damp_percent)
MAX_DAMP = 10.0  # the last retry: λ = 10 · mean(diag H), enough for any finite positive semi-definite H
# A range search over fewer values than this ([candidates, rows, group members]) runs on one thread: its dozen ops
# gain nothing from a second thread and, on a loaded machine, each would wait for one (see `core.cpu.cpu_threads`).
SEARCH_PARALLEL_VALUES = 1 << 22
SEARCH_CANDIDATES = 26  # shrink factors `clipped_qparams` evaluates by default


class GPTQ:
    """Running Hessian `H = 2/N Σ x xᵀ` (fp32 [in, in]) of the N input rows seen by `add_batch`.

    Only the tiles on and above the diagonal of `Σ x xᵀ` are computed (H is symmetric): for the 1536-wide input of
    an MLP down projection that is 9/16 of the multiply-adds of a full `xᵀx`; `hessian` mirrors them when read.
    """

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.rows = 0
        self._sum: torch.Tensor | None = None  # Σ x xᵀ, upper tiles only; created on the first batch, on its device
        self._hessian: torch.Tensor | None = None
        bounds = list(range(0, in_features, -(-in_features // _tiles(in_features)))) + [in_features]
        self._tiles = list(zip(bounds[:-1], bounds[1:], strict=True))

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Fold in the inputs x [..., in] (any leading shape; every row counts as one sample)."""
        x = x.reshape(-1, self.in_features)
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        if x.shape[0] == 0:
            return
        x = x.to(self._sum.device)
        if x.dtype == torch.bfloat16 and (x.device.type == "cuda" or cpu_has_fast_bf16()):
            # bf16 products are exact and accumulate in fp32 inside the matmul; only each batch's [in, in] sum is
            # rounded to bf16 (relative 2^-9, unbiased, averaging out over batches): 3-4x faster than fp32 here
            for a, b in self._tiles:
                self._sum[a:b, a:] += (x[:, a:b].t() @ x[:, a:]).float()
        else:
            x = x.float()
            for a, b in self._tiles:
                self._sum[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])
        self.rows += x.shape[0]
        self._hessian = None

    @property
    def hessian(self) -> torch.Tensor | None:
        """H [in, in] fp32 (None before any batch)."""
        if self._hessian is None and self._sum is not None:
            upper = self._sum
            for a, b in self._tiles[1:]:  # the tiles left of the diagonal tile of rows a:b, from their mirror
                upper[a:b, :a] = upper[:a, a:b].t()
            self._hessian = upper.mul(2.0 / max(self.rows, 1))
        return self._hessian


def _tiles(in_features: int) -> int:
    """Row tiles for the Hessian: more for wide inputs (each tile still one large matmul)."""
    return 1 if in_features < 512 else 4 if in_features < 1024 else 8


def stores_g_idx(desc_act: bool, static_groups: bool, group_size: int) -> bool:
    """Whether GPTQ output carries a non-trivial `g_idx` (act-order with dynamic groups of a real size)."""
    return desc_act and not static_groups and group_size > 0


def damping_schedule(damp_percent: float) -> list[float]:
    """The damps `inverse_hessian_factor` tries: `damp_percent`, then retries from `max(10 · damp_percent,
    DAMP_FLOOR)`, each 10x the one before, up to `MAX_DAMP` (e.g. 0.01 → 0.01, 0.1, 1, 10; 1e-6 → 1e-6, 0.01, ...).
    The floor keeps a tiny `damp_percent` from spending every retry below useful damping."""
    damps, damp = [damp_percent], max(damp_percent * 10, DAMP_FLOOR)
    while damp <= MAX_DAMP * (1 + 1e-9):
        damps.append(damp)
        damp *= 10
    return damps


def inverse_hessian_factor(
    hessian: torch.Tensor, damp_percent: float, threads: int | None = None
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of `(H + λI)⁻¹` with `λ = damp · mean(diag H)`, and the damp used.

    The damps of `damping_schedule(damp_percent)` are tried in turn until `H + λI` factorizes (a warning names the
    damp used when it is not `damp_percent`). For a finite positive semi-definite H the last one, `MAX_DAMP`, always
    succeeds (H + λI then has a condition number below `in_features / MAX_DAMP + 1`), so a failure means H holds
    NaN / inf (raised at once, with the count) or is not a Hessian at all. Raises ValueError (the calibration
    pipeline adds the layer's name). `threads`: CPU threads for the factorizations and the mean (None: torch's
    current count), whose bits depend on it; the rest runs with the current count.
    """
    nans, infs = non_finite_counts(hessian)
    if nans or infs:
        raise ValueError(
            f"gptq: the Hessian holds {nans} NaN and {infs} inf value(s), so it stays singular at any damping: the "
            "calibration activations reaching this layer are not finite (a NaN/inf weight before it, or a float16 "
            "overflow: load the model in bfloat16 or float32)."
        )
    with cpu_threads(threads):
        mean_diag = hessian.diagonal().mean().item()
    damps = damping_schedule(damp_percent)
    # At most three n x n matrices at a time beside H (each 256 MB for a 8192-wide down_proj): each intermediate is
    # dropped as soon as the next exists. `H + λ` on the diagonal gives the bits of `H + λI`.
    for damp in damps:
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diag)
        with cpu_threads(threads):
            lower, info = torch.linalg.cholesky_ex(damped)
            del damped
            factorized = info.item() == 0
            if factorized:
                inverse = torch.cholesky_inverse(lower)
                del lower
                upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
                del inverse
        if factorized and info.item() == 0:
            if damp != damp_percent:
                warn_once(
                    logger,
                    "hf_ptq gptq: the Hessian was not positive definite with damp_percent=%g; used %g instead.",
                    damp_percent,
                    damp,
                )
            return upper, damp
    tried = ", ".join(f"{d:g}" for d in damps)
    raise ValueError(
        f"gptq: the Hessian stays singular with every damp_percent tried ({tried}; mean of its diagonal "
        f"{mean_diag:g}): it is not positive semi-definite, so it is not the Hessian of any calibration inputs."
    )


def _group_qparams(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype,
    importance: torch.Tensor | None,
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale / zero point [out] for the rows of w [out, members]: min/max, or with `importance` [members] (the
    Hessian diagonal of those columns) the clipping range that minimises the importance-weighted rounding error."""
    if importance is None:
        return compute_qparams(w.amin(1), w.amax(1), bits, sym, scale_dtype, full_range)
    return clipped_qparams(w, bits, sym, scale_dtype, importance, full_range=full_range)


def _search_threads(threads: int, rows: int, members: int, clip: bool) -> int:
    """Threads for the qparams of `rows` x `members` weights: `threads` for large range searches, else 1."""
    return threads if clip and rows * members * SEARCH_CANDIDATES >= SEARCH_PARALLEL_VALUES else 1


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    *,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    clip: bool = False,
    scale_dtype: torch.dtype | None = None,
    full_range: bool = False,
) -> QuantizedWeight:
    """Quantize weight [out, in] against hessian [in, in]; scales are rounded to `scale_dtype` (default: weight's).

    `group_size` as in `PtqConfig` (> 0 groups, -1 per row, 0 per tensor). Inputs whose Hessian diagonal is zero
    (never active in calibration) get a zero weight: they do not affect the calibrated output. `clip`: each
    group's range is searched (`clipped_qparams`, Hessian-diagonal weighted) instead of min/max. `full_range`
    (needs `sym`): the symmetric grid of all 2^b levels, scale = signed extreme / -2^(b-1) (negative where the
    extreme is positive), for searched ranges too.
    """
    if full_range and not sym:
        raise ValueError("gptq: full_range applies to symmetric grids only (sym=True)")
    # On CPU everything runs on one thread (thousands of small ops: measured 0.3 s against 3-10 s for a 3072x576
    # weight on a busy 2-core machine, where every multi-threaded op waits for the other core), except the
    # factorization of H, whose bits depend on the thread count (it keeps the caller's), and large range searches.
    threads = full_thread_count() if weight.device.type == "cpu" else None
    with cpu_threads(None if threads is None else 1):
        return _gptq(
            weight,
            hessian,
            bits,
            group_size,
            sym,
            damp_percent,
            desc_act,
            static_groups,
            block_size,
            clip,
            scale_dtype,
            full_range,
            threads,
        )


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    damp_percent: float,
    desc_act: bool,
    static_groups: bool,
    block_size: int,
    clip: bool,
    scale_dtype: torch.dtype | None,
    full_range: bool,
    threads: int | None,
) -> QuantizedWeight:
    """`gptq_quantize`, inside its one-thread section; `threads`: the caller's CPU thread count (None off CPU)."""

    def search_threads(rows: int, members: int) -> int | None:
        return None if threads is None else _search_threads(threads, rows, members, clip)

    scale_dtype = scale_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    w = weight.detach().to(torch.float32).clone()
    out_f, in_f = w.shape
    h = hessian.detach().to(w.device, torch.float32).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0

    grouped = group_size > 0
    gs = group_size if grouped else in_f
    if not grouped:  # one scale per row (or per tensor) from the whole weight, fixed before the updates
        if group_size == -1:
            with cpu_threads(search_threads(out_f, in_f)):
                fixed = _group_qparams(w, bits, sym, scale_dtype, h.diagonal() if clip else None, full_range)
        else:
            lo, hi = w.amin().expand(out_f), w.amax().expand(out_f)
            fixed = compute_qparams(lo, hi, bits, sym, scale_dtype, full_range)
    elif static_groups:  # every natural group's qparams from the (dead-zeroed) original weight
        d = h.diagonal()
        with cpu_threads(search_threads(out_f, gs)):
            static = [
                _group_qparams(w[:, g : g + gs], bits, sym, scale_dtype, d[g : g + gs] if clip else None, full_range)
                for g in range(0, in_f, gs)
            ]

    perm = torch.argsort(h.diagonal(), descending=True) if desc_act else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    importance = h.diagonal().clone() if clip else None  # in visiting order
    u, _ = inverse_hessian_factor(h, damp_percent, threads)
    del h
    natural = list(range(in_f)) if perm is None else perm.tolist()  # original index of each visited column

    qmin, qmax = qrange(bits)
    q = torch.empty(out_f, in_f, dtype=torch.float32, device=w.device)  # integer values, int8 at the end
    pivots = u.diagonal().tolist()
    scales, zeros = [], []
    s, z = _floats(fixed) if not grouped else (None, None)
    if grouped and static_groups:
        static_floats = [_floats(qp) for qp in static]
    group_threads = search_threads(out_f, gs)
    # Block boundaries include every group start, so a group's qparams are computed from fully updated columns.
    starts = sorted(set(range(0, in_f, block_size)) | (set(range(0, in_f, gs)) if grouped else set()))
    for i1, i2 in zip(starts, starts[1:] + [in_f], strict=True):
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.empty_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if grouped and static_groups:
                s, z = static_floats[natural[col] // gs]
            elif grouped and col % gs == 0:  # i == 0 here: w[:, col:col+gs] holds every update so far
                imp = None if importance is None else importance[col : col + gs]
                with cpu_threads(group_threads):  # a large search handles [candidates, out, group_size] at once
                    qp = _group_qparams(w[:, col : col + gs], bits, sym, scale_dtype, imp, full_range)
                scales.append(qp[0])
                zeros.append(qp[1])
                s, z = _floats(qp)
            wc = w1[:, i]
            qc = torch.round(wc / s).add_(z).clamp_(qmin, qmax)  # as quantize_with, for one column
            q[:, col] = qc
            e = (wc - (qc - z) * s).div_(pivots[col])
            w1[:, i:].addr_(e, u1[i, i:], alpha=-1.0)
            err[:, i] = e
        w[:, i2:].addmm_(err, u[i1:i2, i2:], alpha=-1.0)
    q = q.to(torch.int8)

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        q = q[:, inverse]
        if stores_g_idx(desc_act, static_groups, group_size):
            g_idx = (torch.arange(in_f, device=w.device) // gs)[inverse].to(torch.int32)
    if not grouped:
        scale, zero = fixed
        if group_size == 0:
            return QuantizedWeight(q, scale[:1], None if zero is None else zero[:1], bits, group_size)
        return QuantizedWeight(q, scale[:, None], None if zero is None else zero[:, None], bits, group_size)
    if static_groups:
        scales, zeros = [s for s, _ in static], [z for _, z in static]
    scale = torch.stack(scales, 1)
    zero = None if sym else torch.stack(zeros, 1)
    return QuantizedWeight(q, scale, zero, bits, group_size, g_idx)


def _floats(qparams: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(scale [out], zero point [out] or 0.0) as fp32 for the column loop."""
    scale, zero = qparams
    return scale.float(), 0.0 if zero is None else zero.float()


@register_method(
    "gptq",
    summary="GPTQ: error-compensating rounding against calibration Hessians (Frantar et al., 2022)",
    options=GPTQOptions,
    statistics=GPTQ,
    full_range=True,
    mixed_precision=True,
)
def gptq(weight: torch.Tensor, scheme: WeightScheme, options: GPTQOptions, stats: GPTQ | None) -> QuantizedWeight:
    """GPTQ of weight [out, in] on the grid of `scheme`, with the Hessian accumulated in `stats` (None: no
    calibration input reached the layer, RTN)."""
    if stats is None:
        return rtn(weight, scheme)
    if stats.hessian is None:
        raise ValueError("gptq: no calibration input reached this layer")
    return gptq_quantize(
        weight,
        stats.hessian,
        scheme.bits,
        scheme.group_size,
        scheme.sym,
        damp_percent=options.damp_percent,
        desc_act=options.desc_act,
        static_groups=options.static_groups,
        block_size=options.block_size,
        clip=options.clip,
        full_range=scheme.full_range,
    )
