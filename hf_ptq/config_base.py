"""What hf_ptq's configs (`PtqConfig`, `SmoothQuantConfig`) share: the keys `to_dict` writes besides the constructor
arguments, the checks of the fields every config has (modules kept, calibration data), and JSON-safe serialization
(calibration data described, never embedded)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .calibration.describe import describe_dataset

Fail = Callable[[str, Any, str], ValueError]  # (field, value, allowed) -> the error naming them


class HfPtqConfig(QuantizationConfigMixin):
    """Base of hf_ptq's quantization configs; subclasses set their fields, then call `_take_saved_keys` and
    validate in `post_init` (with `_check_shared_fields`)."""

    def _take_saved_keys(self, saved: dict[str, Any], known: Iterable[str]) -> None:
        """Keep the keys `to_dict` writes that are not constructor arguments (dataset description, format version);
        raise on any other unknown key, listing the `known` fields."""
        self.dataset_description = saved.pop("dataset_description", None)
        self.format_version = saved.pop("format_version", 1)
        if saved:
            raise ValueError(
                f"{type(self).__name__} got unknown field(s) {sorted(saved)}; known fields: {', '.join(known)}."
            )

    def _check_shared_fields(self, fail: Fail, needs_calibration: bool) -> None:
        """Validate modules_to_not_convert, num_samples, seq_len, batch_size, tokenizer; describe the dataset."""
        mods = self.modules_to_not_convert
        if mods is not None and (not isinstance(mods, list) or not all(isinstance(m, str) for m in mods)):
            raise fail("modules_to_not_convert", mods, 'a list of module names, e.g. ["lm_head", "mlp.down_proj"]')
        for field in ("num_samples", "seq_len", "batch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise fail(field, value, "a positive integer")
        tok = self.tokenizer
        if tok is not None and not isinstance(tok, str) and not callable(tok):
            raise fail("tokenizer", tok, "a tokenizer, a tokenizer name or folder, or None (the model's own)")
        if self.dataset is not None:
            self.dataset_description = describe_dataset(self.dataset)
        elif needs_calibration and self.dataset_description is None:
            self.dataset_description = {"source": "sampled-from-model"}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: the calibration data itself is replaced by its description."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in ("dataset", "tokenizer")}
        out["dataset"] = None
        out["tokenizer"] = self.tokenizer if isinstance(self.tokenizer, str) else None
        return out

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()
