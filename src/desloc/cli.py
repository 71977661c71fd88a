"""The ``desloc`` command line. ``desloc --help`` lists the subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from desloc.algorithms import parse_method_spec
from desloc.errors import (CheckpointMismatchError, ConfigError, DivergenceError, Interrupted, RunComplete,
                           RunDirError)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``desloc: error: ...``, exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"desloc: error: {message} (see `{self.prog} --help`)\n")


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


def _local_steps(text: str) -> list[int | None] | str:
    return "auto" if text.strip().lower() == "auto" else _int_list(text)


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
    cfg = ToyConfig(workers=args.workers, sigma=args.sigma, steps=args.steps, lr=args.lr,
                    beta1=getattr(args, "beta1", d.beta1), beta2=args.beta2, period_x=args.kx,
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
    (("--local-steps",), dict(type=_local_steps, help="gasloc per-worker local steps H_i, e.g. 32,32,32,8, or "
                                                        "auto (from the time model)"), ("method", "local_steps")),
    (("--gossip-seed",), dict(type=int, help="gasloc random-matching seed"), ("method", "gossip_seed")),
    (("--momentum-periods",), dict(type=_int_list, help="MT-DAO K_j per first momentum, e.g. 32,96"), ("method", "momentum_periods")),
    (("--param-delay",), dict(type=int, metavar="D", help="apply each parameter average D steps after "
                              "launching it, its all-reduce hidden behind D steps of compute (0 = blocking, "
                              "default; D < K_x; changes the algorithm: README 'Overlapped syncs')"),
     ("method", "param_delay")),
    (("--no-overlap",), dict(action="store_const", const=False, help="block on every sync (default: state "
                              "syncs overlap the next step's forward/backward, bitwise the same result)"),
     ("method", "overlap")),
    (("--events",), dict(help="simulator membership events, e.g. 16:add=4,48:drop=2 (workers join / leave "
                              "after that step)"), ("events",)),
    (("--join-states",), dict(help="a joining worker's optimizer states: average (default) | zeros | checkpoint "
                                   "(the averages in the last --ckpt-every checkpoint)"), ("join_states",)),
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
    (("--shard",), dict(type=int, metavar="N", help="under torchrun: a worker is a replica group of N processes "
                        "sharding the model with FSDP2; M = world size / N (README 'Sharded workers')"), ("shard",)),
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
    (("--network",), dict(help="network of the time model: datacenter | ethernet | cross-region | home | free, "
                               "or a link RATE[:LATENCY], e.g. 20mbit:0.2ms"), ("time", "network")),
    (("--worker-speeds",), dict(type=_float_list, help="compute speed factor per worker, e.g. 1,1,1,0.25"),
     ("time", "worker_speeds")),
    (("--link-speeds",), dict(type=_float_list, help="bandwidth factor of each worker's link, e.g. 1,1,1,0.1"),
     ("time", "link_speeds")),
    (("--step-time",), dict(type=float, help="modeled seconds per local step (default: 6 N D / (peak * MFU))"),
     ("time", "step_time_s")),
    (("--peak-tflops",), dict(type=float, help="accelerator peak for the FLOP-based step time (default 312)"),
     ("time", "peak_tflops")),
    (("--mfu",), dict(type=float, help="model FLOP utilisation for the FLOP-based step time (default 0.4)"),
     ("time", "mfu")),
]


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for names, kw, _ in _TRAIN_FLAGS:
        p.add_argument(*names, default=argparse.SUPPRESS, **kw)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model field, e.g. --set n_layer=3 (repeatable)")
    p.add_argument("--bf16", action="store_true", default=argparse.SUPPRESS, help="bf16 autocast")
    p.add_argument("--state-dynamics", action="store_true", default=argparse.SUPPRESS,
                   help="log each state's relative change between logging steps and its spread across workers")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for the other workers before the run "
                   f"stops with an error (default {DEFAULT_TIMEOUT_S:g})")


def _train_config(args: argparse.Namespace, base: dict[str, Any] | None = None, build: bool = True, **fixed: Any):
    from desloc.train import TrainConfig, unresolved_defaults

    cfg = base if base is not None else unresolved_defaults()
    for names, _, path in _TRAIN_FLAGS:
        dest = names[0].lstrip("-").replace("-", "_")
        if hasattr(args, dest):
            node = cfg
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = getattr(args, dest)
    if _preset(cfg["method"]["name"]).inner == "mtdao":  # --method mtdao brings its own inner optimizer
        cfg["inner"]["name"] = _mtdao_inner(cfg["inner"]["name"], explicit=hasattr(args, "inner"))
    if getattr(args, "bf16", False):
        cfg["bf16"] = True
    if getattr(args, "state_dynamics", False):
        cfg["state_dynamics"] = True
    for item in getattr(args, "set", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}; e.g. --set n_layer=3")
        cfg["model_overrides"][key.strip()] = _model_override(key.strip(), value.strip())
    for key, value in fixed.items():
        cfg[key] = value
    return TrainConfig.from_dict(cfg) if build else cfg


def _preset(name: str):
    """The registry row of method ``name`` (an unknown name is reported by MethodConfig)."""
    from desloc.algorithms import METHODS, Preset
    from desloc.algorithms.desloc import DesLoc

    return METHODS.get(name) or Preset(DesLoc, "")


def _mtdao_inner(inner: str, explicit: bool, default: str = "mtdao") -> str:
    """The MT-DAO inner optimizer for method mtdao: ``default`` when --inner was not given, else the
    MT-DAO flavour of the given one (adopt -> mtdao, adamw -> mtdao-adam; sgdm has none)."""
    if inner.startswith("mtdao"):
        return inner
    if not explicit:
        return default
    if inner in ("adopt", "adamw"):
        return "mtdao" if inner == "adopt" else "mtdao-adam"
    if inner != "sgdm":
        return inner  # an unknown name: InnerConfig lists the choices
    raise ConfigError(f"method mtdao runs the MT-DAO inner optimizer, which has an ADOPT flavour (--inner mtdao "
                      f"or adopt) and an Adam flavour (--inner mtdao-adam or adamw), but no {inner} flavour; "
                      "drop --inner or pick one of those")


def _model_override(key: str, value: str) -> int | float:
    """``--set FIELD=VALUE``: VALUE parsed as the model field's type (int, or float for dropout)."""
    import dataclasses

    from desloc.model import GPTConfig

    fields = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    if key == "vocab_size":
        raise ConfigError(f"--set vocab_size={value}: the vocabulary comes from the tokenizer; use --vocab-size "
                          f"{value} (BPE) or --tokenizer byte (256)")
    if key not in fields:
        raise ConfigError(f"unknown model field {key!r} in --set {key}={value}; fields are "
                          f"{sorted(k for k in fields if k != 'vocab_size')}")
    kind = type(fields[key])
    try:
        parsed = kind(value)
    except ValueError:
        need = "an integer" if kind is int else "a number"
        raise ConfigError(f"--set {key}={value}: model field {key} needs {need}, got {value!r}; "
                          f"e.g. --set {key}={fields[key] if fields[key] else (0.1 if kind is float else 2)}") from None
    if kind is float:
        from desloc.errors import check_finite

        check_finite(f"--set {key}", parsed, f"--set {key}=0.1")
    return parsed


