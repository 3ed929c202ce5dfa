"""bitsandbytes' formats as `PtqConfig` methods: `nf4`, `fp4` (4-bit, blockwise absmax) and `llm_int8` (LLM.int8()).

bitsandbytes quantizes and runs these itself, in its own `Linear4bit` / `Linear8bitLt` modules: no function of a
weight is registered here, only what the config validates. The quantizer glue is `hf_ptq.quantizer.bnb`.
"""

from __future__ import annotations

from typing import Any

from .options import Bnb4bitOptions, LlmInt8Options
from .registry import register_method

BNB_4BIT_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
BNB = ("bitsandbytes", "bnb")


def check_4bit(config: Any) -> None:
    if config.group_size not in BNB_4BIT_BLOCK_SIZES:
        raise ValueError(
            f"PtqConfig.group_size={config.group_size!r} is invalid for method={config.method!r}: bitsandbytes "
            f"quantizes 4-bit weights in blocks of one of {', '.join(map(str, BNB_4BIT_BLOCK_SIZES))} values "
            "(default 64)."
        )


def check_int8(config: Any) -> None:
    if config.compute_dtype != "auto":
        raise ValueError(
            f"PtqConfig.compute_dtype={config.compute_dtype!r} does not apply to method='llm_int8': LLM.int8() "
            "computes in the activations' dtype. Drop compute_dtype (load the model with dtype=... instead)."
        )


for _name, _kind in (("nf4", "4-bit NormalFloat"), ("fp4", "4-bit float")):
    register_method(
        _name,
        summary=f"bitsandbytes {_kind}: blockwise absmax scales, no calibration; trainable with LoRA (QLoRA)",
        options=Bnb4bitOptions,
        defaults={"group_size": 64},
        check=check_4bit,
        requires=BNB,
        backend="bitsandbytes",
        forced_fields={"bits": 4, "sym": True},
    )(None)

register_method(
    "llm_int8",
    summary="bitsandbytes LLM.int8(): int8 weights per row, outlier input features kept in 16-bit; trainable with LoRA",
    options=LlmInt8Options,
    check=check_int8,
    requires=BNB,
    backend="bitsandbytes",
    forced_fields={"bits": 8, "group_size": -1, "sym": True},
)(None)
