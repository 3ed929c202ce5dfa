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

from .auto_method import AutoInputs, choose_method
from .config_base import HfPtqConfig, check_embeddings, name_keyword_options
from .core.bit_budget import MixedPrecisionOptions
from .core.layer_schemes import check_layer_schemes, entry_for, scheme_over
from .core.options import InvalidOption, option_names
from .core.scheme import WeightScheme
from .methods import MethodSpec, method_names, method_spec
from .methods.gptq import stores_g_idx
from .methods.options import SequentialOptions

logger = logging.get_logger("hf_ptq")

QUANT_METHOD = "hf_ptq"
AUTO = "auto"
OWNER = "PtqConfig"
_COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
_SCHEME_FIELDS = ("bits", "group_size", "sym")  # named arguments; full_range comes as an option (rtn, gptq, awq)


def _fail(field: str, value: Any, allowed: str) -> ValueError:
    return InvalidOption(field, value, allowed).owned_by(OWNER)


def _accepted_options(spec: MethodSpec) -> tuple[str, ...]:
    """The keyword options `method` takes besides the named arguments: its own, the walk's, full_range."""
    names = list(spec.fields)
    if spec.needs_calibration:
        names += option_names(SequentialOptions)
    if spec.full_range:
        names.append("full_range")
    if spec.mixed_precision:
        names += option_names(MixedPrecisionOptions)
    return tuple(names)


def option_owners() -> dict[str, list[str]]:
    """Every keyword option of `PtqConfig` -> the methods that take it (`"auto"` for its inputs), in declaration
    order."""
    owners: dict[str, list[str]] = {}
    for name in method_names():
        for option in _accepted_options(method_spec(name)):
            owners.setdefault(option, []).append(name)
    for option in option_names(AutoInputs):
        owners[option] = [AUTO]
    return owners


