"""Per-layer timings of W8A8Linear's two paths against bf16 `F.linear`, by number of rows (tokens x batch).

    .venv/bin/python benchmarks/w8a8_kernels.py                   # SmolLM2-135M's layer shapes, 1..512 rows
    .venv/bin/python benchmarks/w8a8_kernels.py --rows 1 8 16 32 --shapes 1536x576

For each shape (out x in) and row count it times, best of `--rounds` rounds of `--calls` calls each:
- bf16: `F.linear` of bf16 activations and a bf16 weight (what the unquantized model runs);
- weight-only: `torch.ops.aten._weight_int8pack_mm`, int8 weight x bf16 activations (W8A8Linear's few-row path);
- w8a8: per-token int8 quantization of the activations + `torch._int_mm` + rescale to bf16 (W8A8Linear's many-row
  path), with the quantization and rescale as C loops (hf_ptq/kernels/w8a8_cpu.c);
- w8a8 torch ops: the same computation with them as torch ops (`HF_PTQ_NATIVE_KERNELS=0`, the fallback);
- w8a8 static: the C path with a fixed per-tensor activation scale.
W8A8Linear sends calls of up to `hf_ptq.kernels.w8a8.weight_only_max_rows(x)` rows to the weight-only path; the
crossover printed at the end is where the w8a8 path becomes faster, summed over the shapes of one decoder block
(q, k, v, o, gate, up, down). Rounds during which other processes used more than 0.25 cores are repeated.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_ptq.core.quant import W8A8Weight, quantize  # noqa: E402
from hf_ptq.evaluation import CpuMonitor, wait_for_idle_cpu  # noqa: E402
from hf_ptq.kernels import int8_matmul  # noqa: E402
from hf_ptq.nn import W8A8Linear  # noqa: E402

# SmolLM2-135M: q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536 (out x in), counted per block
BLOCK = {"576x576": 2, "192x576": 2, "1536x576": 2, "576x1536": 1}
PATHS = ("bf16", "weight-only", "w8a8", "w8a8 torch ops", "w8a8 static")


def layer(out_f: int, in_f: int, static: bool) -> W8A8Linear:
    w = torch.randn(out_f, in_f) * 0.02
    m = W8A8Linear(in_f, out_f, False, static, dtype=torch.bfloat16)
    m.set_quantized(W8A8Weight(quantize(w.bfloat16(), 8, -1, True), torch.tensor([0.05]) if static else None))
    return m


def best_us(fn, calls: int, rounds: int) -> tuple[float, float]:
    """(best microseconds per call over rounds, most cores other processes used in a kept round)."""
    fn()
    best, worst_load, kept, tries = float("inf"), 0.0, 0, 0
    while kept < rounds and tries < 3 * rounds:
        tries += 1
        monitor = CpuMonitor().start()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        seconds = (time.perf_counter() - start) / calls
        load = monitor.stop() or 0.0
        if load > 0.25 and tries < 3 * rounds:
            continue
        kept += 1
        best, worst_load = min(best, seconds), max(worst_load, load)
    return best * 1e6, worst_load


@torch.inference_mode()
def measure(shape: str, rows: int, calls: int, rounds: int) -> dict[str, tuple[float, float]]:
    out_f, in_f = map(int, shape.split("x"))
    dynamic, static = layer(out_f, in_f, False), layer(out_f, in_f, True)
    x = torch.randn(rows, in_f).bfloat16()
    w_bf16 = dynamic.dequantized_weight(torch.bfloat16)
    scale_bf16 = dynamic.weight_scale.reshape(-1).contiguous()
    return {
        "bf16": best_us(lambda: F.linear(x, w_bf16), calls, rounds),
        "weight-only": best_us(lambda: int8_matmul(x, dynamic.weight, scale_bf16), calls, rounds),
        "w8a8": best_us(lambda: dynamic._w8a8(x, torch.bfloat16), calls, rounds),
        "w8a8 torch ops": best_us(lambda: _without_c_kernels(dynamic._w8a8, x), calls, rounds),
        "w8a8 static": best_us(lambda: static._w8a8(x, torch.bfloat16), calls, rounds),
    }


def _without_c_kernels(w8a8_call, x: torch.Tensor) -> torch.Tensor:
    os.environ["HF_PTQ_NATIVE_KERNELS"] = "0"
    try:
        return w8a8_call(x, torch.bfloat16)
    finally:
        del os.environ["HF_PTQ_NATIVE_KERNELS"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(BLOCK), help="out x in, e.g. 1536x576")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 512])
    p.add_argument("--calls", type=int, default=20, help="calls per timing round")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (best kept)")
    p.add_argument("--wait-idle", type=float, default=10.0, help="seconds to wait for other processes to go quiet")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.wait_idle > 0:
        wait_for_idle_cpu(args.wait_idle)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print("| shape | rows | " + " | ".join(f"{p} us" for p in PATHS) + " | w8a8 / bf16 speed | others' CPU |")
    print("|---" * (len(PATHS) + 4) + "|")
    block: dict[int, dict[str, float]] = {}
    for rows in args.rows:
        for shape in args.shapes:
            times = measure(shape, rows, args.calls, args.rounds)
            load = max(t[1] for t in times.values())
            cells = " | ".join(f"{times[p][0]:.1f}" for p in PATHS)
            speed = times["bf16"][0] / times["w8a8"][0]
            print(f"| {shape} | {rows} | {cells} | {speed:.2f}x | {load:.2f} |", flush=True)
            per_block = block.setdefault(rows, dict.fromkeys(PATHS, 0.0))
            for path in PATHS:
                per_block[path] += BLOCK.get(shape, 1) * times[path][0]
    print("\nPer decoder block (us, shapes weighted by their count in a block):\n")
    print("| rows | " + " | ".join(PATHS) + " | faster of weight-only / w8a8 |")
    print("|---" * (len(PATHS) + 2) + "|")
    for rows, t in block.items():
        faster = "weight-only" if t["weight-only"] <= t["w8a8"] else "w8a8"
        print(f"| {rows} | " + " | ".join(f"{t[p]:.0f}" for p in PATHS) + f" | {faster} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
