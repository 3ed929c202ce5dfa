"""Prefill speed of act-order (GPTQ `desc_act`, dynamic groups: `weight_g_idx`) QuantLinear layers on real shapes.

For each weight shape [out, in] (Llama-3.2-1B's q_proj 2048x2048, gate/up 8192x2048, down 2048x8192): a random bf16
weight, input channels shuffled by a random permutation as GPTQ's act-order does, quantized to 4 bits in groups of
`--group-size` along that order (RTN), as a `QuantLinear` with `weight_g_idx`; beside it the same integers and
scales with the channels in group order and no `g_idx` (what `static_groups` or `desc_act=False` would store), and
the bf16 `nn.Linear` of the weight. Each forward of `--rows` rows (512: a prefill) is timed best of `--repeats`,
the variants interleaved. "act-order (old)" is the act-order dense path before this change: the general
`dequantized_weight` (full unpack, scales gathered by `g_idx`) and `F.linear`, on every call; "natural order (torch
ops)" the natural-order dense path with the torch ops instead of the C pass (`HF_PTQ_NATIVE_KERNELS=0`), as before.

With `--model`, the same for a whole model: SmolLM2-135M-Instruct (`hf_ptq.default_model.smollm2_checkpoint()`,
offline) in bf16, and copies of it whose decoder Linears are replaced by act-order layers as above, or quantized in
their natural channel order (the same model without act-order), timed on one `--rows`-token forward (KV cache on, as
`generate`'s prefill), best of `--repeats`, interleaved; "act-order (old)" patches the dense path of act-order
layers back to the general `dequantized_weight`.

    .venv/bin/python benchmarks/act_order_prefill.py
    .venv/bin/python benchmarks/act_order_prefill.py --rows 512 --repeats 5 --shapes 2048x2048,8192x2048
    .venv/bin/python benchmarks/act_order_prefill.py --model --group-size 64
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hf_ptq import kernels  # noqa: E402
from hf_ptq.core.quant import QuantizedWeight, quantize  # noqa: E402
from hf_ptq.nn import QuantLinear  # noqa: E402


def layers(out_f: int, in_f: int, group_size: int, seed: int = 0, weight: torch.Tensor | None = None):
    """(bf16 nn.Linear, act-order QuantLinear, natural-order QuantLinear, the act-order permutation) of `weight`
    (default: random [out_f, in_f])."""
    gen = torch.Generator().manual_seed(seed)
    if weight is None:
        weight = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(torch.bfloat16)
    out_f, in_f = weight.shape
    perm = torch.randperm(in_f, generator=gen)
    grouped = quantize(weight[:, perm], 4, group_size, sym=False)  # groups along the act-order
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_f) // group_size).to(torch.int32)
    q = torch.empty_like(grouped.q)
    q[:, perm] = grouped.q
    act = QuantLinear(in_f, out_f, False, 4, group_size, False, act_order=True)
    act.set_quantized(QuantizedWeight(q, grouped.scale, grouped.zero_point, 4, group_size, g_idx))
    natural = QuantLinear(in_f, out_f, False, 4, group_size, False)
    natural.set_quantized(grouped)
    linear = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
    linear.weight.data.copy_(weight)
    return linear, act, natural, perm


def old_dense_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The act-order dense path before the reordered layout: general dequantize + F.linear on every call."""
    _, dense_dtype = kernels.compute_dtypes(layer.compute_dtype, x)
    return kernels.dense_matmul(x.to(dense_dtype), layer.dequantized_weight(dense_dtype), None).to(x.dtype)


@contextlib.contextmanager
def old_act_order_path():
    """Within: act-order layers build their dense weight with the general `dequantized_weight` (the old path)."""
    new = QuantLinear._build_dense_weight

    def old(self, dtype):
        return self.dequantized_weight(dtype) if self.weight_g_idx is not None else new(self, dtype)

    QuantLinear._build_dense_weight = old
    try:
        yield
    finally:
        QuantLinear._build_dense_weight = new


