"""The ``desloc`` command line. ``desloc --help`` lists the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from desloc.errors import CheckpointMismatchError, ConfigError


def _default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _period(text: str) -> int | None:
    if text.lower() in ("none", "never", "inf"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a sync period must be an integer >= 1 or 'none', got {text!r}"
        ) from None


def _add_toy(sub: argparse._SubParsersAction) -> None:
    from desloc.toy import DEFAULT_METHODS, ToyConfig

    d = ToyConfig()
    p = sub.add_parser("toy", help="DES-LOC Figure 1: noisy Rosenbrock with M simulated workers",
                       description="Noisy Rosenbrock (DES-LOC Fig. 1) in the simulator: every method, "
                       "a table, a plot and a JSON record.")
    p.add_argument("--workers", "-M", type=int, default=d.workers, help="number of workers M")
    p.add_argument("--sigma", type=float, default=d.sigma, help="gradient noise std")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--beta1", type=float, default=d.beta1)
    p.add_argument("--beta2", type=float, default=d.beta2)
    p.add_argument("--kx", type=_period, default=d.period_x, help="K_x (also local-adam's K)")
    p.add_argument("--ku", type=_period, default=d.period_u, help="K_u for desloc")
    p.add_argument("--kv", type=_period, default=d.period_v, help="K_v for desloc")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/toy-<time>)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.set_defaults(func=_cmd_toy)


def _cmd_toy(args: argparse.Namespace) -> int:
    from desloc.toy import ToyConfig, format_table, run_toy

    cfg = ToyConfig(workers=args.workers, sigma=args.sigma, steps=args.steps, lr=args.lr,
                    beta1=args.beta1, beta2=args.beta2, period_x=args.kx, period_u=args.ku,
                    period_v=args.kv, seed=args.seed,
                    methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    out = args.out or _default_out("toy")
    record = run_toy(cfg, out, progress=sys.stderr.isatty())
    if args.json:
        slim: dict[str, Any] = {
            "config": record["config"],
            "methods": {n: {k: v for k, v in r.items() if k != "distance"} for n, r in record["methods"].items()},
            "run_dir": str(out),
        }
        print(json.dumps(slim, indent=2))
    else:
        print(format_table(record))
        print(f"\nrecords and plot: {out}/ (toy.json, toy.png, config.json)")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from desloc.algorithms import METHODS

    for name, (_, summary) in METHODS.items():
        print(f"{name:14s} {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="desloc", description="Low-communication distributed training.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_toy(sub)
    p = sub.add_parser("methods", help="list the registered methods")
    p.set_defaults(func=_cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointMismatchError) as err:
        print(f"desloc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