class PtqConfig(HfPtqConfig):
    """Weight quantization config for `AutoModel*.from_pretrained(..., quantization_config=PtqConfig(...))`.

    Args:
        method: algorithm name; see `hf_ptq.methods.method_names()` (`"rtn"`, `"int8"`, `"gptq"`, `"hqq"`, `"nf4"`,
            `"fp4"`, `"llm_int8"`, ...), or `"auto"` to let the decision tree of `hf_ptq.auto_method` choose.
        bits: weight bit width, one of 2, 3, 4, 5, 6, 8 (default 4; `int8` and `llm_int8` always use 8, `nf4` /
            `fp4` 4; `hqq` takes 2, 3, 4, 8).
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
        **options: the method's own options, each declared once (default, check, help) in a frozen dataclass beside
            the code that reads it, and accepted only with the methods that read it:
            `desc_act`, `static_groups`, `damp_percent`, `block_size`, `clip`: GPTQ (`methods.gptq.GPTQOptions`,
            docs/gptq.md); `duo_scaling`, `grid` (1 to 100), `clip`: AWQ (`methods.awq.AWQOptions`, docs/awq.md);
            `true_sequential`: stage-by-stage calibration, every calibrated method (`pipeline.sequential
            .SequentialOptions`); `double_quant`: `nf4` / `fp4`, QLoRA's double quantization of the block scales;
            `outlier_threshold`: `llm_int8`, LLM.int8()'s threshold (`methods.bnb`); `finetune`, `prefer`,
            `deploy`: the inputs of `method="auto"` (`auto_method.AutoInputs`: the model will be fine-tuned,
            "accuracy" or "latency", deployment target "cpu" / "gpu" / None; docs/backends.md); and `full_range`.
        full_range: `rtn`, `gptq` and `awq`, with `sym=True` only: the symmetric grid of all 2^b levels, as
            llama.cpp's Q4_0: per group `scale = m / -2^(b-1)` for the signed value m of largest magnitude (negative
            where m > 0), integers in [-2^(b-1), 2^(b-1) - 1], so m lands on -2^(b-1) and the step is
            max|w| / 2^(b-1) instead of max|w| / (2^(b-1) - 1); `clip` searches the same grid (default False: scales
            > 0, integers in [-(2^(b-1) - 1), 2^(b-1) - 1]). See docs/rtn.md.
        compute_dtype: dtype of the quantized matmuls: `"auto"` (on CPU: the packed kernels in bf16, the dequantize
            path in bf16 on CPUs with native bf16 and in fp32 on others; elsewhere the activations' dtype; see
            docs/kernels.md) or `"bfloat16"` / `"float16"` / `"float32"`. For `nf4` / `fp4` it is bitsandbytes'
            `bnb_4bit_compute_dtype` (`"auto"`: the model's dtype).
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
        quant_method: str = QUANT_METHOD,
        **options: Any,
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
        for name in option_owners():  # None: not given (a method that does not take it rejects any other value)
            setattr(self, name, options.pop(name, None))
        self.auto_choice = options.pop("auto_choice", None)  # written by `to_dict` after method="auto" chose
        # written after `target_bits` chose each layer's scheme (a compact pattern -> scheme map): reloads read it
        self.chosen_schemes = options.pop("chosen_schemes", None)
        self._take_saved_keys(options)
        self.post_init()

    def _resolve_auto(self, names: list[str]) -> None:
        """`method="auto"`: validate its inputs, choose the method, log and record the choice."""
        given = {f: getattr(self, f) for f in option_names(AutoInputs) if getattr(self, f) is not None}
        try:
            inputs = vars(AutoInputs(**given))
        except InvalidOption as err:
            raise err.owned_by(OWNER) from None
        for field in inputs:
            setattr(self, field, None)  # consumed: the saved config records them in `auto_choice`
        inputs = {**inputs, "calibration_data": self.dataset is not None, "cuda": torch.cuda.is_available()}
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
        spec = method_spec(self.method)
        self._check_options_apply(spec)
        for field, forced in spec.forced_fields.items():
            value = getattr(self, field)
            if value is not None and value != forced:
                raise ValueError(
                    f"PtqConfig.{field}={value!r} does not apply to method={self.method!r}, which always uses "
                    f"{field}={forced!r} ({spec.summary}); drop {field} or choose method='rtn'.{self._auto_note()}"
                )
            setattr(self, field, forced)
        defaults = WeightScheme()
        for field in (*_SCHEME_FIELDS, "full_range") if spec.full_range else _SCHEME_FIELDS:
            if getattr(self, field) is None:
                setattr(self, field, spec.defaults.get(field, getattr(defaults, field)))
        self._check_shared_fields(_fail, spec.needs_calibration or self.target_bits is not None)
        self._build_options(spec)
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
        self._check_layer_entries(spec)
        if spec.check is not None:
            try:
                spec.check(self)
            except ValueError as exc:
                raise ValueError(f"{exc}{self._auto_note()}") from None

    def _check_layer_entries(self, spec: MethodSpec) -> None:
        """The config's scheme and every per-layer entry must be one the method quantizes: its bit widths, the full
        range only where it takes it, and none of the fields it fixes (HQQ's asymmetry) set otherwise."""
        maps = {f: getattr(self, f, None) or {} for f in ("layer_schemes", "chosen_schemes")}
        for field, entry in [("bits", {"bits": self.bits})] + [
            (f"{f}[{p!r}]", e) for f, m in maps.items() for p, e in m.items()
        ]:
            bits = entry.get("bits")
            if spec.bit_widths is not None and bits is not None and bits not in spec.bit_widths:
                raise ValueError(
                    f"PtqConfig.{field}: bits={bits!r} is invalid for method={self.method!r}, which quantizes "
                    f"{', '.join(map(str, spec.bit_widths))}-bit weights; choose one of those or method='rtn' / "
                    f"'gptq' / 'awq'.{self._auto_note()}"
                )
            if entry.get("full_range") and not spec.full_range:
                raise ValueError(
                    f"PtqConfig.{field}: full_range=True does not apply to method={self.method!r}; it is a grid of "
                    f"method='rtn' / 'gptq' / 'awq'. Drop full_range or change the method.{self._auto_note()}"
                )
            for key, forced in spec.forced_fields.items():
                if key in entry and entry[key] != forced:
                    raise ValueError(
                        f"PtqConfig.{field}: {key}={entry[key]!r} does not apply to method={self.method!r}, which "
                        f"always uses {key}={forced!r}; drop {key!r} from the entry.{self._auto_note()}"
                    )

    def _check_options_apply(self, spec: MethodSpec) -> None:
        """A keyword option given to a method that does not read it is refused, naming the methods that do."""
        accepted = _accepted_options(spec)
        for field, users in option_owners().items():
            value = getattr(self, field)
            if value is None or field in accepted:
                continue
            if users == [AUTO]:
                raise ValueError(
                    f"PtqConfig.{field}={value!r} does not apply to method={self.method!r}; it is an input of "
                    f"method='auto'. Drop {field} or use method='auto'."
                )
            raise ValueError(
                f"PtqConfig.{field}={value!r} does not apply to method={self.method!r}; it is an option of "
                f"method={' / '.join(repr(u) for u in users)}. Drop {field} or change the method."
            )

    def _build_options(self, spec: MethodSpec) -> None:
        """Check the scheme, the walk's and the method's options (their own checks), and fill in their defaults."""

        def given(cls: type) -> dict[str, Any]:
            return {f: getattr(self, f) for f in option_names(cls) if getattr(self, f) is not None}

        try:
            self._scheme = WeightScheme(**given(WeightScheme))
            self._options = None if spec.options is None else spec.options(**given(spec.options))
            walk = SequentialOptions(**given(SequentialOptions)) if spec.needs_calibration else None
            mixed = MixedPrecisionOptions(**given(MixedPrecisionOptions)) if spec.mixed_precision else None
            if mixed is not None:
                mixed.check_against(self._scheme)
            check_layer_schemes("chosen_schemes", self.chosen_schemes, self._scheme)
        except InvalidOption as err:
            raise err.owned_by(OWNER) from None
        for options in (self._options, walk, mixed):
            for field, value in (vars(options) if options is not None else {}).items():
                setattr(self, field, value)

    @property
    def scheme(self) -> WeightScheme:
        """The weights' grid (bits, group size, symmetry, full range), validated."""
        return self._scheme

    @property
    def options(self) -> Any:
        """The method's own options (e.g. `GPTQOptions`), validated; None for methods without any."""
        return self._options

    @property
    def act_order_modules(self) -> bool:
        """Whether quantized layers carry a `weight_g_idx` (GPTQ act-order with dynamic groups)."""
        return self.act_order_for(self.scheme)

    def act_order_for(self, scheme: WeightScheme) -> bool:
        """Whether a layer of `scheme` carries a `weight_g_idx` (GPTQ act-order with dynamic groups)."""
        return bool(self.desc_act) and stores_g_idx(True, bool(self.static_groups), scheme.group_size)

    def scheme_for(self, name: str) -> WeightScheme:
        """The grid of the Linear `name`: its entry in `chosen_schemes` (what `target_bits` chose), else in
        `layer_schemes` (pinned), else the config's scheme (`core.layer_schemes` for the matching rules)."""
        for schemes in (self.chosen_schemes, self.layer_schemes):
            found = entry_for(schemes, name)
            if found is not None:
                return scheme_over(self.scheme, found[1])
        return self.scheme

    @property
    def mixed(self) -> bool:
        """Whether layers may differ in scheme (a budget or a per-layer map)."""
        return any(getattr(self, f, None) for f in ("target_bits", "layer_schemes", "chosen_schemes"))

    def describe(self) -> str:
        """One line for logs and model cards, e.g. `rtn w4 g128 asym`."""
        gran = {-1: "per-channel", 0: "per-tensor"}.get(self.group_size, f"g{self.group_size}")
        text = f"{self.method} w{self.bits} {gran} {'sym' if self.sym else 'asym'}"
        if self.target_bits is not None:
            text = f"{self.method} mixed {self.target_bits:g} bits {'sym' if self.sym else 'asym'}"
        elif self.layer_schemes:
            text += f" +{len(self.layer_schemes)} layer scheme(s)"
        if self.full_range:
            text += " full-range"
        if self.desc_act:
            text += " act-order" + (" static-groups" if self.static_groups else "")
        if self.double_quant:
            text += " double-quant"
        if self.embeddings:
            text += f" embeddings={self.embeddings}"
        return text


name_keyword_options(PtqConfig, option_owners())
