"""``desloc methods``: the registered methods, one line each."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the registered methods")
    p.set_defaults(func=_cmd_methods)


def _cmd_methods(args: argparse.Namespace) -> int:
    from desloc.algorithms import METHODS

    for name, preset in METHODS.items():
        print(f"{name:14s} {preset.summary}")
    return 0
