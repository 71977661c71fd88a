"""What the subcommands share: the argparse value types, the train flag table (flag -> TrainConfig
field) that ``train`` and ``compare`` both take, the flags-a-run-would-ignore refusal, --timeout, and
the numeric class check of every flag."""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

from desloc.errors import ConfigError


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


def _step_time(text: str) -> float | str:
    """--step-time: seconds, or 'measured' (this machine's median step: desloc.timing.TimeConfig)."""
    if text.strip().lower() == "measured":
        return "measured"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--step-time takes seconds or 'measured', got {text!r}; e.g. "
                                         "--step-time 0.25 or --step-time measured") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# flag -> path in the TrainConfig dict; defaults are SUPPRESSed so we know what was passed
_TRAIN_FLAGS: list[tuple[tuple[str, ...], dict[str, Any], tuple[str, ...]]] = [
    (("--method",), dict(help="registered method (desloc methods)"), ("method", "name")),
    (("--kx", "--k"), dict(type=_period, help="K_x: parameter sync period (local-adam/keep/reset: K)"), ("method", "period_x")),
    (("--ku",), dict(type=_period, help="K_u for desloc (default 3*K_x; 'none' = never)"), ("method", "period_u")),
    (("--kv",), dict(type=_period, help="K_v for desloc (default 6*K_x; 'none' = never)"), ("method", "period_v")),
    (("--clip-rho",), dict(type=float, help="coordinate-wise gradient clip bound"), ("method", "clip_rho")),
    (("--outer",), dict(help="outer optimizer on the pseudo-gradient: nesterov | sgd (diloco: nesterov)"), ("method", "outer")),
    (("--outer-lr",), dict(type=float, help="outer learning rate (default from the round length H = --kx: 1 - mu/3, i.e. "
                                                    "1 for H <= 50, DiLoCo's 0.7 from H = 500)"), ("method", "outer_lr")),
    (("--outer-momentum",), dict(type=float, help="outer momentum (default from H = --kx: max(0, 1 - 50/H) capped at DiLoCo's "
                                                          "0.9)"), ("method", "outer_momentum")),
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
    (("--stream",), dict(action="store_const", const=True, help="stream every sync behind compute: fragments and "
                          "delays chosen by a documented rule from the schedule and --network / --step-time (README "
                          "'Fast syncs'); flags given explicitly are kept"), ("method", "stream")),
    (("--fragments",), dict(type=int, metavar="F", help="cut every synced buffer into F slices synced at staggered "
                            "steps of its period (1 = whole buffers, default)"), ("method", "fragments")),
    (("--state-delay",), dict(type=int, metavar="D", help="apply each optimizer-state average D steps after launching "
                              "it, with the EMA rule s += beta^D (E[s_snap] - s_snap) (0 = default)"),
     ("method", "state_delay")),
    (("--fragment-alpha",), dict(type=float, metavar="A", help="keep a share A of the local parameters when an "
                                 "average lands (torchft's fragment_update_alpha; 0 = default)"),
     ("method", "fragment_alpha")),
    (("--compress",), dict(metavar="CODEC", help="encode syncs: a codec for every tag (bf16 | fp16 | int8 | int4 | fp8 "
                           "| topk:FRACTION) or per tag, e.g. params=int4,exp_avg=int8,exp_avg_sq=int8; error "
                           "feedback keeps what a message lost (default: none)"), ("method", "compression")),
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
    (("--diverge-factor",), dict(type=float, metavar="F", help="also stop as diverged (exit 3, summary status "
                                 "'diverged') when a logged training loss exceeds F x the lowest one logged so far, "
                                 "e.g. 1.5 (default: only a non-finite loss or state stops a run)"), ("diverge_factor",)),
    (("--backend",), dict(help="auto (torchrun -> gloo/nccl, else sim) | sim | gloo | nccl"), ("backend",)),
    (("--device",), dict(help="auto | cpu | cuda"), ("device",)),
    (("--network",), dict(help="network of the time model: datacenter | ethernet | cross-region | home | free, "
                               "or a link RATE[:LATENCY], e.g. 20mbit:0.2ms"), ("time", "network")),
    (("--worker-speeds",), dict(type=_float_list, help="compute speed factor per worker, e.g. 1,1,1,0.25"),
     ("time", "worker_speeds")),
    (("--link-speeds",), dict(type=_float_list, help="bandwidth factor of each worker's link, e.g. 1,1,1,0.1"),
     ("time", "link_speeds")),
    (("--step-time",), dict(type=_step_time, help="modeled seconds per local step, or 'measured': the median of "
                            "this run's own measured steps (default: 6 N D / (peak * MFU))"), ("time", "step_time_s")),
    (("--peak-tflops",), dict(type=float, help="accelerator peak for the FLOP-based step time (default 312)"),
     ("time", "peak_tflops")),
    (("--mfu",), dict(type=float, help="model FLOP utilisation for the FLOP-based step time (default 0.4)"),
     ("time", "mfu")),
    (("--tensorboard",), dict(action="store_const", const=True, help="also log every metrics row as TensorBoard "
                              "scalars in RUN/tensorboard (needs: pip install tensorboard)"), ("tensorboard",)),
    (("--wandb",), dict(action="store_const", const=True, help="also log every metrics row to W&B (pip install "
                        "'desloc[wandb]'); offline in RUN/wandb without credentials"), ("wandb",)),
]


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for names, kw, _ in _TRAIN_FLAGS:
        p.add_argument(*names, default=argparse.SUPPRESS, **kw)
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="settings from a TOML or JSON file shaped like a run's config.json (which is one); "
                   "flags given here override it (README 'Config files')")
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

    from desloc.cli.configfile import file_values, overlay

    cfg = base if base is not None else unresolved_defaults()
    from_file = file_values(args)  # --config FILE: over the base, under the flags
    overlay(cfg, from_file)
    for names, _, path in _TRAIN_FLAGS:
        dest = names[0].lstrip("-").replace("-", "_")
        if hasattr(args, dest):
            node = cfg
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = getattr(args, dest)
    from desloc.algorithms import METHODS

    spec = METHODS.get(cfg["method"]["name"])  # an unknown name is reported by MethodConfig
    if spec is not None and spec.inner == "mtdao":  # --method mtdao brings its own inner optimizer
        cfg["inner"]["name"] = _mtdao_inner(cfg["inner"]["name"],
                                            explicit=hasattr(args, "inner") or "name" in from_file.get("inner", {}))
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
    from desloc.sinks import require_sinks

    require_sinks(cfg)  # --tensorboard / --wandb without the package: refused before any work
    return TrainConfig.from_dict(cfg) if build else cfg