def _flag(dest: str) -> str:
    """The flag spelling(s) of a _TRAIN_FLAGS destination, e.g. ``--kx/--k``."""
    for names, _, _ in _TRAIN_FLAGS:
        if names[0].lstrip("-").replace("-", "_") == dest:
            return "/".join(names)
    return "--" + dest.replace("_", "-")


def _unused_flags(args: argparse.Namespace, cfg, in_compare: bool = False) -> dict[str, str]:
    """Flags passed explicitly that this run's method, inner optimizer or data settings ignore,
    each with the reason (flag -> why)."""
    m, inner, out = cfg.method, cfg.inner, {}
    preset = _preset(m.name)

    def refuse(dest: str, why: str) -> None:
        if hasattr(args, dest):
            out[_flag(dest)] = why

    if not preset.has_sync_period:
        refuse("kx", f"{m.name} all-reduces the gradient every step; it has no sync period")
    takes_state_periods = ("tunable",) if in_compare else ("tunable", "tied")  # tied: --ku = --kx is allowed
    if preset.state_periods not in takes_state_periods:
        from desloc.algorithms import tunable_methods

        for dest in ("ku", "kv"):
            refuse(dest, f"{m.name} {preset.why_fixed}; K_u / K_v apply to {tunable_methods()}")
    if m.momentum_periods is None:
        refuse("momentum_periods", f"{m.name} with inner {inner.name} has no MT-DAO momenta to give periods")
    if m.outer is None:
        refuse("outer", f"{m.name} has no parameter sync to put an outer optimizer on")
        hint = "; add --outer nesterov (or sgd) to use one" if preset.has_sync_period else ""
        for dest in ("outer_lr", "outer_momentum"):
            refuse(dest, f"{m.name} runs no outer optimizer here{hint}")
    if not preset.gossips:
        for dest in ("topology", "local_steps", "gossip_seed"):
            refuse(dest, f"only gasloc gossips, not {m.name}")
    if not preset.has_sync_period or preset.gossips:
        refuse("param_delay", f"{m.name} has no parameter average to delay ("
               + ("it all-reduces the gradient every step)" if not preset.has_sync_period else "it gossips)"))
    if not any(e.op == "add" for e in _parse_events(cfg.events)):
        refuse("join_states", "no worker joins (add an event such as --events 100:add=4)")
    if preset.state_periods == "none":
        refuse("no_overlap", f"{m.name} never syncs optimizer states, and only state syncs overlap")
    elif not _syncs_states(cfg):
        refuse("no_overlap", f"no optimizer state is ever synced here (every state period is 'none'), and only "
                             "state syncs overlap")
    if preset.gossips and m.topology not in _RANDOM_TOPOLOGIES:
        refuse("gossip_seed", f"the {m.topology} topology is the same every round; only the random ones "
                              f"({', '.join(_RANDOM_TOPOLOGIES)}) draw from --gossip-seed")
    if cfg.time.step_time_s is not None:
        for dest in ("peak_tflops", "mfu"):
            refuse(dest, "--step-time gives the modeled step time; --peak-tflops and --mfu only derive it from FLOPs")
    from desloc.timing import profile

    if math.isinf(profile(cfg.time.network).bandwidth_bps):
        refuse("link_speeds", f"the {cfg.time.network} network has infinite bandwidth, which no factor changes")
    if not inner.name.startswith("mtdao"):
        for dest in ("mt_betas", "mt_omegas"):
            refuse(dest, f"the inner optimizer {inner.name} is not MT-DAO; use --inner mtdao / mtdao-adam "
                         "or --method mtdao")
    if inner.name != "sgdm":
        refuse("momentum", f"only the sgdm inner optimizer has a momentum, not {inner.name}"
                           + ("" if inner.name.startswith("mtdao") else "; its first-moment decay is --beta1"))
    if inner.name == "sgdm" or inner.name.startswith("mtdao"):
        refuse("beta1", f"the {inner.name} inner optimizer does not use beta1; "
                        + ("its momentum is --momentum" if inner.name == "sgdm" else "its momentum decays are --mt-betas"))
    if inner.name == "sgdm":
        refuse("beta2", "the sgdm inner optimizer has no second moment")
    if cfg.data.tokenizer == "byte":
        refuse("vocab_size", "the byte tokenizer always has 256 symbols; --vocab-size sets the BPE vocabulary")
    if cfg.data.partition != "dirichlet":
        refuse("alpha", f"--alpha is the Dirichlet concentration of --partition dirichlet, not {cfg.data.partition}")
    if cfg.schedule == "constant":
        refuse("min_lr_ratio", "the constant schedule never decays the learning rate")
    return out


