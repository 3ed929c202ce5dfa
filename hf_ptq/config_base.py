"""What hf_ptq's configs (`PtqConfig`, `SmoothQuantConfig`) share: the keys `to_dict` writes besides the constructor
arguments (and the check of the saved format version), the checks of the fields every config has (modules kept,
calibration data and its bounds), numpy scalars taken as Python numbers, and JSON-safe serialization (calibration
data described, never embedded)."""

from __future__ import annotations

import copy
import inspect
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from transformers.utils.quantization_config import QuantizationConfigMixin

from .calibration.describe import describe_dataset
from .calibration.limits import data_free_error, token_budget_error
from .core.embeddings import EMBEDDING_FORMATS
from .core.install import UPGRADE
from .core.scheme import WeightScheme

logger = logging.getLogger("hf_ptq")

Fail = Callable[[str, Any, str], ValueError]  # (field, value, allowed) -> the error naming them

# The layout of saved checkpoints (tensor names, packing, config keys) this hf_ptq writes, and the ones it reads.
# A checkpoint written by a newer hf_ptq in a layout this one does not know is refused, not loaded as garbage.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
# transformers' `should_convert_module` matches each modules_to_not_convert entry as this regex (and as a suffix).
_MODULE_PATTERN = r"(?:{})(?:(?<=\.)|(?=\.|$))"


