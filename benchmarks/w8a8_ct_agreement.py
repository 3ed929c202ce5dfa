"""How close hf_ptq's W8A8 (SmoothQuant) model is to its compressed-tensors export read by plain transformers.

    .venv/bin/python benchmarks/w8a8_ct_agreement.py                    # 16 x 256 calibration, 8 x 512 perplexity
    .venv/bin/python benchmarks/w8a8_ct_agreement.py --ppl-windows 0     # logits only

SmolLM2-135M-Instruct, everything in float32 (`dtype=torch.float32`, so only the int8 parts are not fp32), one
fixed input (the first 2 x 256 tokens of wikitext-2 test.txt; prefill only, so hf_ptq's weight-only decode path
for calls of <= 4 rows never runs). Logits:
    A    hf_ptq's W8A8 model (SmoothQuantConfig defaults: alpha 0.5, dynamic per-token activations, rtn weights):
         activations quantized with absmax / 127 to [-127, 127], int8 x int8 `torch._int_mm`
    B    its compressed-tensors export (`hf_ptq.export(..., format="compressed-tensors")`) loaded by plain
         transformers + compressed-tensors in a subprocess that never imports hf_ptq
    B0   the same loaded model with compressed-tensors' QDQ switched off (`quantization_enabled = False`): dense
         dequantized weights, float activations
    a/b/c  emulations in the hf_ptq process (every W8A8Linear.forward replaced by a float function of its
         `weight`, `weight_scale`, `bias`): (a) dense dequantized weights, float activations; (b) per-token QDQ,
         absmax / 127, [-127, 127] (hf_ptq's rule); (c) per-token QDQ, absmax / 127.5, [-128, 127]
         (compressed-tensors' rule); b64 / c64: b / c with float64 matmuls (same rule, other float rounding: the
         noise floor, since one flipped rounding early on re-draws the quantization noise of every later layer)
    F    the float32 model, unquantized (how far quantization moves the logits at all)
Each row: relative Frobenius distance of its logits to A, B and F, top-1 agreement with A and B, mean KL from F,
and perplexity on the first `--ppl-windows` windows of 512 tokens of test.txt (not for the float64 rows).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def perplexity(model, windows) -> float:
    """exp(mean next-token NLL) over windows [count, len] (one forward per window, no KV cache)."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            logits = model(window[None], use_cache=False).logits.float()
            nll += F.cross_entropy(logits[0, :-1], window[1:], reduction="sum").item()
            count += window.numel() - 1
    return float(torch.tensor(nll / count).exp()) if count else float("nan")


def logits_of(model, ids):
    import torch

    with torch.inference_mode():
        return model(ids, use_cache=False).logits.float()


