"""``desloc toy``: DES-LOC Figure 1, noisy Rosenbrock with M simulated workers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from desloc.algorithms import parse_method_spec
from desloc.cli.flags import _default_out, _float_list, _period, _refuse_unused


def add(sub: argparse._SubParsersAction) -> None:
    from desloc.toy import DEFAULT_METHODS, ToyConfig

    d = ToyConfig()
    p = sub.add_parser("toy", help="DES-LOC Figure 1: noisy Rosenbrock with M simulated workers",
                       description="Noisy Rosenbrock (DES-LOC Fig. 1) in the simulator: every method, "
                       "a table, a plot and a JSON record.")
    p.add_argument("--workers", "-M", type=int, default=d.workers, help="number of workers M")
    p.add_argument("--sigma", type=float, default=d.sigma, help="gradient noise std")
    p.add_argument("--heterogeneity", type=float, default=d.heterogeneity,
                   help="H >= 0: worker m minimises f + <H d_m, x>, d_m unit directions summing to zero, so "
                   "the mean objective (and its optimum (1, 1)) is unchanged; 0 = i.i.d. workers (default)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--beta1", type=float, default=argparse.SUPPRESS, help=f"Adam's beta1 (default {d.beta1})")
    p.add_argument("--beta2", type=float, default=d.beta2)
    p.add_argument("--kx", type=_period, default=d.period_x, help="K_x (also local-adam's K)")
    p.add_argument("--ku", type=_period, default=argparse.SUPPRESS, help=f"K_u for desloc (default {d.period_u})")
    p.add_argument("--kv", type=_period, default=argparse.SUPPRESS, help=f"K_v for desloc (default {d.period_v})")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods; also diloco, gasloc[@topology], mtdao, desloc+nesterov")
    p.add_argument("--mt-betas", type=_float_list, default=argparse.SUPPRESS,
                   help=f"mtdao momentum decays (default {','.join(map(str, d.mt_betas))})")
    p.add_argument("--mt-omegas", type=_float_list, default=argparse.SUPPRESS,
                   help=f"mtdao mixing weights (default {','.join(map(str, d.mt_omegas))})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/toy-<time>)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.set_defaults(func=_cmd_toy)


def _cmd_toy(args: argparse.Namespace) -> int:
    from desloc.records import dumps
    from desloc.toy import ToyConfig, format_table, run_toy

    d = ToyConfig()
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    names = {parse_method_spec(m)["name"] for m in methods}
    unused = {}
    if "mtdao" not in names:
        unused.update({f: "no mtdao in --methods" for f in ("--mt-betas", "--mt-omegas") if hasattr(args, f[2:].replace("-", "_"))})
    if "desloc" not in names:
        unused.update({f: "only desloc takes K_u and K_v" for f in ("--ku", "--kv") if hasattr(args, f[2:])})
    if names <= {"mtdao"} and hasattr(args, "beta1"):
        unused["--beta1"] = "mtdao's momenta are --mt-betas"
    _refuse_unused(unused, f"by every method in --methods ({', '.join(methods)})")
    cfg = ToyConfig(workers=args.workers, sigma=args.sigma, heterogeneity=args.heterogeneity, steps=args.steps,
                    lr=args.lr, beta1=getattr(args, "beta1", d.beta1), beta2=args.beta2, period_x=args.kx,
                    period_u=getattr(args, "ku", d.period_u), period_v=getattr(args, "kv", d.period_v),
                    seed=args.seed, mt_betas=tuple(getattr(args, "mt_betas", d.mt_betas)),
                    mt_omegas=tuple(getattr(args, "mt_omegas", d.mt_omegas)), methods=methods)
    out = args.out or _default_out("toy")
    record = run_toy(cfg, out, progress=sys.stderr.isatty())
    if args.json:
        slim: dict[str, Any] = {
            "config": record["config"],
            "methods": {n: {k: v for k, v in r.items() if k != "distance"} for n, r in record["methods"].items()},
            "run_dir": str(out),
        }
        print(dumps(slim, indent=2))
    else:
        print(format_table(record))
        print(f"\nrecords and plot: {out}/ (toy.json, toy.png, config.json)")
    return 0
