"""`hf-ptq` command line (also `optimum-cli ptq`): quantize, eval, compare, export, push.

Each subcommand is a module with `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> exit status`;
`COMMANDS` lists them in help order. Configuration errors print one line and exit with status 2; Ctrl-C exits
with 130 and leaves no partial output folder (outputs are written to a staging folder and renamed).
"""

from __future__ import annotations

import argparse
import sys

from . import compare, evaluate, export, push, quantize

# Subcommand modules in help order.
COMMANDS = [quantize, evaluate, compare, export, push]


def build_parser(prog: str = "hf-ptq") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Post-training quantization for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        doc = (command.__doc__ or "").strip()
        p = sub.add_parser(
            command.NAME, help=command.HELP, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None, prog: str = "hf-ptq") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileExistsError, ImportError) as err:  # bad input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: no partial output folder was left behind", file=sys.stderr)
        return 130
