"""`PtqConfig`: the one quantization config users pass to `from_pretrained`.

Every field is validated once, here, at construction: a bad value raises `ValueError` naming the field and the
allowed values before any weight is read. The config round-trips through `to_dict()` / `PtqConfig(**d)` and
`config.json`; calibration data is described there (source, size, hash), never embedded.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .calibration.describe import describe_dataset
from .methods import method_names, method_spec

QUANT_METHOD = "hf_ptq"

_ALLOWED_BITS = (2, 3, 4, 8)
_COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
_DEFAULTS = {"bits": 4, "group_size": 128, "sym": False}


def _fail(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"PtqConfig.{field}={value!r} is invalid: {field} must be {allowed}.")


class PtqConfig(QuantizationConfigMixin):
    """Weight quantization config for `AutoModel*.from_pretrained(..., quantization_config=PtqConfig(...))`.

    Args:
        method: algorithm name; see `hf_ptq.methods.method_names()` (`"rtn"`, `"int8"`, ...).
        bits: weight bit width, one of 2, 3, 4, 8 (default 4; `int8` always uses 8).
        group_size: input channels sharing one scale: a positive divisor of every quantized layer's
            in_features, `-1` for one scale per output channel, `0` for one scale per tensor (default 128).
        sym: symmetric (no zero point) when True, asymmetric (scale and zero point) when False (default).
        modules_to_not_convert: module names (or suffixes / regexes, as transformers matches them) kept in
            full precision; the output embedding is always kept.
        dataset, num_samples, seq_len, batch_size: calibration data for methods that need it.
        compute_dtype: dtype of the quantized matmuls: `"auto"` (bf16 on CPUs with native bf16, where the packed
            kernels are fast, else the activations' dtype) or `"bfloat16"` / `"float16"` / `"float32"`.
    """

    def __init__(
        self,
        method: str = "rtn",
        bits: int | None = None,
        group_size: int | None = None,
        sym: bool | None = None,
        modules_to_not_convert: list[str] | None = None,
        dataset: Any = None,
        num_samples: int = 128,
        seq_len: int = 512,
        batch_size: int = 8,
        compute_dtype: str = "auto",
        quant_method: str = QUANT_METHOD,
        **saved: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise _fail("quant_method", quant_method, f"{QUANT_METHOD!r} (set by hf_ptq, not by users)")
        self.quant_method = QUANT_METHOD
        self.method = method
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.modules_to_not_convert = modules_to_not_convert
        self.dataset = dataset
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.compute_dtype = compute_dtype
        # Keys written by `to_dict` that are not constructor arguments (dataset description, version).
        self.dataset_description = saved.pop("dataset_description", None)
        self.format_version = saved.pop("format_version", 1)
        if saved:
            raise ValueError(
                f"PtqConfig got unknown field(s) {sorted(saved)}; known fields: "
                "method, bits, group_size, sym, modules_to_not_convert, dataset, num_samples, seq_len, batch_size, "
                "compute_dtype."
            )
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; normalise method-forced values (e.g. `int8` is 8-bit symmetric per-channel)."""
        names = method_names()
        if not isinstance(self.method, str) or self.method not in names:
            raise _fail("method", self.method, "one of " + ", ".join(repr(n) for n in names))
        spec = method_spec(self.method)
        for field, forced in spec.forced_fields.items():
            value = getattr(self, field)
            if value is not None and value != forced:
                raise ValueError(
                    f"PtqConfig.{field}={value!r} does not apply to method={self.method!r}, which always uses "
                    f"{field}={forced!r} ({spec.summary}); drop {field} or choose method='rtn'."
                )
            setattr(self, field, forced)
        for field, default in _DEFAULTS.items():
            if getattr(self, field) is None:
                setattr(self, field, default)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in _ALLOWED_BITS:
            raise _fail("bits", self.bits, "one of " + ", ".join(map(str, _ALLOWED_BITS)))
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < -1:
            raise _fail(
                "group_size",
                self.group_size,
                "a positive divisor of the layers' in_features (e.g. 32, 64, 128), -1 (per-channel) or 0 (per-tensor)",
            )
        if not isinstance(self.sym, bool):
            raise _fail("sym", self.sym, "True or False")
        mods = self.modules_to_not_convert
        if mods is not None and (not isinstance(mods, list) or not all(isinstance(m, str) for m in mods)):
            raise _fail("modules_to_not_convert", mods, 'a list of module names, e.g. ["lm_head", "mlp.down_proj"]')
        for field in ("num_samples", "seq_len", "batch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _fail(field, value, "a positive integer")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise _fail("compute_dtype", self.compute_dtype, "one of " + ", ".join(map(repr, _COMPUTE_DTYPES)))
        if self.dataset is not None:
            self.dataset_description = describe_dataset(self.dataset)

    # --- serialization -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: the calibration data itself is replaced by its description."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != "dataset"}
        out["dataset"] = None
        return out

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PtqConfig) and self.to_dict() == other.to_dict()

    def describe(self) -> str:
        """One line for logs and model cards, e.g. `rtn w4 g128 asym`."""
        gran = {-1: "per-channel", 0: "per-tensor"}.get(self.group_size, f"g{self.group_size}")
        return f"{self.method} w{self.bits} {gran} {'sym' if self.sym else 'asym'}"
