"""Fault-tolerant training on torchft (``desloc train --ft``; optional extra ``pip install -e '.[ft]'``).

Each desloc worker is a torchft replica group (here one process: ``--replica-id i`` of
``--workers N``, its data shard and dropout stream). A Lighthouse (``desloc ft-lighthouse``)
decides who is in; the workers sync through :class:`~desloc.comm.torchft_comm.TorchftComm`.

This module holds what ``--ft`` is configured with (:class:`FtConfig`, a restarted worker's
identity, its run directory), the fault specs of the tests and the Lighthouse; the engine --
rounds, healing, ``ft.jsonl`` -- is :mod:`desloc.runtime.torchft`.

Fault injection (tests only). ``DESLOC_FT_FAULT`` = comma-separated ``KIND:STEP:REPLICAS``
entries, REPLICAS ``*`` or ids joined by ``+``; each entry fires at most once per process:
``commit:8:1`` -- replica 1 reports an error to torchft after the last all-reduce of step 8's
sync, so its commit fails; ``kill:8:2`` -- replica 2 SIGKILLs itself after the first of step 8's
per-tensor all-reduces (mid-sync, with its peers inside the same sync).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desloc.errors import ConfigError

DEFAULT_LIGHTHOUSE = "127.0.0.1:29510"
FAULT_ENV = "DESLOC_FT_FAULT"


def require_torchft() -> None:
    try:
        import torchft  # noqa: F401
    except ImportError:
        raise ConfigError("--ft needs torchft, an optional extra: pip install -e '.[ft]' (torchft==0.2.0)") from None


@dataclass
class FtConfig:
    """``desloc train --ft``: this worker's replica group and how it reaches the Lighthouse."""

    replica_id: int = 0  # --replica-id: this worker's index in 0..workers-1 (data shard, dropout stream)
    lighthouse: str = DEFAULT_LIGHTHOUSE  # --lighthouse HOST:PORT (http:// added if missing)
    timeout_s: float = 60.0  # --ft-timeout: a collective, a commit or a state transfer
    quorum_timeout_s: float = 900.0  # --ft-quorum-timeout: waiting for peers at a round
    min_replicas: int = 1  # --ft-min-replicas: commit a round only with at least this many participants

    def check(self, workers: int) -> None:
        if isinstance(self.replica_id, bool) or not isinstance(self.replica_id, int) \
                or not 0 <= self.replica_id < workers:
            raise ConfigError(f"--replica-id must be an integer in [0, --workers={workers}), got {self.replica_id!r}; "
                              "each replica group of an --ft job gets its own index (its data shard)")
        for name, flag in (("timeout_s", "--ft-timeout"), ("quorum_timeout_s", "--ft-quorum-timeout")):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= MAX_TIMEOUT_S:
                raise ConfigError(f"{flag} must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {v!r}; "
                                  f"e.g. {flag} 60")
        if isinstance(self.min_replicas, bool) or not isinstance(self.min_replicas, int) \
                or not 1 <= self.min_replicas <= workers:
            raise ConfigError(f"--ft-min-replicas must be an integer in [1, --workers={workers}] (a round cannot have "
                              f"more participants than workers), got {self.min_replicas!r}")
        parse_address(self.lighthouse, "--lighthouse")

    @property
    def lighthouse_url(self) -> str:
        host, port = parse_address(self.lighthouse, "--lighthouse")
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


MAX_TIMEOUT_S = 1e6  # torchft turns timeouts into timedeltas and Rust durations
CONNECTION_FIELDS = ("lighthouse", "timeout_s", "quorum_timeout_s", "min_replicas")  # may change on a restart


def parse_address(address: str, flag: str) -> tuple[str, int]:
    """HOST:PORT (an ``http://`` prefix is allowed) -> (host, port), or a ConfigError naming ``flag``."""
    from urllib.parse import urlsplit

    text = str(address)
    split = urlsplit(text if "://" in text else f"http://{text}")
    try:
        port = split.port
    except ValueError:
        port = None
    if split.scheme != "http" or not split.hostname or port is None or split.path not in ("", "/"):
        raise ConfigError(f"{flag} must be HOST:PORT (e.g. {DEFAULT_LIGHTHOUSE}), got {address!r}")
    return split.hostname, port


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """A train config dict without the --ft connection settings, which a restarted worker may change
    (the Lighthouse may have moved); the worker's replica id stays part of its run's identity."""
    ft = config.get("ft")
    if not ft:
        return config
    return {**config, "ft": {k: v for k, v in ft.items() if k not in CONNECTION_FIELDS}}


def replica_dir(out: str | Path, replica: int) -> Path:
    """Worker ``replica``'s run directory inside the job's ``--out``."""
    return Path(out) / f"replica{replica}"


@dataclass
class Fault:
    """One ``DESLOC_FT_FAULT`` entry of this replica (see the module docstring)."""

    kind: str  # "commit" (this replica's commit fails) or "kill" (SIGKILL mid-sync)
    step: int  # the step whose sync it hits
    fired: bool = False


def parse_faults(spec: str, replica: int) -> list[Fault]:
    """This replica's entries of a ``DESLOC_FT_FAULT`` value (empty: none)."""
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        parts = entry.split(":")
        try:
            kind, step, who = parts
            ids = None if who == "*" else {int(r) for r in who.split("+")}
            fault = Fault(kind, int(step))
        except ValueError:
            kind = None
        if kind not in ("commit", "kill") or fault.step < 1:
            raise ConfigError(f"{FAULT_ENV} entries must be KIND:STEP:REPLICAS with KIND commit or kill, STEP >= 1 "
                              f"and REPLICAS * or ids joined by +, got {entry!r}; e.g. {FAULT_ENV}=commit:8:1")
        if ids is None or replica in ids:
            faults.append(fault)
    return faults


def lighthouse_main(bind: str, min_replicas: int, join_timeout_ms: int, heartbeat_timeout_ms: int) -> int:
    """``desloc ft-lighthouse``: run a torchft Lighthouse until SIGINT / SIGTERM."""
    import signal
    import threading

    require_torchft()
    from torchft.coordination import LighthouseServer

    server = LighthouseServer(bind=bind, min_replicas=min_replicas, join_timeout_ms=join_timeout_ms,
                              heartbeat_timeout_ms=heartbeat_timeout_ms)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"desloc ft-lighthouse: listening on {server.address()} (min_replicas={min_replicas}, heartbeat timeout "
          f"{heartbeat_timeout_ms} ms, join timeout {join_timeout_ms} ms); workers: desloc train --ft --lighthouse "
          f"{bind} ...; Ctrl-C stops it", file=sys.stderr, flush=True)
    stop.wait()
    server.shutdown()
    return 0