# --- compressed-tensors side: a fresh process without hf_ptq -------------------------------------------------
def ct_worker(folder: str, inputs: str, out: str, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    data = torch.load(inputs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    quantized = [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None]
    status = {
        str(getattr(m, "quantization_status", None)) for m in model.modules() if hasattr(m, "quantization_scheme")
    }
    result = {
        "B": logits_of(model, data["ids"]),
        "ppl_B": perplexity(model, data["windows"]),
        "quantized_modules": len(quantized),
        "status": sorted(status),
        "weight_dtypes": sorted({str(model.get_submodule(n).weight.dtype) for n in quantized}),
        "lm_head_quantized": "lm_head" in quantized,
    }
    for name in quantized:
        model.get_submodule(name).quantization_enabled = False
    result["B0"] = logits_of(model, data["ids"])
    result["ppl_B0"] = perplexity(model, data["windows"])
    result["hf_ptq_imported"] = any(m == "hf_ptq" or m.startswith("hf_ptq.") for m in sys.modules)
    torch.save(result, out)


# --- hf_ptq side -------------------------------------------------------------------------------------------------
def _dense(self):
    import torch

    cached = getattr(self, "_emulation_weight", None)
    if cached is None:
        cached = self._emulation_weight = self.weight.to(torch.float32) * self.weight_scale.to(torch.float32)
    return cached


def _qdq_per_token(x, divisor: float, qmin: int, qmax: int):
    """Per-token fake quantization: scale = absmax / divisor, q = clamp(round_half_even(x / scale), qmin, qmax)."""
    import torch

    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / divisor
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    return torch.clamp(torch.round(xf / scale), qmin, qmax) * scale


def _emulated_forward(rule, float64: bool = False):
    import torch
    import torch.nn.functional as F

    dtype = torch.float64 if float64 else torch.float32

    def forward(self, x):
        xq = x.float() if rule is None else _qdq_per_token(x, *rule)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(xq.to(dtype), _dense(self).to(dtype), bias).to(x.dtype)

    return forward


HF_RULE, CT_RULE = (127.0, -127, 127), (127.5, -128, 127)
# name: (activation rule or None, matmul in float64, perplexity too). The float64 rows compute the same rule with
# other floating-point rounding: their distance to the fp32 row is the noise floor of these logit distances.
EMULATIONS = {
    "a: dense float weights, float activations": (None, False, True),
    "b: QDQ absmax/127, [-127, 127] (hf_ptq rule)": (HF_RULE, False, True),
    "b64: as b, float64 matmul": (HF_RULE, True, False),
    "c: QDQ absmax/127.5, [-128, 127] (ct rule)": (CT_RULE, False, True),
    "c64: as c, float64 matmul": (CT_RULE, True, False),
}


@contextmanager
def patched_forward(forward):
    from hf_ptq.nn.w8a8_linear import W8A8Linear

    original = W8A8Linear.forward
    W8A8Linear.forward = forward
    try:
        yield
    finally:
        W8A8Linear.forward = original


def rel(x, ref) -> float:
    return float((x - ref).norm() / ref.norm())


def top1(x, ref) -> float:
    return float((x.argmax(-1) == ref.argmax(-1)).float().mean())


def kl(ref, x) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(x))."""
    import torch.nn.functional as F

    return float(F.kl_div(x.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="wikitext-2 folder (valid.txt, test.txt)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="rows of the fixed input")
    p.add_argument("--seq", type=int, default=256, help="tokens per row of the fixed input")
    p.add_argument("--ppl-windows", type=int, default=8, help="perplexity windows of 512 tokens (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of every load (emulations: fp32)"
    )
    p.add_argument("--ct-worker", nargs=3, metavar=("FOLDER", "INPUTS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ct_worker:  # before anything imports hf_ptq
        ct_worker(*args.ct_worker, args.dtype)
        return 0

    sys.path.insert(0, str(REPO))  # run from a checkout without installing
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    import hf_ptq
    from hf_ptq import evaluation as ev
    from hf_ptq.default_model import smollm2_checkpoint

    logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    ckpt = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)

    def tokens(name: str):
        return tokenizer(ev.read_text(args.data / name), return_tensors="pt").input_ids[0]

    calibration = ev.token_windows(tokens("valid.txt"), args.calib_len, args.calib_samples).clone()
    test_ids = tokens("test.txt")
    ids = ev.token_windows(test_ids, args.seq, args.batch).clone()
    windows = ev.token_windows(test_ids, 512, args.ppl_windows).clone() if args.ppl_windows else ids[:0, :512]

    logits, ppl = {}, {}
    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    logits["F"], ppl["F"] = logits_of(reference, ids), perplexity(reference, windows)
    del reference
    print(f"float model done ({time.perf_counter() - start:.0f} s)", flush=True)

    config = hf_ptq.SmoothQuantConfig(dataset=calibration, num_samples=args.calib_samples, seq_len=args.calib_len)
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=config, dtype=dtype).eval()
    print(f"W8A8 model quantized ({time.perf_counter() - start:.0f} s)", flush=True)
    logits["A"], ppl["A"] = logits_of(model, ids), perplexity(model, windows)
    for name, (rule, float64, with_ppl) in EMULATIONS.items():
        with patched_forward(_emulated_forward(rule, float64)):
            logits[name] = logits_of(model, ids)
            ppl[name] = perplexity(model, windows) if with_ppl else float("nan")
    print(f"hf_ptq rows done ({time.perf_counter() - start:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="w8a8-ct-") as tmp:
        folder = hf_ptq.export(model, Path(tmp) / "ct", format="compressed-tensors", tokenizer=tokenizer)
        del model
        torch.save({"ids": ids, "windows": windows}, Path(tmp) / "inputs.pt")
        command = [sys.executable, __file__, "--ct-worker", str(folder), f"{tmp}/inputs.pt", f"{tmp}/out.pt"]
        command += ["--dtype", args.dtype]
        if args.threads:
            command += ["--threads", str(args.threads)]
        subprocess.run(command, check=True)
        ct = torch.load(Path(tmp) / "out.pt")
    print(f"compressed-tensors rows done ({time.perf_counter() - start:.0f} s)", flush=True)
    if ct["hf_ptq_imported"]:
        raise RuntimeError("the compressed-tensors worker imported hf_ptq")
    for key in ("B", "B0"):
        logits[key], ppl[key] = ct[key], ct[f"ppl_{key}"]

    labels = {
        "A": "A: hf_ptq W8A8 (int8 x int8, /127)",
        "B": "B: compressed-tensors export, plain transformers",
        "B0": "B0: export, plain transformers, QDQ off",
        "F": "F: float32 model (unquantized)",
    }
    order = ["A", "B", *EMULATIONS, "B0", "F"]
    print(
        f"\nSmolLM2-135M-Instruct {args.dtype}, SmoothQuant W8A8 dynamic (alpha 0.5), calibration "
        f"{args.calib_samples} x {args.calib_len} of valid.txt; logits of test.txt's first {args.batch} x {args.seq} "
        f"tokens; perplexity over {args.ppl_windows} x 512 tokens of test.txt"
    )
    print(
        f"compressed-tensors side: {ct['quantized_modules']} quantized Linears, status {ct['status']}, weights "
        f"{ct['weight_dtypes']}, lm_head quantized: {ct['lm_head_quantized']}, hf_ptq imported: "
        f"{ct['hf_ptq_imported']}\n"
    )
    print(
        "| logits | rel. diff vs A | rel. diff vs B | rel. diff vs F | top-1 = A | top-1 = B | KL(F \\|\\| .) "
        "| perplexity |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key in order:
        x = logits[key]
        print(
            f"| {labels.get(key, key)} | {rel(x, logits['A']):.4f} | {rel(x, logits['B']):.4f} | "
            f"{rel(x, logits['F']):.4f} | {top1(x, logits['A']):.3f} | {top1(x, logits['B']):.3f} | "
            f"{kl(logits['F'], x):.5f} | {ppl[key]:.3f} |"
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