@contextlib.contextmanager
def torch_ops():
    """Within: the dense path runs torch ops instead of the C kernels (HF_PTQ_NATIVE_KERNELS=0)."""
    before = os.environ.get("HF_PTQ_NATIVE_KERNELS")
    os.environ["HF_PTQ_NATIVE_KERNELS"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_PTQ_NATIVE_KERNELS"]
        else:
            os.environ["HF_PTQ_NATIVE_KERNELS"] = before


def with_torch_ops(fn):
    def run():
        with torch_ops():
            return fn()

    return run


def quantized_models(model: nn.Module, group_size: int) -> tuple[nn.Module, nn.Module]:
    """Copies of `model` whose decoder Linears are act-order QuantLinears (`layers`) / natural-order ones (the
    same weights quantized in their own channel order: the same model without act-order)."""
    act_model, natural_model = copy.deepcopy(model), copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    for i, name in enumerate(names):
        weight = model.get_submodule(name).weight.data
        _, act, _, _ = layers(0, 0, group_size, seed=i, weight=weight)
        act_model.set_submodule(name, act)
        natural = QuantLinear(weight.shape[1], weight.shape[0], False, 4, group_size, False)
        natural.set_quantized(quantize(weight, 4, group_size, sym=False))
        natural_model.set_submodule(name, natural)
    return act_model, natural_model


def model_table(args) -> None:
    from transformers import AutoModelForCausalLM

    from hf_ptq.default_model import smollm2_checkpoint

    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.bfloat16).eval()
    act_model, natural_model = quantized_models(model, args.group_size)
    ids = torch.randint(3, model.config.vocab_size, (1, args.rows), generator=torch.Generator().manual_seed(1))

    def prefill(m):
        return lambda: m(input_ids=ids, use_cache=True)

    def old_prefill():
        with old_act_order_path():
            act_model(input_ids=ids, use_cache=True)

    with torch.no_grad():
        fns = {"bf16": prefill(model), "natural order": prefill(natural_model), "act-order": prefill(act_model)}
        if not args.no_old:
            fns["natural order (torch ops)"] = with_torch_ops(prefill(natural_model))
            fns["act-order (old)"] = old_prefill
        best = best_of(fns, args.repeats)
    print(
        f"SmolLM2-135M-Instruct, {args.rows}-token prefill, decoder Linears 4-bit asymmetric g{args.group_size}, "
        f"torch threads {torch.get_num_threads()}; best of {args.repeats}, ms and tokens/s"
    )
    print("| model | ms | tok/s | x bf16 |\n|---|---|---|---|")
    for name, sec in best.items():
        print(f"| {name} | {1e3 * sec:.1f} | {args.rows / sec:.0f} | {best['bf16'] / sec:.2f} |")


def best_of(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Best wall time (s) of each function, calls interleaved; one warm-up call each first."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2048x2048,8192x2048,2048x8192", help="out x in, comma-separated")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-old", action="store_true", help="skip the old act-order path")
    parser.add_argument("--model", action="store_true", help="time SmolLM2-135M prefills instead of single layers")
    args = parser.parse_args()
    if args.model:
        model_table(args)
        return

    print(
        f"{args.rows} rows, 4-bit asymmetric g{args.group_size}, torch threads {torch.get_num_threads()}, "
        f"native bf16: {kernels.cpu_has_fast_bf16()}; best of {args.repeats}, ms"
    )
    columns = ["bf16 nn.Linear", "natural order", "act-order"]
    columns += [] if args.no_old else ["natural order (torch ops)", "act-order (old)"]
    print("| shape (out x in) | " + " | ".join(columns) + " | act-order speed vs bf16 | vs natural order |")
    print("|---" * (len(columns) + 3) + "|")
    with torch.no_grad():
        for shape in args.shapes.split(","):
            out_f, in_f = (int(v) for v in shape.split("x"))
            best = time_layer(out_f, in_f, args)
            cells = " | ".join(f"{1e3 * best[c]:.2f}" for c in columns)
            ratio_bf16 = best["bf16 nn.Linear"] / best["act-order"]
            ratio_nat = best["natural order"] / best["act-order"]
            print(f"| {out_f}x{in_f} | {cells} | {ratio_bf16:.2f}x | {ratio_nat:.2f}x |")


def time_layer(out_f: int, in_f: int, args) -> dict[str, float]:
    """Best seconds of each variant's forward of `args.rows` rows for one [out_f, in_f] weight."""
    linear, act, natural, perm = layers(out_f, in_f, args.group_size)
    x = torch.randn(args.rows, in_f, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x_perm = x[:, perm].contiguous()
    fns = {
        "bf16 nn.Linear": lambda: linear(x),
        "natural order": lambda: natural(x_perm),
        "act-order": lambda: act(x),
    }
    if not args.no_old:
        fns["natural order (torch ops)"] = with_torch_ops(lambda: natural(x_perm))
        fns["act-order (old)"] = lambda: old_dense_forward(act, x)
    return best_of(fns, args.repeats)


if __name__ == "__main__":
    main()