_RANDOM_TOPOLOGIES = ("one-peer", "two-peer")


def _syncs_states(cfg) -> bool:
    """Whether the resolved method ever averages an optimizer state (a state period that is not None).
    With an MT-DAO inner optimizer its momenta follow ``momentum_periods`` (default: K_u)."""
    m, preset = cfg.method, _preset(cfg.method.name)
    if preset.state_periods != "tunable":
        return preset.state_periods == "tied"
    first = m.momentum_periods if m.momentum_periods is not None and cfg.inner.name.startswith("mtdao") \
        else [m.period_u]
    return any(k is not None for k in [*first, m.period_v])


def _parse_events(spec):
    from desloc.membership import parse_events

    return parse_events(spec)


def _refuse_unused(unused: dict[str, str], where: str) -> None:
    if len(unused) == 1:
        (flag, why), = unused.items()
        raise ConfigError(f"{flag} would be ignored {where}: {why}. Drop {flag}")
    if unused:
        raise ConfigError(f"{', '.join(unused)} would be ignored {where}: "
                          + "; ".join(f"{f}: {why}" for f, why in unused.items()) + ". Drop them")


def _check_sync_happens(cfg) -> None:
    """K_x > steps: the workers would never be averaged (and the ratio vs DDP would be infinite)."""
    kx, steps = cfg.method.period_x, cfg.steps
    if _preset(cfg.method.name).has_sync_period and kx > steps:
        raise ConfigError(f"K_x={kx} > steps={steps}: no parameter sync would happen, the workers would "
                          f"train apart and never be averaged; lower --kx (e.g. --kx {max(1, steps // 4)}) "
                          f"or raise --steps (to at least {kx})")