def plain_number(value: Any) -> Any:
    """A numpy integer / float / bool scalar as the Python int / float / bool it holds; anything else unchanged."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def check_format_version(cls: str, version: Any) -> int:
    """The saved `format_version` if this hf_ptq reads it; ValueError naming the version found and those read."""
    version = plain_number(version)
    supported = ", ".join(map(str, sorted(SUPPORTED_FORMAT_VERSIONS)))
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(
            f"{cls}.format_version={version!r} is invalid: a saved hf_ptq config holds an integer format version "
            f"(this hf_ptq reads format_version {supported}); the checkpoint's config.json was edited or written by "
            "another tool."
        )
    if version not in SUPPORTED_FORMAT_VERSIONS:
        newer = version > max(SUPPORTED_FORMAT_VERSIONS)
        advice = f"{UPGRADE} to load it" if newer else "it was not written by hf_ptq"
        raise ValueError(
            f"{cls}.format_version={version}: this checkpoint was saved in format version {version}, and this "
            f"hf_ptq reads format_version {supported}: {advice}."
        )
    return version


def check_module_patterns(fail: Fail, patterns: list[str]) -> None:
    """Each modules_to_not_convert entry must be a non-empty valid regex, as transformers will match it."""
    for pattern in patterns:
        if not pattern:
            raise fail(
                "modules_to_not_convert",
                patterns,
                "a list of non-empty module names (an empty one matches every module)",
            )
        try:
            re.compile(_MODULE_PATTERN.format(pattern))
        except re.error as err:
            raise fail(
                "modules_to_not_convert",
                patterns,
                f"a list of module names or regular expressions; {pattern!r} is not a valid regex ({err.msg}): escape "
                f"special characters, e.g. {re.escape(pattern)!r}",
            ) from None


def check_embeddings(fail: Fail, value: Any) -> None:
    """`embeddings` must be None, "int8" or "int4" (`hf_ptq.core.embeddings`)."""
    if value is not None and (not isinstance(value, str) or value not in EMBEDDING_FORMATS):
        raise fail(
            "embeddings",
            value,
            "None (the input embedding and lm_head stay in the model's dtype), 'int8' (8-bit, one scale per row) or "
            "'int4' (4-bit groups along the hidden dimension)",
        )


def name_keyword_options(cls: type, names: Iterable[str]) -> None:
    """Give `cls(...)` a signature naming each keyword option `names` (taken through `**options`, default None), for
    `help()`, `inspect.signature` and tools that read it; the options themselves are declared in their dataclasses."""
    init = inspect.signature(cls.__init__)
    named = [p for p in init.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    keyword = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
    saved = inspect.Parameter("saved", inspect.Parameter.VAR_KEYWORD)
    cls.__init__.__signature__ = init.replace(parameters=[*named, *keyword, saved])


class HfPtqConfig(QuantizationConfigMixin):
    """Base of hf_ptq's quantization configs; subclasses set their fields, then call `_take_saved_keys` and
    validate in `post_init` (with `_check_shared_fields`). Each has `method` (the registered method the pipeline
    runs), `scheme` (`WeightScheme`), `options` (the method's options dataclass) and `compute_dtype`."""

    # dtype of hf_ptq's weight-only matmuls (QuantLinear, quantized embeddings): PtqConfig lets users choose it;
    # SmoothQuantConfig's weight-only modules (its quantized embeddings) use "auto"
    compute_dtype = "auto"
    target_bits = None  # PtqConfig's mixed precision budget (`core.bit_budget`); None: no per-layer search

    def scheme_for(self, name: str) -> WeightScheme:
        """The grid of the Linear `name` (PtqConfig: per-layer schemes, if any); here the config's one scheme."""
        return self.scheme

    def _take_saved_keys(self, saved: dict[str, Any]) -> None:
        """Keep the keys `to_dict` writes that are not constructor arguments (dataset description, format version);
        raise on any other unknown key, listing the fields the constructor's signature names."""
        self.dataset_description = saved.pop("dataset_description", None)
        # a checkpoint another tool made, converted at load: its quant_method and saved quantization_config
        self.converted_from = saved.pop("converted_from", None)
        self.format_version = check_format_version(type(self).__name__, saved.pop("format_version", FORMAT_VERSION))
        if saved:
            params = inspect.signature(type(self)).parameters.items()
            known = [n for n, p in params if n != "quant_method" and p.kind is not inspect.Parameter.VAR_KEYWORD]
            raise ValueError(
                f"{type(self).__name__} got unknown field(s) {sorted(saved)}; known fields: {', '.join(known)}."
            )

    def _plain_numbers(self) -> None:
        """numpy scalars in any field (e.g. `bits=np.int64(4)` from a sweep) become Python numbers, so that every
        numeric field takes them alike and `to_dict` stays JSON-safe."""
        for name, value in list(vars(self).items()):
            setattr(self, name, plain_number(value))

    def _check_shared_fields(self, fail: Fail, needs_calibration: bool) -> None:
        """Validate modules_to_not_convert, num_samples, seq_len, batch_size, tokenizer and their bounds; describe
        the dataset (warning when the method does not calibrate)."""
        mods = self.modules_to_not_convert
        if mods is not None and (not isinstance(mods, list) or not all(isinstance(m, str) for m in mods)):
            raise fail("modules_to_not_convert", mods, 'a list of module names, e.g. ["lm_head", "mlp.down_proj"]')
        check_module_patterns(fail, mods or [])
        for field in ("num_samples", "seq_len", "batch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise fail(field, value, "a positive integer")
        cls = type(self).__name__
        error = token_budget_error(cls, self.num_samples, self.seq_len)
        if error is None and needs_calibration and self._data_free:
            error = data_free_error(cls, self.seq_len)
        if error is not None:
            raise error
        tok = self.tokenizer
        if tok is not None and not isinstance(tok, str) and not callable(tok):
            raise fail("tokenizer", tok, "a tokenizer, a tokenizer name or folder, or None (the model's own)")
        if self.dataset is not None:
            self.dataset_description = describe_dataset(self.dataset)
            if not needs_calibration:
                logger.warning(
                    "hf_ptq: %s.dataset is unused: method=%r needs no calibration data. Drop dataset, or choose a "
                    "calibrated method ('gptq', 'awq').",
                    cls,
                    getattr(self, "method", None),
                )
        elif needs_calibration and self.dataset_description is None:
            self.dataset_description = {"source": "sampled-from-model"}

    @property
    def _data_free(self) -> bool:
        """Calibration on text sampled from the model: no dataset now, and none described by a saved config."""
        described = self.dataset_description
        if self.dataset is not None:
            return False
        return not isinstance(described, dict) or described.get("source") == "sampled-from-model"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: the calibration data itself is replaced by its description."""
        # private attributes (`_scheme`, `_options`) are derived from the public fields, which are what is saved
        keep = (k for k in self.__dict__ if not k.startswith("_") and k not in ("dataset", "tokenizer"))
        out = {k: copy.deepcopy(self.__dict__[k]) for k in keep}
        if out.get("converted_from") is None:  # written only for checkpoints converted from another tool's format
            out.pop("converted_from", None)
        out["dataset"] = None
        out["tokenizer"] = self.tokenizer if isinstance(self.tokenizer, str) else None
        return out

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()
