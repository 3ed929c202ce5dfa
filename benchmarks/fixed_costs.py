"""Fixed costs of a GPTQ run: where the time goes per block and per layer when the math itself is tiny.

Builds a tiny Llama from a config (2 blocks, hidden 128, intermediate 256, random weights, bf16), quantizes it with
`hf_ptq.quantize(model, PtqConfig(method="gptq", bits=4, group_size=32, dataset=<8 x 64 token ids>))` and reports:
- seconds per block (whole `quantize` call / blocks), best of `--repeats` fresh models;
- exclusive time per phase (a phase's own time, without the phases nested inside it), from wrappers put around the
  pipeline's functions for one more run: calibration capture, layout discovery, block forwards, Hessian
  accumulation, Cholesky, range search (clip), the GPTQ column loop, module build (packing), dense-weight builds of
  quantized layers, kernel-layout builds, page release, heap trim, finite checks, dtype casts, thread-count changes,
  progress bar; "other" is the rest of the `quantize` call (hooks, set-up, Python glue);
- optionally (`--profile N`) cProfile's top N functions by cumulative time.

    .venv/bin/python benchmarks/fixed_costs.py                 # defaults above
    .venv/bin/python benchmarks/fixed_costs.py --busy 2        # with 2 busy-looping processes (a loaded machine)
    .venv/bin/python benchmarks/fixed_costs.py --profile 40 --json-out fc.json

`--busy N` starts N processes that spin on a core while timing (stopped at the end), to see which costs grow on a
loaded machine (multi-threaded ops wait for a core that is busy elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import json
import logging
import multiprocessing
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf_ptq  # noqa: E402
from hf_ptq import PtqConfig  # noqa: E402


def tiny_llama(hidden: int, intermediate: int, layers: int, vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


class Phases:
    """Exclusive wall time and call counts per phase, from wrappers around functions (innermost phase wins)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []  # [start, time spent in nested phases]
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, phase: str) -> None:
        original = getattr(owner, attr)
        phases = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            phases._stack.append([time.perf_counter(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                start, nested = phases._stack.pop()
                elapsed = time.perf_counter() - start
                phases.seconds[phase] += elapsed - nested
                phases.calls[phase] += 1
                if phases._stack:
                    phases._stack[-1][1] += elapsed

        self._undo.append((owner, attr, vars(owner).get(attr, original)))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


def instrument(phases: Phases) -> None:
    """Wrap the pipeline's functions, each under the phase it belongs to."""
    from hf_ptq.core import page_release
    from hf_ptq.methods import gptq
    from hf_ptq.nn import quant_linear
    from hf_ptq.pipeline import capture, offload, sequential

    w = phases.wrap
    w(sequential, "capture_inputs", "calibration capture")
    w(sequential, "discover_layout", "layout discovery")
    w(capture.BlockCall, "run", "block forwards")
    w(gptq.GPTQ, "add_batch", "Hessian accumulation")
    w(sequential, "quantize_group", "quantize_group glue (read, stack, finite)")
    w(gptq, "_gptq", "GPTQ math (column loop, set-up)")
    w(gptq, "inverse_hessian_factor", "Cholesky (inverse Hessian factor)")
    w(gptq, "clipped_qparams", "range search (clip)")
    w(gptq, "compute_qparams", "range search (clip)")
    w(offload, "install_quantized", "module build (pack, swap)")
    w(quant_linear.QuantLinear, "_build_dense_weight", "dense weight of quantized layers")
    w(quant_linear.QuantLinear, "_dense_qparams", "kernel/layout builds")
    w(quant_linear.QuantLinear, "_build_int4_cpu", "kernel/layout builds")
    w(quant_linear.QuantLinear, "_build_packed_cpu", "kernel/layout builds")
    w(quant_linear.QuantLinear, "_build_int4_cpu_reordered", "kernel/layout builds")
    w(quant_linear.QuantLinear, "_plan", "kernel/layout builds")
    w(sequential, "release_file_pages", "page release")
    w(page_release, "release_file_pages", "page release")
    w(sequential, "trim_heap", "heap trim")
    w(sequential, "check_block_output", "finite checks")
    w(sequential, "check_captured", "finite checks")
    w(sequential, "require_finite_weight", "finite checks")
    w(sequential, "to_work_dtype", "dtype casts")
    w(torch, "set_num_threads", "thread-count changes")
    make_bar = sequential.tqdm

    def timed_bar(*args, **kwargs):
        bar = make_bar(*args, **kwargs)
        for method in ("update", "close", "set_postfix_str"):
            if hasattr(bar, method):
                w(bar, method, "progress bar")
        return bar

    sequential.tqdm = timed_bar
    phases._undo.append((sequential, "tqdm", make_bar))
    w(sequential, "tqdm", "progress bar")


def run_once(args, ids: torch.Tensor) -> float:
    model = tiny_llama(args.hidden, args.intermediate, args.layers, args.vocab)
    cfg = PtqConfig(
        method="gptq",
        bits=4,
        group_size=args.group_size,
        dataset=ids,
        num_samples=ids.shape[0],
        seq_len=ids.shape[1],
        batch_size=args.batch_size,
    )
    start = time.perf_counter()
    hf_ptq.quantize(model, cfg)
    return time.perf_counter() - start


def _spin() -> None:  # pragma: no cover - runs in a child process
    while True:
        pass


@contextlib.contextmanager
def busy(count: int):
    """`count` processes spinning on a core each, stopped on exit."""
    procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(count)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.3 if procs else 0)
        yield
    finally:
        for p in procs:
            p.terminate()
            p.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (best of); after one warm-up run")
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes started while timing")
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions (one more run)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    logging.getLogger("hf_ptq").setLevel(logging.ERROR)
    ids = torch.randint(3, args.vocab, (args.samples, args.seq), generator=torch.Generator().manual_seed(1))
    with busy(args.busy):
        run_once(args, ids)  # warm-up: imports, first-call costs
        times = [run_once(args, ids) for _ in range(args.repeats)]
        phases = Phases()
        instrument(phases)
        try:
            total = run_once(args, ids)
        finally:
            phases.restore()
        profile_text = ""
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run_once(args, ids)
            profiler.disable()
            stream = __import__("io").StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(args.profile)
            profile_text = stream.getvalue()

    best = min(times)
    print(
        f"tiny Llama: {args.layers} blocks, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"calibration {args.samples}x{args.seq} (batch {args.batch_size}), gptq w4 g{args.group_size}, "
        f"torch threads {torch.get_num_threads()}, busy processes {args.busy}"
    )
    print(
        f"quantize(): best of {args.repeats} {best:.3f} s = {best / args.layers:.3f} s per block "
        f"(runs: {', '.join(f'{t:.3f}' for t in times)})"
    )
    print(f"\nphases of one instrumented run ({total:.3f} s, wrappers included):")
    print("| phase | calls | s | s per block | share |\n|---|---|---|---|---|")
    rows = sorted(phases.seconds.items(), key=lambda kv: -kv[1])
    other = total - sum(phases.seconds.values())
    for name, sec in [*rows, ("other (hooks, set-up, glue)", other)]:
        calls = phases.calls.get(name, "")
        print(f"| {name} | {calls} | {sec:.4f} | {sec / args.layers:.4f} | {100 * sec / total:.0f}% |")
    if profile_text:
        print("\n" + profile_text)
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "times": times,
                    "best_per_block": best / args.layers,
                    "phases": dict(phases.seconds),
                    "calls": dict(phases.calls),
                    "instrumented_total": total,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