MAX_TIMEOUT_S = 366 * 86400  # a year: far above any collective, far below timedelta's limit
DEFAULT_TIMEOUT_S = 600.0


def _check_timeout(args: argparse.Namespace) -> None:
    """--timeout: in range, and only where collectives run (torchrun, --backend gloo/nccl); the
    simulator and --ft (which has --ft-timeout) would ignore it. Not given: the default."""
    t = args.timeout
    if t is None:
        args.timeout = DEFAULT_TIMEOUT_S
        return
    if not (math.isfinite(t) and 0 < t <= MAX_TIMEOUT_S):
        raise ConfigError(f"--timeout must be a finite number of seconds in (0, {MAX_TIMEOUT_S}], got {t}; e.g. "
                          "--timeout 60 (how long a collective waits for a worker before the run stops)")
    if getattr(args, "ft", False):
        raise ConfigError("--timeout would be ignored: an --ft worker's collectives wait --ft-timeout seconds. "
                          "Drop --timeout (use --ft-timeout)")
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not under_torchrun and getattr(args, "backend", "auto") in ("auto", "sim"):
        raise ConfigError("--timeout would be ignored: the simulator runs every worker in this process and waits "
                          "for no collective. Drop --timeout (it applies under torchrun)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a small GPT with M workers under one method",
                       description="Pretrain a GPT on built-in text (KJV Bible) or your own. Runs in the "
                       "simulator; under `torchrun --nproc_per_node M` it runs on real processes.")
    _add_train_flags(p)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/train-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the desloc run already in --out (by default a non-empty --out is refused)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps of this invocation (checkpointed; continue with --resume)")
    ft = p.add_argument_group("fault tolerance (torchft, optional extra: pip install -e '.[ft]'; README "
                              "'Elastic and fault-tolerant training')")
    ft.add_argument("--ft", action="store_true", help="this process is one worker (a torchft replica group) of a "
                    "fault-tolerant job: peers may die, restart or join; records in --out/replica<i>")
    ft.add_argument("--replica-id", type=int, default=argparse.SUPPRESS,
                    help="--ft: this worker's index in 0..workers-1 (its data shard)")
    ft.add_argument("--lighthouse", default=argparse.SUPPRESS,
                    help="--ft: the Lighthouse's HOST:PORT (default 127.0.0.1:29510; desloc ft-lighthouse starts one)")
    ft.add_argument("--ft-timeout", type=float, default=argparse.SUPPRESS,
                    help="--ft: seconds a collective, commit or state transfer may take (default 60)")
    ft.add_argument("--ft-quorum-timeout", type=float, default=argparse.SUPPRESS,
                    help="--ft: seconds to wait for peers at a round (default 900)")
    ft.add_argument("--ft-min-replicas", type=int, default=argparse.SUPPRESS,
                    help="--ft: commit a round only with at least this many participants (default 1)")
    p.set_defaults(func=_cmd_train)


