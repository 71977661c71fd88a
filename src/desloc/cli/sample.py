"""``desloc sample``: text from a trained run's checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a trained run's checkpoint")
    p.add_argument("run", type=Path, help="a run directory written by desloc train")
    p.add_argument("--prompt", default="And it came to pass")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--worker", type=int, default=0, help="whose model (workers differ between syncs)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args: argparse.Namespace) -> int:
    from desloc.sample import sample

    print(sample(args.run, args.prompt, args.tokens, args.temperature, args.top_k, args.worker, args.seed))
    return 0
