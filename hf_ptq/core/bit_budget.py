"""Mixed precision under a bit budget: the options, what each scheme costs on disk, the candidates per layer, and
the assignment of one candidate per layer that minimises the summed error under the budget.

Cost: the bits of the tensors a `QuantLinear` saves (packed integers, scales, packed or 8-bit zero points, shape,
act-order `g_idx`), exactly as `hf_ptq.nn.quant_linear` allocates them; the bias is not counted (every scheme
keeps it). `target_bits` is the budget per quantized weight: the layers' summed cost may not exceed
`target_bits * sum(in * out)`.

Assignment: a multiple-choice knapsack. Its Lagrangian relaxation (each layer minimises error + λ · bits alone)
is solved exactly at the breakpoints of λ by walking each layer's lower convex hull of (bits, error): starting
from every layer's cheapest candidate, the step with the largest error saved per bit spent is taken next, as long
as it fits; steps that no longer fit are skipped and smaller ones still fill the budget (docs/mixed_precision.md).
No torch here: the config checks budgets before any weight is read.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence
from typing import Any

from .layer_schemes import check_layer_schemes
from .options import Options, is_number, option
from .scheme import WeightScheme

MIXED_BITS = (2, 3, 4, 8)
MIXED_GROUP_SIZES = (32, 64, 128, -1)  # the group sizes every kernel and export takes; -1: one scale per row


def _is_target(value: Any) -> bool:
    return value is None or (is_number(value) and 1 < value <= 16)


def _is_map(value: Any) -> bool:
    return value is None or isinstance(value, dict)  # the entries are checked against the scheme by the config


@dataclasses.dataclass(frozen=True)
class MixedPrecisionOptions(Options):
    """Per-layer schemes, read by `hf_ptq.pipeline.sensitivity` (a budget) and by every module builder (the map)."""

    target_bits: float = option(
        None,
        _is_target,
        "None or a number of bits per quantized weight in (1, 16], e.g. 4.25",
        "average bits per quantized weight, scales and zero points counted: each layer's bits and group size are "
        "chosen from measured sensitivity to fit it (docs/mixed_precision.md)",
    )
    layer_schemes: dict = option(
        None,
        _is_map,
        'None or a dict {pattern: {"bits": b, "group_size": g}}',
        'layers pinned to a scheme, e.g. {"mlp.down_proj": {"bits": 8}} (JSON on the command line); with '
        "target_bits the others are chosen",
    )

    def check_against(self, base: WeightScheme) -> None:
        """The map's entries must make valid schemes over the config's own."""
        check_layer_schemes("layer_schemes", self.layer_schemes, base)


def stored_bits(
    in_features: int,
    out_features: int,
    scheme: WeightScheme,
    *,
    act_order: bool = False,
    scale_bits: int = 16,
    float_zero_point: bool = False,
) -> int:
    """Bits of the tensors a `QuantLinear` of this shape and scheme saves (bias excluded)."""
    words = lambda n: math.ceil(n * scheme.bits / 32) * 32  # noqa: E731 - packed int32 words of n values, in bits
    group = scheme.group_size
    groups = {0: 0, -1: 1}.get(group, in_features // max(group, 1))
    scales = 1 if group == 0 else out_features * groups
    total = out_features * words(in_features) + scales * scale_bits + 2 * 64  # packed, scales, weight_shape
    if float_zero_point and not scheme.sym:
        total += scales * scale_bits
    elif not scheme.sym:
        total += 8 if group == 0 else words(out_features) * groups
    if act_order:
        total += in_features * 32
    return total


def candidate_schemes(in_features: int, base: WeightScheme) -> list[WeightScheme]:
    """The schemes a layer may get: bits `MIXED_BITS` x the `MIXED_GROUP_SIZES` that divide its in_features and are
    no finer than the config's group size (its `group_size` is the finest grouping the search spends bits on; -1 or
    0: one scale per row only), with the config's symmetry and range."""
    finest = base.group_size if base.group_size > 0 else in_features
    groups = [g for g in MIXED_GROUP_SIZES if g == -1 or (finest <= g < in_features and in_features % g == 0)]
    return [
        WeightScheme(bits=b, group_size=g, sym=base.sym, full_range=base.full_range) for b in MIXED_BITS for g in groups
    ]