_FT_FLAGS = {"replica_id": "replica_id", "lighthouse": "lighthouse", "ft_timeout": "timeout_s",
             "ft_quorum_timeout": "quorum_timeout_s", "ft_min_replicas": "min_replicas"}


def _ft_config(args: argparse.Namespace) -> dict[str, Any] | None:
    given = {field: getattr(args, flag) for flag, field in _FT_FLAGS.items() if hasattr(args, flag)}
    if not getattr(args, "ft", False):
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in _FT_FLAGS if hasattr(args, f))
            raise ConfigError(f"{flags} only apply to a fault-tolerant worker; add --ft (README 'Elastic and "
                              "fault-tolerant training')")
        return None
    if "replica_id" not in given:
        env = os.environ.get("REPLICA_GROUP_ID", "")
        if not env.isdigit():
            raise ConfigError("--ft needs --replica-id I (this worker's index in 0..workers-1), or REPLICA_GROUP_ID "
                              "in the environment")
        given["replica_id"] = int(env)
    if "lighthouse" not in given and os.environ.get("TORCHFT_LIGHTHOUSE"):
        given["lighthouse"] = os.environ["TORCHFT_LIGHTHOUSE"]
    from desloc.ft import FtConfig

    return {**dataclasses.asdict(FtConfig()), **given}


