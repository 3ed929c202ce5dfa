"""`method="auto"`: the decision tree that picks a quantization method from what the user has and wants.

A pure function of its inputs (`AutoInputs`; no torch, no I/O), so the whole tree is tested directly; `PtqConfig`
calls it once at construction, logs the choice with its reason and records both in the saved config. The tree, in
order:

1. fine-tuning wanted                  -> `nf4` (QLoRA: LoRA adapters train on bitsandbytes' 4-bit weights)
2. deploying on CPU                    -> `int8` (torch's int8 weight-only kernel, near-lossless; W8A8: SmoothQuant)
3. calibration data given              -> `gptq`, or `awq` when latency matters more than the last bit of accuracy
4. no calibration data, on CUDA        -> `nf4` (quantizes in seconds, bitsandbytes' CUDA kernels)
5. no calibration data, otherwise      -> `hqq` (the most accurate calibration-free 4-bit method; hf_ptq's int4 kernel)
"""

from __future__ import annotations

from dataclasses import dataclass

from .core.options import Options, option, switch

PREFERENCES = ("accuracy", "latency")
DEPLOY_TARGETS = ("cpu", "gpu")


@dataclass(frozen=True)
class AutoInputs(Options):
    """What `PtqConfig(method="auto")` is told (besides whether calibration data is given)."""

    finetune: bool = switch(False, "the quantized model will be fine-tuned (LoRA)")
    prefer: str = option(
        "accuracy",
        lambda v: v in PREFERENCES,
        "one of " + ", ".join(map(repr, PREFERENCES)),
        "what matters more: accuracy, or latency (GPTQ or AWQ when there is data)",
    )
    deploy: str | None = option(
        None,
        lambda v: v is None or v in DEPLOY_TARGETS,
        "None or one of " + ", ".join(map(repr, DEPLOY_TARGETS)),
        "where the model will run: cpu, gpu or None (unknown)",
    )


@dataclass(frozen=True)
class AutoChoice:
    """The method `method="auto"` resolved to, and why (one sentence, for logs and config.json)."""

    method: str
    reason: str


def choose_method(
    *, finetune: bool, calibration_data: bool, prefer: str = "accuracy", deploy: str | None = None, cuda: bool = False
) -> AutoChoice:
    """Walk the decision tree.

    Args:
        finetune: the quantized model will be fine-tuned (LoRA adapters).
        calibration_data: a calibration dataset was given.
        prefer: `"accuracy"` or `"latency"` (decides between GPTQ and AWQ when there is data).
        deploy: where the model will run, `"cpu"`, `"gpu"` or None (unknown: `cuda` decides).
        cuda: a CUDA device is available here.
    """
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer={prefer!r} is invalid: prefer must be one of {', '.join(map(repr, PREFERENCES))}.")
    if deploy is not None and deploy not in DEPLOY_TARGETS:
        raise ValueError(f"deploy={deploy!r} is invalid: deploy must be None or one of {DEPLOY_TARGETS}.")
    if finetune:
        return AutoChoice("nf4", "fine-tuning wanted: LoRA adapters train on nf4 weights (QLoRA)")
    if deploy == "cpu":
        return AutoChoice(
            "int8",
            "CPU deployment: int8 weights run on torch's int8 weight-only kernel and lose almost no accuracy "
            "(for int8 activations as well, use hf_ptq.SmoothQuantConfig)",
        )
    if calibration_data:
        if prefer == "latency":
            return AutoChoice("awq", "calibration data given, latency preferred: AWQ keeps plain 4-bit weights")
        return AutoChoice("gptq", "calibration data given: GPTQ is the most accurate 4-bit method with data")
    if deploy == "gpu" or (deploy is None and cuda):
        return AutoChoice(
            "nf4", "no calibration data, on CUDA: nf4 quantizes in seconds and runs on bitsandbytes' kernels"
        )
    return AutoChoice(
        "hqq", "no calibration data: HQQ is the most accurate calibration-free 4-bit method and runs on the int4 kernel"
    )
