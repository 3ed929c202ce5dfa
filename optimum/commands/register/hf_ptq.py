"""`optimum-cli ptq ...`: the `hf-ptq` commands inside optimum's CLI.

optimum-cli imports every module of the `optimum.commands.register` namespace package (PEP 420: no
`__init__.py`) and registers the commands in its `REGISTER_COMMANDS`. This module stays light (it is imported on
every `optimum-cli` call): hf_ptq, torch and transformers are imported only when a `ptq` command runs.
"""

from __future__ import annotations

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

PROG = "optimum-cli ptq"


def _print_hf_ptq_help(file=None) -> None:
    """`optimum-cli ptq --help` prints hf-ptq's own help (its commands), not a bare argument list."""
    from hf_ptq.cli import build_parser

    build_parser(PROG).print_help(file)


class PtqCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="ptq", help="post-training quantization with hf_ptq (the hf-ptq commands)")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.print_help = _print_hf_ptq_help  # what argparse's -h calls
        parser.add_argument("ptq_args", nargs=argparse.REMAINDER, help="an hf-ptq command and its arguments")

    def run(self) -> None:
        from hf_ptq.cli import main

        sys.exit(main(self.args.ptq_args, prog=PROG))


REGISTER_COMMANDS = [PtqCommand]
