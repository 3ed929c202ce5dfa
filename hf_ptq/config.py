"""`PtqConfig`: the one quantization config users pass to `from_pretrained`.

Every field is validated once, here, at construction: a bad value raises `ValueError` naming the field and the
allowed values before any weight is read (checks that need the model, such as `seq_len` against its positions, run
before its weights are read: `hf_ptq.pipeline.preflight`). numpy integer / float scalars are taken as the Python
numbers they hold, in every numeric field. The config round-trips through `to_dict()` / `PtqConfig(**d)` and
`config.json`; calibration data is described there (source, size, hash), never embedded.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.utils import logging

from .auto_method import DEPLOY_TARGETS, PREFERENCES, choose_method
from .config_base import HfPtqConfig, check_embeddings
from .methods import method_names, method_spec
from .methods.gptq import stores_g_idx

logger = logging.get_logger("hf_ptq")

QUANT_METHOD = "hf_ptq"
AUTO = "auto"

_ALLOWED_BITS = (2, 3, 4, 8)
# AWQ's scale search scores grid + 1 candidates per group of Linears, each one [out, in] x [in, in] product: 100 (α in
# steps of 0.01, 5x the default 20) is already finer than the output error can tell apart; larger grids only add time
# (10**6 would run for days).
MAX_AWQ_GRID = 100
_COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
_DEFAULTS = {"bits": 4, "group_size": 128, "sym": False}


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# Method-specific fields: default, check, allowed values. `None` means "not set"; a method that does not list the
# field in its `MethodSpec.fields` rejects any other value.
_METHOD_FIELDS: dict[str, tuple[Any, Any, str]] = {
    "desc_act": (True, _is_bool, "True or False"),
    "static_groups": (False, _is_bool, "True or False"),
    "true_sequential": (True, _is_bool, "True or False"),
    "damp_percent": (
        0.01,
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
        "a number in (0, 1], e.g. 0.01",
    ),
    "block_size": (128, _is_positive_int, "a positive integer (columns per lazy GPTQ update, e.g. 128)"),
    "clip": (True, _is_bool, "True or False"),
    "full_range": (False, _is_bool, "True or False"),
    "duo_scaling": (True, _is_bool, "True or False"),
    "grid": (
        20,
        lambda v: _is_positive_int(v) and v <= MAX_AWQ_GRID,
        f"an integer from 1 to {MAX_AWQ_GRID} (AWQ scale candidates, default 20; each costs one product per group)",
    ),
    "double_quant": (False, _is_bool, "True or False"),
    "outlier_threshold": (
        6.0,
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
        "a positive number (input features with a larger magnitude are multiplied in 16-bit; default 6.0)",
    ),
}

# Inputs of `method="auto"` (see `hf_ptq.auto_method`): default, check, allowed values. Consumed when the method is
# chosen, then recorded in `auto_choice`; any other method rejects them.
_AUTO_FIELDS: dict[str, tuple[Any, Any, str]] = {
    "finetune": (False, _is_bool, "True or False"),
    "prefer": ("accuracy", lambda v: v in PREFERENCES, "one of " + ", ".join(map(repr, PREFERENCES))),
    "deploy": (
        None,
        lambda v: v is None or v in DEPLOY_TARGETS,
        "None or one of " + ", ".join(map(repr, DEPLOY_TARGETS)),
    ),
}


def _fail(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"PtqConfig.{field}={value!r} is invalid: {field} must be {allowed}.")


class PtqConfig(HfPtqConfig):
    """Weight quantization config for `AutoModel*.from_pretrained(..., quantization_config=PtqConfig(...))`.

    Args:
        method: algorithm name; see `hf_ptq.methods.method_names()` (`"rtn"`, `"int8"`, `"gptq"`, `"hqq"`, `"nf4"`,
            `"fp4"`, `"llm_int8"`, ...), or `"auto"` to let the decision tree of `hf_ptq.auto_method` choose.
        bits: weight bit width, one of 2, 3, 4, 8 (default 4; `int8` and `llm_int8` always use 8, `nf4` / `fp4` 4).
        group_size: input channels sharing one scale: a positive divisor of every quantized layer's
            in_features, `-1` for one scale per output channel, `0` for one scale per tensor (default 128; 64 for
            `hqq`, `nf4` and `fp4`, whose block size is one of 32, 64, ..., 4096).
        sym: symmetric (no zero point) when True, asymmetric (scale and zero point) when False (default).
        modules_to_not_convert: module names (or suffixes / regexes, as transformers matches them) kept in
            full precision; the output embedding is always kept. An invalid regex or an empty name is refused here;
            names matching no module of the model get one warning before its weights load.
        dataset, num_samples, seq_len, batch_size: calibration data for methods that need it (see
            docs/calibration.md): a list of texts, token ids (LongTensor [n, seq] or lists), a `datasets.Dataset`, a
            UTF-8 text file path, `"wikitext2"` / `"c4"`, or None for text sampled from the model itself (warned
            about as unused with a method without calibration). `num_samples × seq_len` is at most 2**20 tokens;
            `seq_len` at most the model's `max_position_embeddings` / `n_positions`, and 16384 with `dataset=None`.
        tokenizer: tokenizer (or its name / folder) for text calibration data; default: the model's own.
        embeddings: None (default: the input embedding and the output head `lm_head` stay in the model's dtype),
            `"int8"` (8-bit symmetric, one scale per vocabulary row) or `"int4"` (4-bit, groups of `group_size` along
            the hidden dimension when it divides it, else the largest of 128 / 64 / 32 that does; `sym` as the
            config). Quantized with RTN whatever the method (calibrated methods quantize them after calibration); a
            tied head shares the embedding's one packed tensor. Not for `nf4` / `fp4` / `llm_int8`. See
            docs/embeddings.md.
        desc_act, static_groups, damp_percent, block_size: GPTQ options (see docs/gptq.md); only accepted with
            `method="gptq"`.
        duo_scaling, grid: AWQ options (see docs/awq.md; `grid` from 1 to 100); only accepted with `method="awq"`.
        clip, true_sequential: range search and stage-by-stage calibration, for `gptq` and `awq`.
        full_range: `rtn`, `gptq` and `awq`, with `sym=True` only: the symmetric grid of all 2^b levels, as
            llama.cpp's Q4_0: per group `scale = m / -2^(b-1)` for the signed value m of largest magnitude (negative
            where m > 0), integers in [-2^(b-1), 2^(b-1) - 1], so m lands on -2^(b-1) and the step is
            max|w| / 2^(b-1) instead of max|w| / (2^(b-1) - 1); `clip` searches the same grid (default False: scales
            > 0, integers in [-(2^(b-1) - 1), 2^(b-1) - 1]). See docs/rtn.md.
        compute_dtype: dtype of the quantized matmuls: `"auto"` (on CPU: the packed kernels in bf16, the dequantize
            path in bf16 on CPUs with native bf16 and in fp32 on others; elsewhere the activations' dtype; see
            docs/kernels.md) or `"bfloat16"` / `"float16"` / `"float32"`. For `nf4` / `fp4` it is bitsandbytes'
            `bnb_4bit_compute_dtype` (`"auto"`: the model's dtype).
        double_quant: `nf4` / `fp4` only: quantize the block scales too (QLoRA's double quantization; default False).
        outlier_threshold: `llm_int8` only: LLM.int8()'s outlier threshold (bitsandbytes' `llm_int8_threshold`,
            default 6.0).
        finetune, prefer, deploy: `method="auto"` only: the model will be fine-tuned (default False); `"accuracy"`
            (default) or `"latency"`; deployment target `"cpu"`, `"gpu"` or None (unknown). See docs/backends.md.
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
        batch_size: int = 1,
        compute_dtype: str = "auto",
        tokenizer: Any = None,
        embeddings: str | None = None,
        desc_act: bool | None = None,
        static_groups: bool | None = None,
        damp_percent: float | None = None,
        true_sequential: bool | None = None,
        block_size: int | None = None,
        clip: bool | None = None,
        full_range: bool | None = None,
        duo_scaling: bool | None = None,
        grid: int | None = None,
        double_quant: bool | None = None,
        outlier_threshold: float | None = None,
        finetune: bool | None = None,
        prefer: str | None = None,
        deploy: str | None = None,
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
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        self.desc_act = desc_act
        self.static_groups = static_groups
        self.damp_percent = damp_percent
        self.true_sequential = true_sequential
        self.block_size = block_size
        self.clip = clip
        self.full_range = full_range
        self.duo_scaling = duo_scaling
        self.grid = grid
        self.double_quant = double_quant
        self.outlier_threshold = outlier_threshold
        self.finetune = finetune
        self.prefer = prefer
        self.deploy = deploy
        self.auto_choice = saved.pop("auto_choice", None)  # written by `to_dict` after method="auto" chose
        known = "method, bits, group_size, sym, modules_to_not_convert, dataset, num_samples, seq_len, batch_size, "
        self._take_saved_keys(saved, [known + "compute_dtype, tokenizer, embeddings", *_METHOD_FIELDS, *_AUTO_FIELDS])
        self.post_init()

    def _resolve_auto(self, names: list[str]) -> None:
        """`method="auto"`: validate its inputs, choose the method, log and record the choice."""
        inputs = {}
        for field, (default, check, allowed) in _AUTO_FIELDS.items():
            value = getattr(self, field)
            value = default if value is None else value
            if not check(value):
                raise _fail(field, value, allowed)
            inputs[field] = value
            setattr(self, field, None)  # consumed: the saved config records them in `auto_choice`
        inputs["calibration_data"] = self.dataset is not None
        inputs["cuda"] = torch.cuda.is_available()
        choice = choose_method(**inputs)
        if choice.method not in names:
            raise ValueError(
                f"PtqConfig(method='auto') chose method={choice.method!r} ({choice.reason}), which this version of "
                f"hf_ptq does not have; choose one of {', '.join(map(repr, names))} explicitly."
            )
        self.method = choice.method
        self.auto_choice = {"method": choice.method, "reason": choice.reason, "inputs": inputs}
        logger.warning(f"hf_ptq: method='auto' chose method={choice.method!r}: {choice.reason}.")

    def _auto_note(self) -> str:
        """For errors about a method that `method="auto"` chose: which inputs made the choice."""
        if not self.auto_choice:
            return ""
        return f" (method={self.method!r} was chosen by method='auto': {self.auto_choice['reason']})"

    def post_init(self) -> None:
        """Validate every field; normalise method-forced values (e.g. `int8` is 8-bit symmetric per-channel)."""
        self._plain_numbers()
        names = method_names()
        if self.method == AUTO:
            self._resolve_auto(names)
        if not isinstance(self.method, str) or self.method not in names:
            raise _fail("method", self.method, "one of " + ", ".join(repr(n) for n in [*names, AUTO]))
        for field in _AUTO_FIELDS:
            if getattr(self, field) is not None:
                raise ValueError(
                    f"PtqConfig.{field}={getattr(self, field)!r} does not apply to method={self.method!r}; it is an "
                    f"input of method='auto'. Drop {field} or use method='auto'."
                )
        spec = method_spec(self.method)
        for field, forced in spec.forced_fields.items():
            value = getattr(self, field)
            if value is not None and value != forced:
                raise ValueError(
                    f"PtqConfig.{field}={value!r} does not apply to method={self.method!r}, which always uses "
                    f"{field}={forced!r} ({spec.summary}); drop {field} or choose method='rtn'.{self._auto_note()}"
                )
            setattr(self, field, forced)
        for field, default in (_DEFAULTS | spec.defaults).items():
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
        self._check_shared_fields(_fail, spec.needs_calibration)
        for field, (default, check, allowed) in _METHOD_FIELDS.items():
            value = getattr(self, field)
            if field not in spec.fields:
                if value is not None:
                    users = [n for n in names if field in method_spec(n).fields]
                    raise ValueError(
                        f"PtqConfig.{field}={value!r} does not apply to method={self.method!r}; it is an option of "
                        f"method={' / '.join(repr(u) for u in users)}. Drop {field} or change the method."
                    )
                continue
            if value is None:
                setattr(self, field, default)
            elif not check(value):
                raise _fail(field, value, allowed)
        if self.full_range and not self.sym:
            raise ValueError(
                f"PtqConfig.full_range=True needs sym=True (got sym={self.sym!r}): the full-range grid is symmetric, "
                "with no zero point. Set sym=True or drop full_range."
            )
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise _fail("compute_dtype", self.compute_dtype, "one of " + ", ".join(map(repr, _COMPUTE_DTYPES)))
        check_embeddings(_fail, self.embeddings)
        if self.embeddings is not None and spec.backend is not None:
            ours = [n for n in names if method_spec(n).backend is None]
            raise ValueError(
                f"PtqConfig.embeddings={self.embeddings!r} does not apply to method={self.method!r}, whose weights "
                f"live in {spec.backend}'s modules: hf_ptq quantizes embeddings only next to its own packed layers. "
                f"Drop embeddings (embeddings=None) or choose method={' / '.join(map(repr, ours))}.{self._auto_note()}"
            )
        if spec.check is not None:
            try:
                spec.check(self)
            except ValueError as exc:
                raise ValueError(f"{exc}{self._auto_note()}") from None

    @property
    def act_order_modules(self) -> bool:
        """Whether quantized layers carry a `weight_g_idx` (GPTQ act-order with dynamic groups)."""
        return bool(self.desc_act) and stores_g_idx(True, bool(self.static_groups), self.group_size)

    def describe(self) -> str:
        """One line for logs and model cards, e.g. `rtn w4 g128 asym`."""
        gran = {-1: "per-channel", 0: "per-tensor"}.get(self.group_size, f"g{self.group_size}")
        text = f"{self.method} w{self.bits} {gran} {'sym' if self.sym else 'asym'}"
        if self.full_range:
            text += " full-range"
        if self.desc_act:
            text += " act-order" + (" static-groups" if self.static_groups else "")
        if self.double_quant:
            text += " double-quant"
        if self.embeddings:
            text += f" embeddings={self.embeddings}"
        return text
