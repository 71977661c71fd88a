"""``desloc compare``: several methods (and seeds) at equal tokens, each run's config the shared
train flags projected through its method's spec."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from desloc.algorithms import parse_method_spec
from desloc.cli.flags import (_add_train_flags, _check_timeout, _default_out, _flag, _mtdao_inner, _refuse_unused,
                              _train_config, _unused_flags, check_numbers)
from desloc.errors import ConfigError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="several methods (and seeds) at equal tokens: table, JSON, plot",
                       description="Run each method on the same data, model and token budget; "
                       "write compare.json, compare.md and compare.png (DES-LOC Fig. 4 analogue).")
    _add_train_flags(p)
    p.add_argument("--methods", default="ddp,local-adam,desloc,keep-states,reset-states")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--out", type=Path, default=None, help="directory (default runs/compare-<time>)")
    p.add_argument("--overwrite", action="store_true",
                   help="rerun runs already in --out (by default finished runs with identical settings are "
                   "reused, and runs with other settings are refused)")
    p.set_defaults(func=_cmd_compare)


def _methods_and_seeds(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """--methods and --seeds as lists, each entry valid and named once; --method / --seed refused."""
    from desloc.algorithms import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if parse_method_spec(m)["name"] not in METHODS]
    if bad:
        raise ConfigError(f"unknown method(s) {bad}; choose from {sorted(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if hasattr(args, "method"):
        raise ConfigError("compare takes --methods (plural), not --method")
    if hasattr(args, "seed"):
        raise ConfigError(f"--seed {args.seed} would be ignored by compare, which runs every method once per seed "
                          f"in --seeds; use --seeds {args.seed} (or e.g. --seeds 0,1,2)")
    for flag, given, items, example in (("--methods", args.methods, methods, "ddp,desloc"),
                                        ("--seeds", args.seeds, seeds, "0,1,2")):
        if not items:
            raise ConfigError(f"{flag} lists nothing, got {given!r}; give a comma-separated list, e.g. {flag} {example}")
        dup = sorted({str(x) for x in items if items.count(x) > 1})
        if dup:
            raise ConfigError(f"{flag} names {', '.join(dup)} more than once ({given!r}); the same run would count "
                              f"twice in the mean and std; name each once")
    return methods, seeds


def _warn_file_ignores(args: argparse.Namespace) -> None:
    """--config FILE: the keys compare sets itself are ignored, with a warning rather than refused, so a
    run's config.json (which has them all) is a valid compare config: method.name (compare runs
    --methods), seed (--seeds) and ft (compare runs in one process). The other method fields apply to
    every method, each projected through its spec, as the flags are."""
    from desloc.cli.configfile import drop

    ignored = {"method.name": "compare runs each of --methods",
               "seed": "compare runs every method once per seed in --seeds",
               "ft": "compare runs its workers in one process, not as torchft replica groups"}
    found = {k: ignored[k] for k in drop(args, list(ignored))}
    if found:
        import warnings

        from desloc.errors import DeslocWarning

        warnings.warn(f"compare ignores {', '.join(found)} from {args.config}: "
                      + "; ".join(f"{k}: {why}" for k, why in found.items()), DeslocWarning)


def _cmd_compare(args: argparse.Namespace) -> int:
    from desloc.algorithms import METHODS
    from desloc.compare import markdown_table, run_compare

    methods, seeds = _methods_and_seeds(args)
    _check_timeout(args)
    _warn_file_ignores(args)

    def config_for(method: str, seed: int):
        """One run's config: the shared flags (and --config FILE) projected through the method's spec."""
        from desloc.train import TrainConfig

        d = _train_config(args, build=False, seed=seed)
        named = parse_method_spec(method)  # name, and +outer / @topology
        spec = METHODS[named["name"]]
        if spec.inner == "mtdao":  # the MT-DAO inner optimizer of the same flavour as the others' (ADOPT or Adam)
            d["inner"]["name"] = _mtdao_inner(d["inner"]["name"], explicit=True)
        d["method"] = {**spec.project({**d["method"], **named}, d["inner"]["name"]), **named}
        return TrainConfig.from_dict(d)

    configs = {m: config_for(m, seeds[0]) for m in methods}  # validate every run before the first starts
    unused = [_unused_flags(args, c, in_compare=True) for c in configs.values()]
    unused_by_all = {f: why for f, why in unused[0].items() if all(f in u for u in unused)}
    where = f"by every method in --methods ({', '.join(methods)})"
    if unused_by_all.keys() == {_flag("kx")}:  # shared flag lists pass K_x to all-ddp comparisons too
        import warnings

        from desloc.errors import DeslocWarning

        warnings.warn(f"{_flag('kx')} is ignored {where}: {unused_by_all[_flag('kx')]}", DeslocWarning)
        unused_by_all = {}
    _refuse_unused(unused_by_all, where)
    check_numbers(args)
    from desloc.train import check_resources

    for cfg in configs.values():
        check_resources(cfg)
    out = args.out or _default_out("compare")
    record = run_compare(config_for, methods, seeds, out, overwrite=args.overwrite, timeout_s=args.timeout)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(markdown_table(record["methods"], "local-adam" if "local-adam" in record["methods"] else None))
        print(f"\nrecords: {out}/ (compare.json, compare.md, compare.png, one directory per run)", file=sys.stderr)
    return 0
