"""The ``desloc`` command line. ``desloc --help`` lists the subcommands.

One module per subcommand (train, compare, sample, toy, wallclock and plan, methods, ft-lighthouse),
each with ``add(sub)``; what they share is in :mod:`desloc.cli.flags`, and how a command ends (exit
code and message) in :mod:`desloc.cli.errors`."""

from __future__ import annotations

import argparse
import os
import sys

from desloc.cli import compare, ft_lighthouse, methods, sample, toy, train, wallclock
from desloc.cli.errors import collective_failure_message, exit_code_for
from desloc.cli.flags import _INT_TYPES, _REAL_TYPES, _TRAIN_FLAGS, _Parser, _train_config, check_numbers
from desloc.cli.train import _cmd_train, _ft_config

__all__ = ["main", "build_parser", "collective_failure_message", "exit_code_for", "check_numbers", "_train_config",
           "_ft_config", "_cmd_train", "_REAL_TYPES", "_INT_TYPES", "_TRAIN_FLAGS"]

# in `desloc --help` order
_SUBCOMMANDS = (train, compare, sample, toy, wallclock, methods, ft_lighthouse)


def version() -> str:
    """The installed distribution's version (importlib.metadata), else ``desloc.__version__`` (a
    source tree on sys.path that was never installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("desloc")
    except PackageNotFoundError:
        from desloc import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="desloc", description="Low-communication distributed training.")
    parser.add_argument("--version", action="version", version=f"desloc {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _SUBCOMMANDS:
        module.add(sub)
    parser.set_defaults(parser=parser)  # check_numbers reads the chosen subcommand's flags from it
    return parser


def _route_warnings() -> None:
    """Print desloc's own warnings (DeslocWarning) as one line: ``desloc: warning: ...``."""
    import warnings

    from desloc.errors import DeslocWarning

    shown = warnings.showwarning
    if getattr(shown, "_desloc", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeslocWarning):
            print(f"desloc: warning: {message}", file=sys.stderr if file is None else file, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show._desloc = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _route_warnings()
    try:
        if args.command not in ("train", "compare"):  # those check after their configurations (better messages)
            check_numbers(args)
        return int(args.func(args) or 0)
    except Exception as err:
        outcome = exit_code_for(err, getattr(args, "timeout", None))
        if outcome is None:
            raise
        code, message = outcome
        if isinstance(err, BrokenPipeError):  # stdout's reader is gone: no error at exit flushing it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if message is not None:
            print(message, file=sys.stderr)
        return code