def _cmd_train(args: argparse.Namespace) -> int:
    from desloc.records import RunDir, dumps
    from desloc.train import train

    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError(f"--stop-after must be >= 1 (steps to run in this invocation), got {args.stop_after}; "
                          "drop it to train to --steps")
    _check_timeout(args)
    ft = _ft_config(args)
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out DIR, the run directory to continue")
        from desloc.ft import replica_dir
        from desloc.train import TrainConfig

        saved_dir = args.out if ft is None else replica_dir(args.out, ft["replica_id"])
        saved = TrainConfig.from_dict(RunDir(saved_dir).read_config()).to_dict()  # older runs: new fields' defaults
        base = json.loads(json.dumps(saved))
        if ft is not None and base.get("ft"):  # a restarted worker may reach a Lighthouse that moved
            from desloc.ft import CONNECTION_FIELDS

            given = {f for flag, f in _FT_FLAGS.items() if hasattr(args, flag)}
            if os.environ.get("TORCHFT_LIGHTHOUSE"):
                given.add("lighthouse")
            base["ft"].update({k: ft[k] for k in CONNECTION_FIELDS if k in given})
        cfg = _train_config(args, base=base)
        from desloc.ft import identity

        if identity(cfg.to_dict()) != identity(saved):
            changed = sorted(k for k in saved if identity(saved)[k] != identity(cfg.to_dict()).get(k))
            raise ConfigError(f"--resume keeps the run's settings; these flags change {changed}. "
                              "Drop them, or start a new run with another --out")
    else:
        if os.environ.get("WORLD_SIZE", "").isdigit() and not hasattr(args, "workers") and ft is None:
            shard = getattr(args, "shard", 1)
            world = int(os.environ["WORLD_SIZE"])
            if isinstance(shard, int) and shard >= 1 and world % shard == 0:  # else TrainConfig says why
                args.workers = world // shard  # under torchrun: one worker per process, or per N with --shard
        cfg = _train_config(args, ft=ft)
        _refuse_unused(_unused_flags(args, cfg), f"by --method {cfg.method.name} (inner {cfg.inner.name})")
        _check_sync_happens(cfg)
    check_numbers(args)
    out = args.out or _default_out("train")  # train() checks the engine, device and memory first
    summary = train(cfg, out, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite,
                    timeout_s=args.timeout)
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("method", "workers", "steps", "tokens", "final_val_loss", "final_val_ppl", "bytes_sent",
                "ratio_vs_ddp", "wall_time_s", "network", "modeled_time_s", "speedup_vs_ddp_modeled")
        print(dumps({k: summary[k] for k in keys}, indent=2))
        if cfg.ft is not None:
            from desloc.ft import replica_dir

            out = replica_dir(out, cfg.ft.replica_id)
        print(f"records: {out}/ (config.json, metrics.jsonl, summary.json, loss.png, loss_vs_bytes.png, "
              "loss_vs_time.png" + (", ft.jsonl)" if cfg.ft is not None else ")"),
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
    p.add_argument("--overwrite", action="store_true",
                   help="rerun runs already in --out (by default finished runs with identical settings are "
                   "reused, and runs with other settings are refused)")
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
    _check_timeout(args)

    def config_for(method: str, seed: int):
        d = _train_config(args, build=False, seed=seed)  # validated below, once adapted to the method
        spec = parse_method_spec(method)
        d["method"].update(period_u=getattr(args, "ku", "auto"), period_v=getattr(args, "kv", "auto"))
        preset = _preset(spec["name"])
        if preset.state_periods != "tunable":
            d["method"]["period_u"] = d["method"]["period_v"] = "auto"
        d["method"]["outer"] = getattr(args, "outer", None) if preset.has_sync_period else None
        d["method"].update(spec)
        if preset.inner == "mtdao":
            # the MT-DAO inner optimizer of the same flavour as the others' (ADOPT or Adam)
            d["inner"]["name"] = _mtdao_inner(d["inner"]["name"], explicit=True)
        if not preset.gossips:
            d["method"]["local_steps"] = None  # per-worker local steps are gasloc's alone
        if not preset.has_sync_period or preset.gossips:
            d["method"]["param_delay"] = 0  # only a parameter average can be delayed
        if preset.state_periods != "tunable" or not d["inner"]["name"].startswith("mtdao"):
            d["method"]["momentum_periods"] = None  # only MT-DAO momenta have periods of their own
        from desloc.train import TrainConfig

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
    for cfg in configs.values():
        _check_sync_happens(cfg)
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

    for name, preset in METHODS.items():
        print(f"{name:14s} {preset.summary}")
    return 0


def _add_wallclock(sub: argparse._SubParsersAction) -> None:
    from desloc.wallclock import METHODS, PAPER_MODELS, PAPER_PERIODS, add_network_and_compute_flags

    p = sub.add_parser("wallclock", help="modeled time per step and speedup vs DDP of every all-reduce method",
                       description="A model, not a measurement: compute (6 N D) + ring all-reduce per synced "
                       f"tensor for {', '.join(METHODS)}. The defaults reproduce the DES-LOC paper's setting "
                       "(1.3x-2.1x over DDP) with every assumption printed.")
    p.add_argument("--models", default=",".join(PAPER_MODELS), help="model sizes, e.g. 1b,7b,13b or 350m,1.3b")
    p.add_argument("--profiles", default=None,
                   help="network profiles, comma-separated: datacenter (default), ethernet, cross-region, home, free")
    p.add_argument("--kx", type=int, default=PAPER_PERIODS[0], help="K_x (also local-adam's K, diloco's H)")
    p.add_argument("--ku", type=int, default=PAPER_PERIODS[1], help="K_u (desloc)")
    p.add_argument("--kv", type=int, default=PAPER_PERIODS[2], help="K_v (desloc, mtdao)")
    p.add_argument("--momentum-periods", type=_int_list, default=None, help="mtdao K_j per momentum (default K_u,K_u)")
    p.add_argument("--steps", type=int, default=15360, help="run length for the total time (default 15360)")
    add_network_and_compute_flags(p)
    p.set_defaults(func=_cmd_wallclock)


def _cmd_wallclock(args: argparse.Namespace) -> int:
    from desloc.records import dumps
    from desloc.wallclock import compute_from_args, format_wallclock, parse_size, profiles_from_args, wallclock_record

    models = {m.strip().lower(): parse_size(m) for m in args.models.split(",") if m.strip()}
    if not models:
        raise ConfigError(f"--models lists nothing, got {args.models!r}; e.g. --models 1b,7b,13b")
    record = wallclock_record(models, profiles_from_args(args.profiles, args), compute_from_args(args),
                              (args.kx, args.ku, args.kv), args.steps, args.momentum_periods)
    print(dumps(record, indent=2) if args.json else format_wallclock(record))
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from desloc.wallclock import add_network_and_compute_flags

    p = sub.add_parser("plan", help="choose K_x, K_u, K_v from the betas' half-lives and a communication target",
                       description="Half-lives of the betas and recommended sync periods for a model size, "
                       "network and target communication overhead (a model; the rule is printed).")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--mt-betas", type=_float_list, default=None, help="MT-DAO momentum decays, e.g. 0.9,0.99")
    p.add_argument("--model", default=None, help="model size, e.g. 125m, 1.3b, 7b (default 7b)")
    p.add_argument("--params", type=float, default=None, help="parameter count instead of --model, e.g. 7e9")
    p.add_argument("--profile", default=None, help="network profile (default datacenter)")
    p.add_argument("--target-overhead", type=float, default=0.1,
                   help="communication at most this fraction of compute time (default 0.1)")
    add_network_and_compute_flags(p)
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from desloc.records import dumps
    from desloc.wallclock import compute_from_args, format_plan, model_params, plan, profiles_from_args

    params = model_params(args.model, args.params)
    nets = profiles_from_args(args.profile, args)
    if len(nets) > 1:
        raise ConfigError("plan takes one network: --profile NAME or --bandwidth-gbps X --latency-ms Y, not both")
    result = plan(args.beta1, args.beta2, params, nets[0], args.target_overhead, compute_from_args(args),
                  args.mt_betas)
    print(dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="desloc", description="Low-communication distributed training.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_compare(sub)
    _add_sample(sub)
    _add_toy(sub)
    _add_wallclock(sub)
    _add_plan(sub)
    p = sub.add_parser("methods", help="list the registered methods")
    p.set_defaults(func=_cmd_methods)
    _add_ft_lighthouse(sub)
    return parser


def _add_ft_lighthouse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ft-lighthouse", help="run the torchft Lighthouse that `desloc train --ft` workers join",
                       description="Decides which workers of a fault-tolerant job are in each round (torchft; "
                       "optional extra: pip install -e '.[ft]'). Runs until Ctrl-C / SIGTERM.")
    p.add_argument("--bind", default="127.0.0.1:29510",
                   help="HOST:PORT to listen on (default 127.0.0.1:29510, this machine only; 0.0.0.0:PORT for "
                   "workers on other hosts)")
    p.add_argument("--min-replicas", type=int, default=2,
                   help="a round needs at least this many workers (default 2)")
    p.add_argument("--heartbeat-timeout-ms", type=int, default=5000,
                   help="a worker silent this long is dead: the others' next round goes on without it (default 5000)")
    p.add_argument("--join-timeout-ms", type=int, default=60000,
                   help="how long a round waits for a live worker that has not asked to join (default 60000)")
    p.set_defaults(func=_cmd_ft_lighthouse)


def _cmd_ft_lighthouse(args: argparse.Namespace) -> int:
    from desloc.ft import lighthouse_main

    for name in ("min_replicas", "heartbeat_timeout_ms", "join_timeout_ms"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if ":" not in args.bind:
        raise ConfigError(f"--bind must be HOST:PORT, e.g. 127.0.0.1:29510, got {args.bind!r}")
    return lighthouse_main(args.bind, args.min_replicas, args.join_timeout_ms, args.heartbeat_timeout_ms)


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


_COLLECTIVE_HINTS = re.compile(r"gloo|nccl|timed out|by peer|broken pipe|connection (?:reset|closed|refused)",
                               re.IGNORECASE)


def collective_failure_message(err: BaseException, timeout_s: float | None, env: dict | None = None) -> str | None:
    """One line for a failed torch.distributed collective (a timeout, a peer that died), or None
    when ``err`` is not one. Names the rank that is not answering when it can be told: the
    message names a peer address, or there are only two ranks."""
    text = str(err).strip()
    dist_error = any(c.__name__.startswith("Dist") for c in type(err).__mro__)
    if not (dist_error or _COLLECTIVE_HINTS.search(text)):
        return None
    env = os.environ if env is None else env
    rank = env.get("RANK", "")
    world = env.get("WORLD_SIZE", "")
    core = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h)(?::\d+)?\]\s*", "", text.splitlines()[0] if text else type(err).__name__)
    timed_out = re.search(r"timed out|timeout", text, re.IGNORECASE) is not None
    peer = re.search(r"\[([0-9a-fA-F.:]+|[\w.-]+)\]:(\d+)", text)
    at = f" (peer {peer.group(1)}:{peer.group(2)})" if peer else ""
    if rank.isdigit() and world.isdigit() and int(world) == 2:
        who = f"rank {1 - int(rank)}{at} is not answering"
    elif peer:
        who = f"the rank at {peer.group(1)}:{peer.group(2)} is not answering"
    elif world.isdigit():
        who = (f"one of the other {int(world) - 1} ranks is not answering (the ranks that report no such error "
               "are the suspects)")
    else:
        who = "another rank is not answering"
    me = f"rank {rank}" if rank.isdigit() else "this process"
    limit = f"{timeout_s:g} s" if timeout_s is not None else "the collective timeout"
    if timed_out:
        what = f"{me} waited {limit} in a collective and {who}: it may be stopped (SIGSTOP), hung or dead"
    else:
        what = f"a collective failed on {me}; {who}: it may have crashed or been killed"
    return (f"{what} [{core}]; check that worker's process and log, then continue with --resume. "
            f"Change how long a collective waits with --timeout SECONDS"
            + (f" (now {timeout_s:g})" if timeout_s is not None else ""))