class BudgetError(ValueError):
    """The budget is below what the layers can take."""


def check_budget(target_bits: float, weights: int, cheapest: int) -> None:
    """Raise before any weight is read when `target_bits` over `weights` quantized weights cannot hold the cheapest
    assignment (`cheapest` bits)."""
    if cheapest > target_bits * weights:
        raise BudgetError(
            f"PtqConfig.target_bits={target_bits!r} is below what this model's quantized layers can take: the "
            f"cheapest scheme for every layer ({MIXED_BITS[0]}-bit, largest groups, and the pinned layers as pinned) "
            f"needs {cheapest / weights:.3f} bits per weight. Raise target_bits to at least "
            f"{math.ceil(cheapest / weights * 1000) / 1000}, or pin fewer layers to more bits."
        )


def _hull(costs: Sequence[int], errors: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of (cost, error), by increasing cost and strictly decreasing error."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], errors[i]))
    frontier: list[int] = []
    for i in order:  # Pareto front: each more expensive point must have a lower error
        if not frontier or errors[i] < errors[frontier[-1]]:
            if frontier and costs[i] == costs[frontier[-1]]:
                continue
            frontier.append(i)
    hull: list[int] = []
    for i in frontier:  # drop points above the segment joining their neighbours
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # slope(a, b) <= slope(b, i) means b is not below the chord a-i (errors decrease at a slowing rate)
            left = (errors[a] - errors[b]) * (costs[i] - costs[b])
            right = (errors[b] - errors[i]) * (costs[b] - costs[a])
            if left <= right:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def assign(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: float) -> list[int]:
    """One candidate index per layer minimising the summed error with the summed cost <= budget.

    costs[l][c], errors[l][c]: bits and measured error of candidate c of layer l. Raises `BudgetError` when even the
    cheapest candidates do not fit."""
    hulls = [_hull(c, e) for c, e in zip(costs, errors, strict=True)]
    position = [0] * len(hulls)
    spent = sum(costs[layer][hull[0]] for layer, hull in enumerate(hulls))
    if spent > budget:
        raise BudgetError(f"the cheapest candidates need {spent} bits, more than the budget of {budget:.0f}")
    heap: list[tuple[float, int, int]] = []

    def push(layer: int) -> None:
        hull, p = hulls[layer], position[layer]
        if p + 1 < len(hull):
            a, b = hull[p], hull[p + 1]
            gain = (errors[layer][a] - errors[layer][b]) / (costs[layer][b] - costs[layer][a])
            heapq.heappush(heap, (-gain, layer, p))

    for layer in range(len(hulls)):
        push(layer)
    while heap:
        _, layer, p = heapq.heappop(heap)
        hull = hulls[layer]
        step = costs[layer][hull[p + 1]] - costs[layer][hull[p]]
        if spent + step > budget:
            continue  # this layer stops here; cheaper steps of other layers may still fit
        spent += step
        position[layer] = p + 1
        push(layer)
    return [hull[p] for hull, p in zip(hulls, position, strict=True)]


def format_report(rows: Sequence[tuple[str, str, float, float]]) -> str:
    """The table `hf-ptq quantize` prints for (layer, scheme, bits per weight, error share) rows."""
    if not rows:
        return "mixed precision: no layer"
    width = max(len(r[0]) for r in rows)
    lines = [f"mixed precision: {len(rows)} layers", f"{'layer':<{width}}  {'scheme':<24} {'bits/w':>7} {'error':>7}"]
    lines += [f"{name:<{width}}  {scheme:<24} {bits:7.3f} {share:7.1%}" for name, scheme, bits, share in rows]
    return "\n".join(lines)
