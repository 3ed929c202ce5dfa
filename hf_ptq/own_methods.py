"""Which saved `quant_method` names are hf_ptq's, and the refusal of those no import registered.

A checkpoint whose `quant_method` transformers does not know is loaded with a warning ("Unknown quantization type")
and random weights where the packed ones were. For names spelled like hf_ptq's (starting with `hf_ptq`, e.g. a
method a newer hf_ptq added) that is refused instead, here; `hf_ptq.registration` wires the check into
`from_pretrained` and the loaders of saved files call it directly.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import auto

from .core.install import UPGRADE

OWN_PREFIX = "hf_ptq"


def _saved_quant_method(quantization_config: Any) -> Any:
    """The quant_method of a saved quantization config (dict or config object); None for bitsandbytes' legacy keys
    (transformers maps those to its own names)."""
    get = quantization_config.get if isinstance(quantization_config, dict) else None
    if get is None:
        return getattr(quantization_config, "quant_method", None)
    if get("load_in_8bit", False) or get("load_in_4bit", False):
        return None
    return get("quant_method")


def refuse_unknown_own_method(quantization_config: Any) -> None:
    """ValueError for a saved quant_method starting with `hf_ptq` that no import registered."""
    name = _saved_quant_method(quantization_config)
    if isinstance(name, str) and name.startswith(OWN_PREFIX) and name not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        known = sorted(n for n in auto.AUTO_QUANTIZATION_CONFIG_MAPPING if n.startswith(OWN_PREFIX))
        raise ValueError(
            f"config.json's quantization_config.quant_method={name!r} is not one this hf_ptq reads "
            f"({', '.join(map(repr, known))}): the checkpoint was written by a newer hf_ptq, so {UPGRADE}; or its "
            "config.json was edited. Without this check transformers would load it with random weights."
        )
