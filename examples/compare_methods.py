"""Quantize one model several ways and compare them: report.md, comparison.png, results.json.

Run on the embedded SmolLM2-135M model (offline):  python examples/compare_methods.py --methods rtn,int8
Run on any model folder or Hub id:                 python examples/compare_methods.py MODEL --data eval.txt
"""

from __future__ import annotations

import argparse

import hf_ptq


def main(argv: list[str] | None = None) -> hf_ptq.Comparison:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model folder or Hub id (default: embedded SmolLM2-135M)")
    parser.add_argument("--methods", default="rtn,int8", help="comma-separated methods")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--data", help="evaluation text file (default: text the model writes itself)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--out", default="hf_ptq-comparison")
    args = parser.parse_args(argv)

    configs = []
    for method in args.methods.split(","):
        if method == "int8":  # always 8-bit per-channel: no group size
            configs.append(hf_ptq.PtqConfig(method="int8"))
        else:  # gptq without a dataset calibrates on text it samples from the model
            configs.append(hf_ptq.PtqConfig(method=method, bits=4, group_size=args.group_size))
    comparison = hf_ptq.compare(
        configs,
        args.model,
        out_dir=args.out,
        overwrite=True,
        data=args.data,
        max_length=args.max_length,
        max_windows=args.max_windows,
        speed=not args.no_speed,
    )
    print(comparison)
    best = min(comparison.results.values(), key=lambda r: r.perplexity or float("inf"))
    print(f"\nlowest perplexity: {best.model.name} ({best.perplexity:.3f}); report: {comparison.report_path}")
    return comparison


if __name__ == "__main__":
    main()