INT64_MAX = 2**63 - 1
_REAL_TYPES = (float, _float_list)
_INT_TYPES = (int, _int_list, _period, _local_steps)


def check_numbers(args: argparse.Namespace) -> None:
    """The class rule for every numeric flag of the chosen subcommand, found from its parser (a new
    flag is covered without a line here): a real number is finite and 0 or normal
    (:func:`desloc.errors.check_finite`: no NaN, no infinity, no subnormal such as 5e-324, no 1e400
    that overflowed to inf), an integer fits 64 bits. The range of each flag is checked by the
    configuration it feeds (TrainConfig, Compute, ToyConfig, ...); train and compare run this after
    building theirs (whose messages state the range), every subcommand before any work."""
    from desloc.errors import check_finite

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    fields = {names[0].lstrip("-").replace("-", "_"): ".".join(path) for names, _, path in _TRAIN_FLAGS}
    for action in sub._actions:
        if action.type not in _REAL_TYPES + _INT_TYPES or not hasattr(args, action.dest):
            continue
        flag = max(action.option_strings, key=len)
        field = fields.get(action.dest) if args.command in ("train", "compare") else None
        flag_name = f"{flag} ({field})" if field else flag
        value = getattr(args, action.dest)
        if value is None:  # not given (a default of None), or a period 'none'
            continue
        many = isinstance(value, (list, tuple))
        for i, v in enumerate(value if many else [value]):
            name = f"{flag_name} entry {i + 1}" if many else flag_name
            if action.type in _REAL_TYPES:
                check_finite(name, v, f"{flag} {action.default}" if isinstance(action.default, float) else "")
            elif isinstance(v, int) and abs(v) > INT64_MAX:
                raise ConfigError(f"{name} must fit a 64-bit integer (|n| <= {INT64_MAX}), got {v}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _route_warnings()
    try:
        if args.command not in ("train", "compare"):  # those check after their configurations (better messages)
            check_numbers(args)
        return int(args.func(args) or 0)
    except RunComplete as done:
        print(f"desloc: {done}", file=sys.stderr)
        return 0
    except Interrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"desloc: {stop}", file=sys.stderr)
        return stop.exit_code
    except DivergenceError as err:
        print(f"desloc: error: {err}", file=sys.stderr)
        return 3
    except (ConfigError, CheckpointMismatchError, RunDirError, FileNotFoundError) as err:
        print(f"desloc: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (e.g. `| head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        from desloc.records import describe_os_error

        print(f"desloc: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a collective that timed out or lost its peer (gloo / NCCL)
        message = collective_failure_message(err, getattr(args, "timeout", None))
        if message is None:
            raise
        print(f"desloc: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
