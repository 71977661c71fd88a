"""``desloc ft-lighthouse``: the torchft Lighthouse that ``desloc train --ft`` workers join."""

from __future__ import annotations

import argparse

from desloc.errors import ConfigError


def add(sub: argparse._SubParsersAction) -> None:
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