def _mtdao_inner(inner: str, explicit: bool, default: str = "mtdao") -> str:
    """The MT-DAO inner optimizer for method mtdao: ``default`` when --inner was not given, else the
    MT-DAO flavour of the given one (adopt -> mtdao, adamw -> mtdao-adam; sgdm has none)."""
    if inner.startswith("mtdao"):
        return inner
    if not explicit:
        return default
    from desloc.config import MTDAO_FLAVOUR

    if inner in MTDAO_FLAVOUR:
        return MTDAO_FLAVOUR[inner]
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
    """Flags passed explicitly whose config field this run ignores, each with the reason
    (flag -> why): the fields given minus the fields consumed (:meth:`TrainConfig.unused`, which
    asks the method's spec). Nothing here knows a method."""
    unused = cfg.unused(in_compare=in_compare)
    out = {}
    for names, _, path in _TRAIN_FLAGS:
        dest = names[0].lstrip("-").replace("-", "_")
        if hasattr(args, dest) and ".".join(path) in unused:
            out[_flag(dest)] = unused[".".join(path)]
    return out


def _refuse_unused(unused: dict[str, str], where: str) -> None:
    if len(unused) == 1:
        (flag, why), = unused.items()
        raise ConfigError(f"{flag} would be ignored {where}: {why}. Drop {flag}")
    if unused:
        raise ConfigError(f"{', '.join(unused)} would be ignored {where}: "
                          + "; ".join(f"{f}: {why}" for f, why in unused.items()) + ". Drop them")


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


INT64_MAX = 2**63 - 1
_REAL_TYPES = (float, _float_list, _step_time)
_INT_TYPES = (int, _int_list, _period, _local_steps)


def check_numbers(args: argparse.Namespace) -> None:
    """The class rule for every numeric flag of the chosen subcommand, found from its parser (a new
    flag is covered without a line here): a real number is finite and 0 or normal
    (:func:`desloc.errors.check_finite`: no NaN, no infinity, no subnormal such as 5e-324, no 1e400
    that overflowed to inf), an integer fits 64 bits. The range of each flag is checked by the
    configuration it feeds (TrainConfig, Compute, ToyConfig, ...); train and compare run this after
    building theirs (whose messages state the range), every subcommand before any work."""
    from desloc.errors import check_finite

    parser = args.parser  # the parser that read args (set by build_parser, which imports every subcommand)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    fields = {names[0].lstrip("-").replace("-", "_"): ".".join(path) for names, _, path in _TRAIN_FLAGS}
    for action in sub._actions:
        if action.type not in _REAL_TYPES + _INT_TYPES or not hasattr(args, action.dest):
            continue
        flag = max(action.option_strings, key=len)
        field = fields.get(action.dest) if args.command in ("train", "compare") else None
        flag_name = f"{flag} ({field})" if field else flag
        value = getattr(args, action.dest)
        if value is None or isinstance(value, str):  # not given (a default of None), a period 'none', a word
            continue  # such as --step-time measured (no number to check)
        many = isinstance(value, (list, tuple))
        for i, v in enumerate(value if many else [value]):
            name = f"{flag_name} entry {i + 1}" if many else flag_name
            if action.type in _REAL_TYPES:
                check_finite(name, v, f"{flag} {action.default}" if isinstance(action.default, float) else "")
            elif isinstance(v, int) and abs(v) > INT64_MAX:
                raise ConfigError(f"{name} must fit a 64-bit integer (|n| <= {INT64_MAX}), got {v}")
