"""The ``desloc`` command line. ``desloc --help`` lists the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from desloc.algorithms import parse_method_spec
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


def _int_list(text: str) -> list[int | None]:
    return [_period(t) for t in text.split(",") if t.strip()]


def _float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


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
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods; also diloco, gasloc[@topology], mtdao, desloc+nesterov")
    p.add_argument("--mt-betas", type=_float_list, default=d.mt_betas, help="mtdao momentum decays")
    p.add_argument("--mt-omegas", type=_float_list, default=d.mt_omegas, help="mtdao mixing weights")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/toy-<time>)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.set_defaults(func=_cmd_toy)


def _cmd_toy(args: argparse.Namespace) -> int:
    from desloc.toy import ToyConfig, format_table, run_toy

    cfg = ToyConfig(workers=args.workers, sigma=args.sigma, steps=args.steps, lr=args.lr,
                    beta1=args.beta1, beta2=args.beta2, period_x=args.kx, period_u=args.ku,
                    period_v=args.kv, seed=args.seed, mt_betas=tuple(args.mt_betas),
                    mt_omegas=tuple(args.mt_omegas),
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


# flag -> path in the TrainConfig dict; defaults are SUPPRESSed so we know what was passed
_TRAIN_FLAGS: list[tuple[tuple[str, ...], dict[str, Any], tuple[str, ...]]] = [
    (("--method",), dict(help="registered method (desloc methods)"), ("method", "name")),
    (("--kx", "--k"), dict(type=_period, help="K_x: parameter sync period (local-adam/keep/reset: K)"), ("method", "period_x")),
    (("--ku",), dict(type=_period, help="K_u for desloc (default 3*K_x; 'none' = never)"), ("method", "period_u")),
    (("--kv",), dict(type=_period, help="K_v for desloc (default 6*K_x; 'none' = never)"), ("method", "period_v")),
    (("--clip-rho",), dict(type=float, help="coordinate-wise gradient clip bound"), ("method", "clip_rho")),
    (("--outer",), dict(help="outer optimizer on the pseudo-gradient: nesterov | sgd (diloco: nesterov)"), ("method", "outer")),
    (("--outer-lr",), dict(type=float, help="outer learning rate (DiLoCo 0.7)"), ("method", "outer_lr")),
    (("--outer-momentum",), dict(type=float, help="outer momentum (DiLoCo 0.9)"), ("method", "outer_momentum")),
    (("--topology",), dict(help="gasloc gossip graph: one-peer | two-peer | ring | complete | none"), ("method", "topology")),
    (("--local-steps",), dict(type=_int_list, help="gasloc per-worker local steps H_i, e.g. 32,32,32,8"), ("method", "local_steps")),
    (("--gossip-seed",), dict(type=int, help="gasloc random-matching seed"), ("method", "gossip_seed")),
    (("--momentum-periods",), dict(type=_int_list, help="MT-DAO K_j per first momentum, e.g. 32,96"), ("method", "momentum_periods")),
    (("--inner",), dict(help="inner optimizer: adamw | sgdm | adopt | mtdao | mtdao-adam"), ("inner", "name")),
    (("--mt-betas",), dict(type=_float_list, help="MT-DAO momentum decays, e.g. 0.9,0.99"), ("inner", "mt_betas")),
    (("--mt-omegas",), dict(type=_float_list, help="MT-DAO mixing weights, e.g. 0.45,0.45"), ("inner", "mt_omegas")),
    (("--lr",), dict(type=float, help="peak learning rate"), ("inner", "lr")),
    (("--beta1",), dict(type=float), ("inner", "beta1")),
    (("--beta2",), dict(type=float), ("inner", "beta2")),
    (("--weight-decay",), dict(type=float), ("inner", "weight_decay")),
    (("--momentum",), dict(type=float, help="sgdm momentum"), ("inner", "momentum")),
    (("--data",), dict(help="kjv (built in) | shakespeare | a .txt file or directory; comma-separated to mix"), ("data", "source")),
    (("--tokenizer",), dict(help="bpe | byte"), ("data", "tokenizer")),
    (("--vocab-size",), dict(type=int, help="BPE vocabulary size"), ("data", "vocab_size")),
    (("--partition",), dict(help="iid | dirichlet (non-IID worker shards)"), ("data", "partition")),
    (("--alpha",), dict(type=float, help="Dirichlet concentration (small = more skewed)"), ("data", "alpha")),
    (("--model",), dict(help="preset: tiny | small | 16m | 125m | 350m | 720m | 1.3b"), ("model",)),
    (("--workers", "-M"), dict(type=int, help="number of workers M"), ("workers",)),
    (("--steps",), dict(type=int), ("steps",)),
    (("--batch-size",), dict(type=int, help="sequences per worker per step"), ("batch_size",)),
    (("--seq-len",), dict(type=int, help="tokens per sequence (default: block_size)"), ("seq_len",)),
    (("--schedule",), dict(help="cosine | wsd | constant (after linear warmup)"), ("schedule",)),
    (("--warmup",), dict(type=int, help="warmup steps"), ("warmup_steps",)),
    (("--min-lr-ratio",), dict(type=float), ("min_lr_ratio",)),
    (("--eval-every",), dict(type=int), ("eval_every",)),
    (("--eval-batches",), dict(type=int), ("eval_batches",)),
    (("--log-every",), dict(type=int), ("log_every",)),
    (("--ckpt-every",), dict(type=int), ("ckpt_every",)),
    (("--seed",), dict(type=int), ("seed",)),
    (("--backend",), dict(help="auto (torchrun -> gloo/nccl, else sim) | sim | gloo | nccl"), ("backend",)),
    (("--device",), dict(help="auto | cpu | cuda"), ("device",)),
]


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for names, kw, _ in _TRAIN_FLAGS:
        p.add_argument(*names, default=argparse.SUPPRESS, **kw)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model field, e.g. --set n_layer=3 (repeatable)")
    p.add_argument("--bf16", action="store_true", default=argparse.SUPPRESS, help="bf16 autocast")


def _train_config(args: argparse.Namespace, base: dict[str, Any] | None = None, **fixed: Any):
    from desloc.train import TrainConfig, unresolved_defaults

    cfg = base if base is not None else unresolved_defaults()
    for names, _, path in _TRAIN_FLAGS:
        dest = names[0].lstrip("-").replace("-", "_")
        if hasattr(args, dest):
            node = cfg
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = getattr(args, dest)
    if getattr(args, "bf16", False):
        cfg["bf16"] = True
    for item in getattr(args, "set", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}; e.g. --set n_layer=3")
        cfg["model_overrides"][key] = json.loads(value) if value.replace(".", "", 1).lstrip("-").isdigit() else value
    for key, value in fixed.items():
        cfg[key] = value
    return TrainConfig.from_dict(cfg)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a small GPT with M workers under one method",
                       description="Pretrain a GPT on built-in text (KJV Bible) or your own. Runs in the "
                       "simulator; under `torchrun --nproc_per_node M` it runs on real processes.")
    _add_train_flags(p)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/train-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps of this invocation (checkpointed; continue with --resume)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from desloc.records import RunDir
    from desloc.train import train

    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out DIR, the run directory to continue")
        saved = RunDir(args.out).read_config()
        cfg = _train_config(args, base=json.loads(json.dumps(saved)))
        if cfg.to_dict() != saved:
            changed = sorted(k for k in saved if saved[k] != cfg.to_dict().get(k))
            raise ConfigError(f"--resume keeps the run's settings; these flags change {changed}. "
                              "Drop them, or start a new run with another --out")
    else:
        import os

        if "WORLD_SIZE" in os.environ and not hasattr(args, "workers"):
            args.workers = int(os.environ["WORLD_SIZE"])  # under torchrun: one worker per process
        cfg = _train_config(args)
    out = args.out or _default_out("train")
    summary = train(cfg, out, resume=args.resume, stop_after=args.stop_after)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("method", "workers", "steps", "tokens", "final_val_loss", "final_val_ppl", "bytes_sent",
                "ratio_vs_ddp", "wall_time_s")
        print(json.dumps({k: summary[k] for k in keys}, indent=2))
        print(f"records: {out}/ (config.json, metrics.jsonl, summary.json, loss.png, loss_vs_bytes.png)",
              file=sys.stderr)
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="several methods (and seeds) at equal tokens: table, JSON, plot",
                       description="Run each method on the same data, model and token budget; "
                       "write compare.json, compare.md and compare.png (DES-LOC Fig. 4 analogue).")
    _add_train_flags(p)
    p.add_argument("--methods", default="ddp,local-adam,desloc,keep-states,reset-states")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--out", type=Path, default=None, help="directory (default runs/compare-<time>)")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from desloc.algorithms import METHODS
    from desloc.compare import markdown_table, run_compare

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

    def config_for(method: str, seed: int):
        cfg = _train_config(args, seed=seed)
        d = cfg.to_dict()
        spec = parse_method_spec(method)
        d["method"].update(period_u=getattr(args, "ku", "auto"), period_v=getattr(args, "kv", "auto"))
        if spec["name"] not in ("desloc", "mtdao"):
            d["method"]["period_u"] = d["method"]["period_v"] = "auto"
        if spec["name"] not in ("desloc", "mtdao"):
            d["method"]["momentum_periods"] = None
        d["method"]["outer"] = None if spec["name"] == "ddp" else getattr(args, "outer", None)
        d["method"].update(spec)
        if spec["name"] == "mtdao" and not d["inner"]["name"].startswith("mtdao"):
            # the MT-DAO inner optimizer of the same flavour as the others' (ADOPT or Adam)
            d["inner"]["name"] = "mtdao" if d["inner"]["name"] == "adopt" else "mtdao-adam"
        from desloc.train import TrainConfig

        return TrainConfig.from_dict(d)

    for m in methods:  # validate every run's config before the first one starts
        config_for(m, seeds[0])
    out = args.out or _default_out("compare")
    record = run_compare(config_for, methods, seeds, out)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(markdown_table(record["methods"], "local-adam" if "local-adam" in record["methods"] else None))
        print(f"\nrecords: {out}/ (compare.json, compare.md, compare.png, one directory per run)", file=sys.stderr)
    return 0


def _add_sample(sub: argparse._SubParsersAction) -> None:
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


def _cmd_methods(args: argparse.Namespace) -> int:
    from desloc.algorithms import METHODS

    for name, (_, summary) in METHODS.items():
        print(f"{name:14s} {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="desloc", description="Low-communication distributed training.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_compare(sub)
    _add_sample(sub)
    _add_toy(sub)
    p = sub.add_parser("methods", help="list the registered methods")
    p.set_defaults(func=_cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointMismatchError, FileNotFoundError) as err:
        print(f"desloc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
