"""``desloc train``: one method, M workers; --resume merging a saved run's settings with the flags
given, and the --ft flags of a fault-tolerant worker (with their environment fallbacks)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from desloc.cli.flags import (_add_train_flags, _check_timeout, _default_out, _refuse_unused, _train_config,
                              _unused_flags, check_numbers)
from desloc.errors import ConfigError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a small GPT with M workers under one method",
                       description="Pretrain a GPT on built-in text (KJV Bible) or your own. Runs in the "
                       "simulator; under `torchrun --nproc_per_node M` it runs on real processes.")
    _add_train_flags(p)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/train-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the desloc run already in --out (by default a non-empty --out is refused)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as TOML (a --config file) and exit without training")
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
    """--ft's settings: the flags, else the environment (REPLICA_GROUP_ID, TORCHFT_LIGHTHOUSE), else the
    ``ft`` table of --config FILE, else FtConfig's defaults; None without --ft."""
    from desloc.cli.configfile import file_values

    given = {field: getattr(args, flag) for flag, field in _FT_FLAGS.items() if hasattr(args, flag)}
    from_file = file_values(args).get("ft") or {}
    if not getattr(args, "ft", False):
        if from_file:
            raise ConfigError(f"{args.config} sets ft (a fault-tolerant worker's settings); add --ft to run as that "
                              "worker, or drop ft from the file")
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in _FT_FLAGS if hasattr(args, f))
            raise ConfigError(f"{flags} only apply to a fault-tolerant worker; add --ft (README 'Elastic and "
                              "fault-tolerant training')")
        return None
    if "replica_id" not in given and not os.environ.get("REPLICA_GROUP_ID", "").isdigit() and "replica_id" in from_file:
        given["replica_id"] = from_file["replica_id"]
    if "replica_id" not in given:
        env = os.environ.get("REPLICA_GROUP_ID", "")
        if not env.isdigit():
            raise ConfigError("--ft needs --replica-id I (this worker's index in 0..workers-1), or REPLICA_GROUP_ID "
                              "in the environment")
        given["replica_id"] = int(env)
    if "lighthouse" not in given and os.environ.get("TORCHFT_LIGHTHOUSE"):
        given["lighthouse"] = os.environ["TORCHFT_LIGHTHOUSE"]
    from desloc.ft import FtConfig

    return {**dataclasses.asdict(FtConfig()), **from_file, **given}


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
            given = "these flags" + (f" and --config {args.config}" if args.config is not None else "")
            raise ConfigError(f"--resume keeps the run's settings; {given} change {changed}. "
                              "Drop them, or start a new run with another --out")
    else:
        from desloc.cli.configfile import file_values

        from_file = file_values(args)
        if os.environ.get("WORLD_SIZE", "").isdigit() and not hasattr(args, "workers") and ft is None \
                and "workers" not in from_file:
            shard = getattr(args, "shard", from_file.get("shard", 1))
            world = int(os.environ["WORLD_SIZE"])
            if isinstance(shard, int) and shard >= 1 and world % shard == 0:  # else TrainConfig says why
                args.workers = world // shard  # under torchrun: one worker per process, or per N with --shard
        cfg = _train_config(args, ft=ft)
        _refuse_unused(_unused_flags(args, cfg), f"by --method {cfg.method.name} (inner {cfg.inner.name})")
    check_numbers(args)
    if args.print_config:
        if int(os.environ.get("RANK", "0")) == 0:
            from desloc.cli.configfile import to_toml

            print(to_toml(cfg.to_dict(), header="desloc train configuration, resolved; run it with\n"
                          "desloc train --config FILE (flags given with it override it)"), end="")
        return 0
    if cfg.stream_choice and int(os.environ.get("RANK", "0")) == 0:
        chosen = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in cfg.stream_choice.items()
                           if k not in ("rule", "link_busy"))
        print(f"desloc: --stream chose {chosen} ({cfg.stream_choice['rule']})", file=sys.stderr)
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
