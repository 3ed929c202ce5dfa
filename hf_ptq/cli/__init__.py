"""`hf-ptq` command line (also `optimum-cli ptq`): quantize, eval, compare, export, push, verify.

Each subcommand is a module with `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> exit status`;
`COMMANDS` lists them in help order. Errors a user can cause (bad values: ValueError and its subclasses, an
existing output folder, a missing package, a path that cannot be read or written: OSError) print one line and exit
with status 2; any other exception is a bug and keeps its traceback. Ctrl-C exits with 130 and leaves no partial
output folder (outputs are written to a staging folder and renamed).

The parsers are built from plain data and the command modules import torch, transformers and hf_ptq's heavy parts
only in `run`. `hf_ptq/__init__.py` calls `answer_early()` first thing, so in an `hf-ptq` process (or `python -m
hf_ptq.cli`, `optimum-cli ptq`) help and usage errors are answered before the package imports transformers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import compare, evaluate, export, push, quantize, verify

# Subcommand modules in help order.
COMMANDS = [quantize, evaluate, compare, export, push, verify]


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


def launched_as_cli() -> tuple[str, list[str]] | None:
    """(prog, arguments) when this process was started as `hf-ptq`, `python -m hf_ptq.cli` or `optimum-cli ptq`;
    None otherwise (hf_ptq imported as a library)."""
    argv = getattr(sys, "argv", None) or [""]
    name = Path(argv[0]).name.removesuffix(".exe")
    if name == "hf-ptq":
        return "hf-ptq", argv[1:]
    if name == "optimum-cli" and argv[1:2] == ["ptq"]:
        return "optimum-cli ptq", argv[2:]
    orig = getattr(sys, "orig_argv", [])
    if argv[0] == "-m" and "-m" in orig:  # `python [options] -m hf_ptq.cli ...` (argv[0] is "-m" while it imports)
        i = orig.index("-m")
        if orig[i + 1 : i + 2] == ["hf_ptq.cli"]:
            return "hf-ptq", orig[i + 2 :]
    return None


def answer_early() -> None:
    """In a CLI process, parse the command line now: `--help` and usage errors print and exit here, before
    torch and transformers are imported; a complete command line returns (and `main` parses it again)."""
    launched = launched_as_cli()
    if launched is not None:
        prog, arguments = launched
        build_parser(prog).parse_args(arguments)


def error_line(err: BaseException) -> str:
    """One line for a user error: an OSError of a path as `path: problem` (both paths of a rename), else the
    message with its line breaks folded."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        return f"{paths}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None, prog: str = "hf-ptq") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, ImportError, OSError) as err:  # bad input (FileExistsError is an OSError): one line
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: no partial output folder was left behind", file=sys.stderr)
        return 130
