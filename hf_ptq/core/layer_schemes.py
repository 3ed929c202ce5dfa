"""Per-layer schemes: a `{pattern: {"bits": b, "group_size": g, "sym": s, "full_range": f}}` map, how a layer name
finds its entry, and the compact map written to config.json for a chosen assignment.

A pattern matches a module name when it equals the name, is a dotted suffix of it (`"mlp.down_proj"`), or
matches the whole name as a regular expression (`r"model\\.layers\\.(0|1)\\.mlp\\.down_proj"`); the first matching
pattern, in the map's order, wins. A value sets any of the layer's `bits`, `group_size`, `sym` and `full_range`; what
it leaves out is the config's (e.g. `formats.gguf_schemes` maps GGUF's Q5_0 layers to a symmetric full-range 5-bit
grid and its Q4_K layers to an asymmetric 4-bit one). No torch here: configs and the CLI read it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from .options import InvalidOption
from .scheme import WeightScheme

SCHEME_KEYS = ("bits", "group_size", "sym", "full_range")
_ALLOWED = (
    'a dict {pattern: {"bits": b, "group_size": g, "sym": s, "full_range": f}}, any of the keys (pattern: a module '
    'name, a dotted suffix such as "mlp.down_proj", or a regular expression matching whole names; b one of 2, 3, 4, '
    "5, 6, 8; g a group size; s, f booleans)"
)


def check_layer_schemes(field: str, value: Any, base: WeightScheme) -> None:
    """Raise `InvalidOption` for `field` unless `value` is None or a valid pattern -> scheme map over `base`."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise InvalidOption(field, value, _ALLOWED)
    for pattern, entry in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise InvalidOption(field, value, _ALLOWED + f"; {pattern!r} is not a non-empty string")
        try:
            re.compile(pattern)
        except re.error as err:
            raise InvalidOption(
                field, value, _ALLOWED + f"; {pattern!r} is not a valid regex ({err.msg}): escape it"
            ) from None
        if not isinstance(entry, dict) or not entry or set(entry) - set(SCHEME_KEYS):
            raise InvalidOption(
                field, value, _ALLOWED + f"; the entry of {pattern!r} is {entry!r}, with keys among {SCHEME_KEYS}"
            )
        try:
            scheme_over(base, entry)
        except InvalidOption as err:
            raise InvalidOption(field, value, detail=f"{field}[{pattern!r}]: {err.detail}") from None


def scheme_over(base: WeightScheme, entry: dict[str, Any] | None) -> WeightScheme:
    """`base` with the entry's fields (validated by `WeightScheme`). An entry that makes a layer asymmetric drops the
    config's full range (which needs symmetry) unless it sets full_range itself."""
    if not entry:
        return base
    fields = {"bits": base.bits, "group_size": base.group_size, "sym": base.sym, "full_range": base.full_range}
    if entry.get("sym") is False and "full_range" not in entry:
        fields["full_range"] = False
    return WeightScheme(**{**fields, **entry})


def matches(pattern: str, name: str) -> bool:
    """Whether a layer-schemes `pattern` selects module `name` (equal, dotted suffix, or whole-name regex)."""
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def entry_for(schemes: dict[str, dict] | None, name: str) -> tuple[str, dict] | None:
    """(pattern, entry) of the first pattern of `schemes` matching `name`, or None."""
    for pattern, entry in (schemes or {}).items():
        if matches(pattern, name):
            return pattern, entry
    return None


def entry_of(scheme: WeightScheme, base: WeightScheme) -> dict[str, Any]:
    """The map entry of a chosen scheme: its bits and group size, and its symmetry and range where they differ from
    `base` (the config's)."""
    entry: dict[str, Any] = {"bits": scheme.bits, "group_size": scheme.group_size}
    for field in ("sym", "full_range"):
        if getattr(scheme, field) != getattr(base, field):
            entry[field] = getattr(scheme, field)
    return entry


def compact_schemes(assignment: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """A map with one regex per (name shape, scheme) for `assignment` (module name -> entry), matching exactly the
    names given: names that differ only in their numbers (block indices) share one pattern, e.g.
    `model\\.layers\\.(?:0|3|17)\\.mlp\\.down_proj`. Deterministic: patterns in the order of their first name."""
    groups: dict[tuple[str, tuple], list[list[str]]] = defaultdict(list)
    for name, entry in assignment.items():
        parts = re.split(r"(\d+)", name)  # text, number, text, ...: the numbers at odd positions
        shape = "#".join(parts[0::2])
        groups[(shape, tuple(sorted(entry.items())))].append(parts)
    out: dict[str, dict[str, int]] = {}
    for (_, entry), names in groups.items():
        varying = [i for i in range(1, len(names[0]), 2) if len({p[i] for p in names}) > 1]
        pieces = []
        for i, text in enumerate(names[0]):
            if i in varying:
                values = list(dict.fromkeys(p[i] for p in names))
                pieces.append("(?:" + "|".join(values) + ")")
            else:
                pieces.append(re.escape(text))
        if len(varying) > 1:  # numbers varying at two places do not combine freely: list the names
            pattern = "|".join(re.escape("".join(p)) for p in names)
        else:
            pattern = "".join(pieces)
        out[pattern] = dict(entry)
    return out
