r"""Measured wall-clock time of ddp / local-adam / desloc / diloco over real rate-limited links.

Where the other time records are *modeled* (`time_claims.py`: the simulator's virtual clock),
this one *measures*: M = 4 worker processes, each in its own network namespace, talk gloo over
veth links whose rate is limited by the kernel (`tc ... tbf`), and the training loop's wall time
is compared with the same tokens computed without any communication, and with the time model's
prediction for the same inputs.

    sudo .venv/bin/python benchmarks/slow_network.py            # full run (~30 min, idle machine)
    sudo .venv/bin/python benchmarks/slow_network.py --quick    # plumbing smoke test (~7 min)
    sudo .venv/bin/python benchmarks/slow_network.py --cleanup  # remove leftovers of crashed runs

Needs root (namespaces, veth, tc). Without root, or where `ip netns add` fails, it prints why
and exits 0 ("skipped"); nothing is written.

Topology (`SlowNetwork`; the root namespace is not touched). A hub namespace holds a Linux
bridge; worker i's namespace holds one end of a veth pair (address 10.213.0.(i+1)/24, a private
/24 checked to be unused in the root namespace), whose other end is a port of the bridge. Each
worker's link is limited in both directions by a `tbf` qdisc on the egress of both veth ends
(worker -> bridge on the worker's end, bridge -> worker on the bridge's end), so every rank has a
link of rate R each way, as a host on a switch would. Names carry the pid (namespaces
`desloc-sn<pid>-hub`, `desloc-sn<pid>-w<i>`; interfaces, created inside those namespaces,
`sn<pid>b<i>` / `sn<pid>w<i>` / `sn<pid>br`, <= 15 characters). Deleting the namespaces removes
every veth, the bridge and every qdisc; that happens at the end, also on an exception, SIGINT,
SIGTERM or SIGHUP (turned into an exception) and at interpreter exit. `--cleanup` deletes every
namespace named `desloc-sn*` (after stopping the processes still inside it).

tbf parameters: `burst = max(rate * 1 ms, 32 KiB)`, `latency 100ms`. The kernel's tbf schedules
with high-resolution timers, so the classic `rate / HZ` minimum burst is not needed to reach the
rate (the goodput measured with these bursts: benchmarks/README.md, "Design notes and history").
A large burst would let the first `burst` bytes of each all-reduce after a compute phase pass at
line speed; 1 ms of the rate keeps that below 3% of DDP's per-step payload. The 100 ms queue
(limit = rate x latency + burst) is there so that no packet is dropped.

What is run, per rate (default `--rates 20mbit,100mbit,1gbit` and `unlimited`, no qdisc; the
rate is changed with `tc qdisc replace` / `del`, the namespaces are built once) and per arm, all
with the same model (tiny), steps (96), batch, seed, data, so the same tokens:

    ddp | local-adam K=16 | desloc (16, 48, 96) --no-overlap (blocking) | desloc (16, 48, 96)
    (the library default: overlapped state syncs) | desloc (16, 48, 96) --param-delay 4 |
    diloco H=16 | desloc (16, 48, 96) --stream | desloc (16, 48, 96) --stream --compress int8

The two stream arms pass `--network <this rate's link>` (the host's measured rate for `unlimited`)
and `--step-time <compute-only median / steps>`, so `--stream` sizes fragments and delays for the
link it runs on (the choice is in each run's record: `stream`, and `method` = the resolved config).

Each arm: 4 processes `ip netns exec <ns_i> env GLOO_SOCKET_IFNAME=<veth_i> OMP_NUM_THREADS=1
torchrun --nnodes 4 --node-rank i --nproc-per-node 1 --master-addr 10.213.0.1 --master-port
<port> -m desloc train --backend gloo --out <run> --overwrite ...` sharing one `--out`.
Arms whose flag `desloc train --help` does not list are skipped with a note in the record. Evaluation only at the last step
(4 batches), one log row, one checkpoint (at the end); all of this is inside the training loop's
time for every arm alike.

Measured per run: the training loop's wall time (`wall_time_s` of the run's summary.json: from
the first step to the end of the last step's evaluation and checkpoint, rank 0), the whole
process wall time (launch of the 4 torchruns to the exit of the last: interpreter start, corpus,
rendezvous, plots included), `bytes_sent`, `final_val_loss`. A failed run is recorded with the
tail of its ranks' logs and does not stop the others.

Compute-only time for the same tokens: 4 concurrent `desloc train --backend sim --workers 1
--method local-adam` (one worker: nothing crosses a network), loading the 2 cores as the 4 ranks
do; their `wall_time_s` (median and max) is the floor every arm is compared with.

Prediction (the time model, `desloc.timing`): what `desloc train --backend sim --workers 4` of the
same arm reports as `modeled_time_s` with `--step-time <median compute-only wall / steps>` and
`--network RATE:LATENCY`, computed by replaying the arm's optimizer, schedule and communicator
through desloc's `VirtualClock` with one flat parameter of the model's size and no
forward/backward (`replay_modeled_time`: the clock sees only bytes per call, so this is the same
number in a second instead of a minute per run). Latency = half the measured TCP round trip between two
worker namespaces (the model's alpha is one-way). Two bandwidths: *nominal* (the tbf rate; none
for `unlimited`) and *calibrated* = min(nominal, host rate), where the host rate is measured once
with the 4 ranks in the namespaces and no qdisc: the median over reps of the slowest rank's
`dist.all_reduce` of the model's parameter bytes n, as ring bytes per link 2(M-1)/M n per
second. Prediction error = predicted / measured training-loop time - 1. Predictions are made
after the timed runs (they do not depend on this machine's load).

`--quick`: 16 steps, K = 4 (desloc 4/8/16, diloco H = 4, --param-delay 2), one rate (100mbit)
and unlimited. `--reps N` repeats every timed run (arm order reversed every rep; medians
reported). The full run does 24 timed runs (its cost on 2 cores: benchmarks/README.md).

Record: `results/slow_network.json` (`--quick`: `slow_network_quick.json`, never the real one),
the table printed at the end, and `results/slow_network.png` (training-loop time per arm per
rate, log scale, compute-only as a line). Progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, write_record

NS_PREFIX = "desloc-sn"  # every namespace this script creates starts with it (--cleanup)
SUBNET = "10.213.0"  # private /24: worker i is SUBNET.(i+1)
BIN = Path(sys.executable).parent  # the venv's bin: torchrun next to this python
TBF_LATENCY = "100ms"
TBF_MIN_BURST = 32 * 1024  # bytes
UNLIMITED = "unlimited"
_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


def log(msg: str) -> None:
    print(f"[slow_network] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- helpers
def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a short command (ip / tc); raise with its stderr when ``check`` and it fails."""
    p = subprocess.run(argv, check=False, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


def rate_bps(rate: str) -> float:
    """'20mbit' -> 2e7 bits/s (units bit/kbit/mbit/gbit/tbit, case-insensitive, as tc and desloc)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", rate)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"rate {rate!r}: expected a number and one of {', '.join(_UNITS)}, e.g. 20mbit")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def tbf_burst(rate: str) -> int:
    """Bucket size in bytes: 1 ms of the rate, at least 32 KiB (see the module docstring)."""
    return max(int(rate_bps(rate) / 8 * 1e-3), TBF_MIN_BURST)


def netns_available() -> tuple[bool, str]:
    """(True, '') where this process can build the topology, else (False, why)."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, veth pairs, tc qdiscs); run it with sudo"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    p = sh("ip", "netns", "add", probe, check=False)
    if p.returncode != 0:
        return False, f"`ip netns add` failed: {p.stderr.strip()}"
    try:
        q = sh("tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst", "32kb",
               "latency", TBF_LATENCY, check=False)
        if q.returncode != 0:
            return False, f"the tbf qdisc is not available: {q.stderr.strip()}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return True, ""


def list_namespaces(prefix: str) -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def delete_namespace(name: str) -> None:
    """Stop the processes still inside ``name`` (started there by this script), then delete it."""
    pids = [int(x) for x in sh("ip", "netns", "pids", name, check=False).stdout.split()]
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
            time.sleep(0.05)
        if not pids:
            break
    sh("ip", "netns", "del", name, check=False)


def cleanup_leftovers(prefix: str = NS_PREFIX) -> list[str]:
    """Delete every namespace whose name starts with ``prefix`` (leftovers of crashed runs)."""
    names = list_namespaces(prefix)
    for n in names:
        delete_namespace(n)
    return names


# --------------------------------------------------------------------------------- topology
class SlowNetwork:
    """M worker namespaces on one bridge (in a hub namespace), each link rate-limited both ways.

    ``with SlowNetwork(4) as net: net.set_rate("20mbit"); argv = net.exec_prefix(0) + [...]``.
    Worker i has address ``net.addr(i)`` on interface ``net.worker_if[i]``. ``teardown()`` is
    idempotent and also runs at interpreter exit.
    """

    def __init__(self, world_size: int, prefix: str = NS_PREFIX, subnet: str = SUBNET):
        if not 1 <= world_size <= 200:
            raise ValueError(f"world_size must be in [1, 200], got {world_size}")
        self.world_size, self.subnet = world_size, subnet
        pid = os.getpid()
        self.prefix = f"{prefix}{pid}-"
        self.hub = f"{self.prefix}hub"
        self.worker_ns = [f"{self.prefix}w{i}" for i in range(world_size)]
        tag = f"sn{pid}"  # interface names: <= 2 + 7 + 1 + 3 = 13 characters
        self.bridge = f"{tag}br"
        self.worker_if = [f"{tag}w{i}" for i in range(world_size)]
        self.bridge_if = [f"{tag}b{i}" for i in range(world_size)]
        self.rate: str | None = None
        self._up = False

    def addr(self, rank: int) -> str:
        return f"{self.subnet}.{rank + 1}"

    def exec_prefix(self, rank: int) -> list[str]:
        """argv prefix that runs a command inside worker ``rank``'s namespace."""
        return ["ip", "netns", "exec", self.worker_ns[rank]]

    def namespaces(self) -> list[str]:
        return [self.hub, *self.worker_ns]

    # ---------------------------------------------------------------------- lifecycle
    def __enter__(self) -> SlowNetwork:  # noqa: PYI034 (Self needs Python 3.11)
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        used = sh("ip", "-4", "-o", "addr", "show").stdout + sh("ip", "-4", "route", "show", "table", "all",
                                                               check=False).stdout
        if re.search(rf"\b{re.escape(self.subnet)}\.", used):
            raise RuntimeError(f"{self.subnet}.0/24 is already in use in the root namespace; pick another subnet")
        atexit.register(self.teardown)
        self._up = True
        try:
            sh("ip", "netns", "add", self.hub)
            sh("ip", "-n", self.hub, "link", "add", self.bridge, "type", "bridge")
            sh("ip", "-n", self.hub, "link", "set", self.bridge, "up")
            for i, ns in enumerate(self.worker_ns):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                # both ends are created inside the hub / worker namespaces: nothing in the root one
                sh("ip", "-n", self.hub, "link", "add", self.bridge_if[i], "type", "veth", "peer", "name",
                   self.worker_if[i], "netns", ns)
                sh("ip", "-n", self.hub, "link", "set", self.bridge_if[i], "master", self.bridge)
                sh("ip", "-n", self.hub, "link", "set", self.bridge_if[i], "up")
                sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", self.worker_if[i])
                sh("ip", "-n", ns, "link", "set", self.worker_if[i], "up")
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        if not self._up:
            return
        self._up = False
        for ns in reversed(self.namespaces()):
            delete_namespace(ns)
        atexit.unregister(self.teardown)

    # --------------------------------------------------------------------------- rate
    def _links(self):
        for i in range(self.world_size):
            yield self.worker_ns[i], self.worker_if[i]  # worker -> bridge
            yield self.hub, self.bridge_if[i]  # bridge -> worker

    def set_rate(self, rate: str | None) -> None:
        """Limit every link to ``rate`` (tc syntax, e.g. '20mbit') both ways; None / 'unlimited': no qdisc."""
        if rate is None or rate == UNLIMITED:
            for ns, dev in self._links():
                sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)  # none there: fine
            self.rate = None
            return
        burst = tbf_burst(rate)
        for ns, dev in self._links():
            sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst),
               "latency", TBF_LATENCY)
        self.rate = rate

    def qdiscs(self, rank: int) -> dict[str, str]:
        """`tc qdisc show` of worker ``rank``'s two link ends."""
        return {"worker_side": sh("tc", "-n", self.worker_ns[rank], "qdisc", "show", "dev", self.worker_if[rank]).stdout,
                "bridge_side": sh("tc", "-n", self.hub, "qdisc", "show", "dev", self.bridge_if[rank]).stdout}


# ---------------------------------------------------------------------------- subprocesses
_LIVE: set[subprocess.Popen] = set()


class Terminated(BaseException):
    """SIGTERM / SIGHUP (SIGINT raises KeyboardInterrupt): unwinds through every ``finally``."""


def _on_signal(signum: int, _frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    atexit.register(kill_all)


def spawn(argv: list[str], log_path: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``argv`` in its own process group (so it can be stopped with its children)."""
    kw = {"stderr": subprocess.STDOUT, "text": True, "start_new_session": True, "env": env,
          "cwd": Path(__file__).resolve().parent.parent}
    if log_path is None:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, **kw)
    else:
        with open(log_path, "w") as out:
            p = subprocess.Popen(argv, stdout=out, **kw)
    _LIVE.add(p)
    return p


def kill(p: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL the process group of ``p`` (only while ``p`` is unreaped: its pid is ours)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if p.poll() is not None:
            break
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            pass
    _LIVE.discard(p)


def kill_all() -> None:
    for p in list(_LIVE):
        kill(p)


def wait_all(procs: list[subprocess.Popen], timeout_s: float, grace_s: float = 60.0) -> tuple[list[float | None], str | None]:
    """Wait for every process; returns (exit time of each since now, error or None).

    A process that fails gives the others ``grace_s`` to notice before they are stopped; past
    ``timeout_s`` all are stopped.
    """
    t0 = time.perf_counter()
    ends: list[float | None] = [None] * len(procs)
    first_fail: float | None = None
    error = None
    while any(e is None for e in ends):
        now = time.perf_counter() - t0
        for i, p in enumerate(procs):
            if ends[i] is None and p.poll() is not None:
                ends[i] = now
                _LIVE.discard(p)
                if p.returncode != 0 and first_fail is None:
                    first_fail = now
        if now > timeout_s or (first_fail is not None and now > first_fail + grace_s):
            error = f"timed out after {now:.0f} s" if first_fail is None else "a process failed"
            for i, p in enumerate(procs):
                if ends[i] is None:
                    kill(p)
            break
        time.sleep(0.1)
    if error is None and any(p.returncode != 0 for p in procs):
        error = "a process failed"
    return ends, error


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ------------------------------------------------------------------- network measurements
_PYENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

TRANSFER = r"""
import socket, sys, time
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept(); got = 0
    while got < n:
        b = c.recv(1 << 20)
        if not b: break
        got += len(b)
    c.sendall(b"k")
else:
    for _ in range(200):
        try: c = socket.create_connection((host, port)); break
        except OSError: time.sleep(0.05)
    buf = b"x" * (1 << 20); t0 = time.perf_counter(); sent = 0
    while sent < n:
        k = min(len(buf), n - sent); c.sendall(buf[:k]); sent += k
    c.recv(1); print(time.perf_counter() - t0)
"""

PINGPONG = r"""
import socket, statistics, sys, time
mode, host, port, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(reps + 10): c.sendall(c.recv(1))
else:
    for _ in range(200):
        try: c = socket.create_connection((host, port)); break
        except OSError: time.sleep(0.05)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); ts = []
    for i in range(reps + 10):
        t0 = time.perf_counter(); c.sendall(b"p"); c.recv(1)
        if i >= 10: ts.append(time.perf_counter() - t0)
    print(statistics.median(ts))
"""

ALLREDUCE = r"""
import datetime, json, sys, time, torch, torch.distributed as dist
rank, world, addr, port, numel, reps = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                                         int(sys.argv[5]), int(sys.argv[6]))
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=120))
x = torch.full((numel,), float(rank + 1))
for _ in range(3): dist.all_reduce(x)
ts = []
for _ in range(reps):
    dist.barrier(); t0 = time.perf_counter(); dist.all_reduce(x); ts.append(time.perf_counter() - t0)
t = torch.tensor(ts, dtype=torch.float64); dist.all_reduce(t, op=dist.ReduceOp.MAX)
y = torch.full((4,), float(rank + 1)); dist.all_reduce(y)
if rank == 0: print(json.dumps({"seconds_max_over_ranks": t.tolist(), "check_sum": y[0].item()}))
dist.destroy_process_group()
"""

_port = 29400


def next_port() -> int:
    """A port on worker 0's fresh namespace (nothing else listens there); a new one per launch
    so that no TIME_WAIT socket of the previous run is in the way."""
    global _port
    _port += 1
    return _port


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **_PYENV, **(extra or {})}


def _pair(net: SlowNetwork, script: str, server: int, client: int, args: list[str], timeout: float) -> str:
    """Run ``script`` as a server in ``server``'s namespace and a client in ``client``'s; client stdout."""
    port = str(next_port())
    srv = spawn(net.exec_prefix(server) + [sys.executable, "-c", script, "server", net.addr(server), port, *args],
                env=_env())
    try:
        assert srv.stdout is not None
        if srv.stdout.readline().strip() != "ready":
            raise RuntimeError(f"server in {net.worker_ns[server]} did not start")
        cli = subprocess.run(net.exec_prefix(client) + [sys.executable, "-c", script, "client", net.addr(server),
                                                        port, *args],
                             check=False, capture_output=True, text=True, timeout=timeout, env=_env())
        if cli.returncode != 0:
            raise RuntimeError(f"client failed: {cli.stderr[-2000:]}")
        srv.wait(timeout)
        return cli.stdout.strip()
    finally:
        kill(srv)


def transfer_seconds(net: SlowNetwork, src: int, dst: int, nbytes: int, timeout: float = 120.0) -> float:
    """Seconds to send ``nbytes`` over TCP from worker ``src`` to worker ``dst`` (until acknowledged)."""
    return float(_pair(net, TRANSFER, dst, src, [str(nbytes)], timeout))


def rtt_seconds(net: SlowNetwork, a: int = 0, b: int = 1, reps: int = 200) -> float:
    """Median TCP round trip (1 byte each way, TCP_NODELAY) between workers ``a`` and ``b``."""
    return float(_pair(net, PINGPONG, b, a, [str(reps)], 60.0))


def gloo_allreduce(net: SlowNetwork, numel: int, reps: int, timeout: float = 300.0) -> dict[str, Any]:
    """All ranks all-reduce ``numel`` fp32 over gloo across the namespaces (tcp:// init at worker 0).

    Returns rank 0's JSON: the per-rep time of the slowest rank and a check sum (= M(M+1)/2).
    """
    port = str(next_port())
    procs = [spawn(net.exec_prefix(r) + ["env", f"GLOO_SOCKET_IFNAME={net.worker_if[r]}", sys.executable, "-c",
                                         ALLREDUCE, str(r), str(net.world_size), net.addr(0), port, str(numel),
                                         str(reps)], env=_env())
             for r in range(net.world_size)]
    try:
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            _LIVE.discard(p)
            if p.returncode != 0:
                raise RuntimeError(f"gloo all-reduce rank failed ({p.returncode}): {out[-2000:]}")
            outs.append(out)
        lines = [ln for ln in outs[0].splitlines() if ln.startswith("{")]  # stderr is merged in
        if not lines:
            raise RuntimeError(f"gloo all-reduce: rank 0 printed no result: {outs[0][-2000:]}")
        return json.loads(lines[-1])
    finally:
        for p in procs:
            kill(p)


# ------------------------------------------------------------------------------------ arms
@dataclass
class Arm:
    name: str
    args: list[str]
    needs: str | None = None  # a `desloc train` flag this arm depends on
    skipped: str | None = None


def make_arms(a: argparse.Namespace, help_text: str) -> list[Arm]:
    periods = ["--kx", str(a.kx), "--ku", str(a.ku), "--kv", str(a.kv)]
    arms = [
        Arm("ddp", ["--method", "ddp"]),
        Arm("local-adam", ["--method", "local-adam", "--kx", str(a.kx)]),
        Arm("desloc-blocking", ["--method", "desloc", *periods, "--no-overlap"], needs="--no-overlap"),
        Arm("desloc", ["--method", "desloc", *periods]),
        Arm(f"desloc-delay{a.param_delay}", ["--method", "desloc", *periods, "--param-delay", str(a.param_delay)],
            needs="--param-delay"),
        Arm("diloco", ["--method", "diloco", "--kx", str(a.h)]),
        # issue 20: --stream picks fragments and delays from the link ({network}: this rate's nominal link, the
        # host's measured rate for `unlimited`) and the measured compute-only step ({step_time})
        Arm("desloc-stream", ["--method", "desloc", *periods, "--stream", "--network", "{network}",
                              "--step-time", "{step_time}"], needs="--stream"),
        Arm("desloc-stream-int8", ["--method", "desloc", *periods, "--stream", "--compress", "int8",
                                   "--network", "{network}", "--step-time", "{step_time}"], needs="--compress"),
    ]
    if a.arms:
        wanted = a.arms.split(",")
        unknown = set(wanted) - {x.name for x in arms}
        if unknown:
            raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {[x.name for x in arms]}")
        arms = [x for x in arms if x.name in wanted]
    for arm in arms:
        if arm.needs and not re.search(rf"(^|[\s,]){re.escape(arm.needs)}\b", help_text):
            arm.skipped = f"`desloc train --help` does not list {arm.needs} (not in this desloc yet)"
            log(f"skipping arm {arm.name}: {arm.skipped}")
    return arms


def common_args(a: argparse.Namespace) -> list[str]:
    """Identical in every run (timed, compute-only, prediction): the same tokens."""
    return ["--model", a.model, "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seed", str(a.seed),
            "--eval-every", str(a.steps), "--eval-batches", str(a.eval_batches), "--log-every", str(a.steps),
            "--ckpt-every", str(a.steps)]


def read_summary(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def drop_checkpoints(out: Path) -> None:
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def desloc_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "desloc", "train", *args]


# ------------------------------------------------------------------------------------ runs
def timed_run(net: SlowNetwork, a: argparse.Namespace, arm: Arm, rundir: Path,
              subs: dict[str, str] | None = None) -> dict[str, Any]:
    """One arm at the network's current rate: 4 torchruns, one per namespace, one shared --out.
    ``subs`` fills the arm's placeholders ({network}, {step_time})."""
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    out = rundir / "out"
    port = str(next_port())
    procs, logs, argvs = [], [], []
    train_args = ["--backend", "gloo", "--workers", str(net.world_size), "--out", str(out), "--overwrite",
                  "--timeout", str(a.collective_timeout), *common_args(a),
                  *[x.format(**subs) if subs else x for x in arm.args]]
    t0 = time.perf_counter()
    for i in range(net.world_size):
        argv = net.exec_prefix(i) + [
            "env", f"GLOO_SOCKET_IFNAME={net.worker_if[i]}", "OMP_NUM_THREADS=1",
            str(BIN / "torchrun"), "--nnodes", str(net.world_size), "--node-rank", str(i), "--nproc-per-node", "1",
            "--rdzv-backend", "static", "--master-addr", net.addr(0), "--master-port", port,
            "--local-addr", net.addr(i), "-m", "desloc", "train", *train_args]
        logs.append(rundir / f"rank{i}.log")
        argvs.append(argv)
        procs.append(spawn(argv, logs[-1], env=_env()))
    ends, error = wait_all(procs, a.run_timeout)
    process_wall = time.perf_counter() - t0
    summary = read_summary(out)
    if error is None and summary is None:
        error = "no summary.json"
    rec: dict[str, Any] = {
        "ok": error is None,
        "train_wall_s": summary.get("wall_time_s") if summary else None,
        "process_wall_s": process_wall,
        "rank_exit_s": ends,
        "returncodes": [p.returncode for p in procs],
        "bytes_sent": summary.get("bytes_sent") if summary else None,
        "final_val_loss": summary.get("final_val_loss") if summary else None,
        "tokens": summary.get("tokens") if summary else None,
        "command_rank0": " ".join(argvs[0]),
    }
    try:  # the method as the run resolved it (--stream's choice included): what the prediction replays
        rec["method"] = json.loads((out / "config.json").read_text())["method"]
    except (OSError, ValueError, KeyError):
        rec["method"] = None
    if summary and summary.get("stream"):
        rec["stream"] = summary["stream"]
    if error is not None:
        rec["error"] = error
        rec["log_tails"] = {f"rank{i}": tail(lg) for i, (lg, p) in enumerate(zip(logs, procs))
                            if p.returncode != 0 or summary is None}
    drop_checkpoints(out)
    return rec


def compute_only(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """4 concurrent single-worker simulator runs (nothing communicates): the same tokens per worker."""
    procs, outs, logs = [], [], []
    t0 = time.perf_counter()
    for i in range(a.world_size):
        out = workdir / "compute_only" / f"p{i}"
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        outs.append(out)
        logs.append(workdir / "compute_only" / f"p{i}.log")
        procs.append(spawn(desloc_cmd(["--backend", "sim", "--workers", "1", "--out", str(out), *common_args(a),
                                       "--method", "local-adam", "--kx", str(a.kx)]), logs[-1], env=_env()))
    _, error = wait_all(procs, a.run_timeout)
    process_wall = time.perf_counter() - t0
    sums = [read_summary(o) for o in outs]
    if error is not None or any(s is None for s in sums):
        raise RuntimeError(f"compute-only runs failed ({error}): {tail(logs[0])}")
    walls = [s["wall_time_s"] for s in sums]
    for o in outs:
        drop_checkpoints(o)
    return {"wall_time_s": walls, "median_s": statistics.median(walls), "max_s": max(walls),
            "process_wall_s": process_wall, "params": sums[0]["params"], "tokens_per_process": sums[0]["tokens"],
            "method": f"local-adam --kx {a.kx}, --backend sim --workers 1, {a.world_size} processes at once"}


def trial_run(workdir: Path, extra: list[str]) -> tuple[subprocess.CompletedProcess, dict[str, Any] | None]:
    """A 1-step, 2-worker simulator run (seconds): warms the corpus cache, or probes a flag."""
    out = workdir / "trial"
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run(desloc_cmd(["--backend", "sim", "--method", "ddp", "--workers", "2", "--steps", "1",
                                   "--batch-size", "1", "--eval-batches", "1", "--out", str(out), *extra]),
                       check=False, capture_output=True, text=True, env=_env(), timeout=600)
    s = read_summary(out)
    shutil.rmtree(out, ignore_errors=True)
    return p, s


def network_supports_custom(workdir: Path) -> tuple[bool, str]:
    """Does `desloc train --network RATE:LATENCY` work? A 1-step trial run decides."""
    p, s = trial_run(workdir, ["--network", "20mbit:0.1ms"])
    if p.returncode == 0 and s is not None and s.get("modeled_time_s") is not None:
        return True, ""
    err = (p.stderr.strip().splitlines() or ["?"])[-1]
    return False, f"`desloc train --network 20mbit:0.1ms` is not supported by this desloc ({err})"


def network_spec(bps: float, latency_s: float) -> str:
    """desloc's custom link: integer kbit and integer microseconds."""
    return f"{max(1, round(bps / 1e3))}kbit:{round(latency_s * 1e6)}us"


def replay_modeled_time(arm: Arm, a: argparse.Namespace, n_params: int, step_time: float, spec: str,
                        method: dict[str, Any] | None = None) -> float:
    """The time model's prediction for an arm: desloc's own VirtualClock driven by the method's
    own syncs (the optimizer, schedule and communicator of `desloc train`), with one flat
    parameter of the model's size and zero gradients -- the clock sees only bytes per call, so
    skipping forward/backward changes nothing but the seconds it takes (about one, not minutes)."""
    import torch

    from desloc.algorithms import MethodConfig, build_method
    from desloc.comm import SimulatedComm
    from desloc.optim import InnerConfig
    from desloc.timing import TimeModel, VirtualClock, profile

    args = list(arm.args)
    fields: dict[str, Any] = {"overlap": "--no-overlap" not in args}
    names = {"--method": "name", "--kx": "period_x", "--ku": "period_u", "--kv": "period_v",
             "--param-delay": "param_delay"}
    for flag, value in zip(args, args[1:]):
        if flag in names:
            fields[names[flag]] = value if flag == "--method" else int(value)
    if fields["name"] == "ddp":
        fields.pop("overlap")
    if method is not None:  # the run's own resolved method config (config.json)
        fields = {k: v for k, v in method.items() if k != "stream"}
    cfg = MethodConfig(**fields)
    x = torch.zeros(a.world_size, n_params)
    icfg = InnerConfig("adamw")
    opt = build_method(cfg, icfg.build([x]), SimulatedComm(a.world_size), icfg.state_roles(), total_steps=a.steps)
    clock = VirtualClock(TimeModel(profile(spec), step_time, a.world_size))
    opt.comm.add_listener(clock)
    grad = torch.zeros_like(x)
    for t in range(a.steps):
        x.grad = grad
        clock.local_step(list(range(a.world_size)))
        opt.step()
        if t + 1 == a.steps:
            opt.finish_syncs()  # as `desloc train` does at the last step
    return clock.now


def predict(a: argparse.Namespace, arm: Arm, spec: str, step_time: float, n_params: int,
            method: dict[str, Any] | None, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Modeled time of an arm's run (its resolved method, when recorded) on network ``spec``
    (:func:`replay_modeled_time`), computed once per distinct (method, spec)."""
    key = json.dumps([arm.name if method is None else method, spec], sort_keys=True)
    if key not in cache:
        try:
            cache[key] = {"modeled_time_s": replay_modeled_time(arm, a, n_params, step_time, spec, method)}
        except Exception as exc:  # noqa: BLE001 - recorded, the other predictions go on
            cache[key] = {"modeled_time_s": None, "error": repr(exc)}
        log(f"prediction {arm.name} @ {spec}: {cache[key]['modeled_time_s']}")
    return cache[key]


# --------------------------------------------------------------------------------- report
def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def summarize(rows: dict[str, dict[str, dict[str, Any]]], compute: dict[str, Any]) -> None:
    """Add medians over reps, speedup vs ddp at the same rate, ratio to compute-only, prediction error."""
    for per_arm in rows.values():
        for row in per_arm.values():
            ok = [r for r in row["reps"] if r["ok"]]
            row["train_wall_s"] = _median([r["train_wall_s"] for r in ok])
            row["process_wall_s"] = _median([r["process_wall_s"] for r in ok])
            row["ok_reps"] = len(ok)
        ddp = per_arm.get("ddp", {})
        for row in per_arm.values():
            row["speedup_vs_ddp_train"] = _ratio(ddp.get("train_wall_s"), row["train_wall_s"])
            row["speedup_vs_ddp_process"] = _ratio(ddp.get("process_wall_s"), row["process_wall_s"])
            row["compute_only_s"] = compute["median_s"]
            row["ratio_to_compute_only"] = _ratio(row["train_wall_s"], compute["median_s"])
            for kind in ("nominal", "calibrated"):
                pred = row.get(f"predicted_{kind}_s")
                row[f"prediction_error_{kind}"] = (pred / row["train_wall_s"] - 1
                                                   if pred is not None and row["train_wall_s"] else None)


def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def table(rows: dict[str, dict[str, dict[str, Any]]], compute: dict[str, Any]) -> str:
    lines = [(f"compute-only (same tokens, 4 processes at once): median {compute['median_s']:.1f} s, "
              f"max {compute['max_s']:.1f} s"),
             (f"{'rate':>9} {'arm':<16} {'train s':>8} {'proc s':>7} {'vs ddp':>7} {'x comp':>7} "
              f"{'pred nom':>8} {'err':>6} {'pred cal':>8} {'err':>6}  val loss")]
    for rate, per_arm in rows.items():
        for arm, r in per_arm.items():
            lines.append(
                f"{rate:>9} {arm:<16} {_fmt(r['train_wall_s']):>8} {_fmt(r['process_wall_s']):>7} "
                f"{_fmt(r['speedup_vs_ddp_train'], '.2f', 'x'):>7} {_fmt(r['ratio_to_compute_only'], '.2f', 'x'):>7} "
                f"{_fmt(r.get('predicted_nominal_s')):>8} {_fmt(r['prediction_error_nominal'], '+.0%'):>6} "
                f"{_fmt(r.get('predicted_calibrated_s')):>8} {_fmt(r['prediction_error_calibrated'], '+.0%'):>6}  "
                f"{_fmt(_median([x['final_val_loss'] for x in r['reps'] if x['ok']]), '.4f')}"
                + ("" if r["ok_reps"] == len(r["reps"]) else f"  ({len(r['reps']) - r['ok_reps']} FAILED)"))
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, dict[str, Any]]], compute: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rates = list(rows)
    arms = list(dict.fromkeys(arm for per_arm in rows.values() for arm in per_arm))
    width = 0.8 / max(1, len(arms))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rates), 4.5))
    for j, arm in enumerate(arms):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(rates))]
        ys = [rows[r].get(arm, {}).get("train_wall_s") or float("nan") for r in rates]
        ax.bar(xs, ys, width, label=arm)
        preds = [rows[r].get(arm, {}).get("predicted_calibrated_s") or float("nan") for r in rates]
        ax.plot(xs, preds, "k_", markersize=10, label="predicted (calibrated)" if j == 0 else None)
    ax.axhline(compute["median_s"], color="k", linestyle="--", linewidth=1, label="compute only")
    ax.set_xticks(range(len(rates)), rates)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())  # plain numbers, not 10^x
    ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_ylabel("training loop wall time (s)")
    ax.set_xlabel("per-link rate (each direction)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 steps, periods 4/8/16, one rate: a plumbing smoke test")
    p.add_argument("--cleanup", action="store_true", help=f"delete namespaces named {NS_PREFIX}* and exit")
    p.add_argument("--rates", default=None, help="tc rates, comma-separated (default 20mbit,100mbit,1gbit)")
    p.add_argument("--no-unlimited", action="store_true", help="skip the arm without any qdisc")
    p.add_argument("--arms", default=None, help="subset of the arms, comma-separated")
    p.add_argument("--steps", type=int, default=None, help="default 96 (16 with --quick)")
    p.add_argument("--kx", type=int, default=None, help="local-adam K, desloc K_x (default 16; quick 4)")
    p.add_argument("--ku", type=int, default=None, help="desloc K_u (default 48; quick 8)")
    p.add_argument("--kv", type=int, default=None, help="desloc K_v (default 96; quick 16)")
    p.add_argument("--h", type=int, default=None, help="diloco H (default 16; quick 4)")
    p.add_argument("--param-delay", type=int, default=None, help="desloc --param-delay D (default 4; quick 2)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=1, help="timed runs per (rate, arm); arm order reversed every rep")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--collective-timeout", type=float, default=1800.0, help="desloc train --timeout")
    p.add_argument("--run-timeout", type=float, default=3600.0, help="stop a run (all ranks) after this long")
    p.add_argument("--allreduce-reps", type=int, default=20, help="reps of the host-rate calibration")
    p.add_argument("--no-predict", action="store_true", help="skip the time model's predictions")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "desloc-slow-network"))
    p.add_argument("--record", default=None, help="record name (default slow_network / slow_network_quick)")
    a = p.parse_args(argv)
    quick = {"steps": 16, "kx": 4, "ku": 8, "kv": 16, "h": 4, "param_delay": 2, "rates": "100mbit"}
    full = {"steps": 96, "kx": 16, "ku": 48, "kv": 96, "h": 16, "param_delay": 4, "rates": "20mbit,100mbit,1gbit"}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.record = a.record or ("slow_network_quick" if a.quick else "slow_network")
    a.rate_list = [r.strip() for r in a.rates.split(",") if r.strip()]
    for r in a.rate_list:
        rate_bps(r)  # fail early on a malformed rate
    if not a.no_unlimited:
        a.rate_list.append(UNLIMITED)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    ok, why = netns_available()
    if not ok:
        print(f"slow_network: skipped: {why}")
        return 0
    if a.cleanup:
        names = cleanup_leftovers()
        print(f"slow_network: removed {len(names)} namespace(s): {' '.join(names) or '-'}")
        return 0
    install_signal_handlers()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    help_text = subprocess.run(desloc_cmd(["--help"]), check=False, capture_output=True, text=True,
                               env=_env()).stdout
    p, _ = trial_run(workdir, [])  # builds the tokenizer / token cache once, before 4 processes need it
    if p.returncode != 0:
        raise SystemExit(f"slow_network: `desloc train` does not run here: {p.stderr[-2000:]}")
    arms = make_arms(a, help_text)
    live_arms = [arm for arm in arms if not arm.skipped]
    notes: list[str] = [f"arm {arm.name} skipped: {arm.skipped}" for arm in arms if arm.skipped]
    custom_ok, custom_why = (False, "--no-predict") if a.no_predict else network_supports_custom(workdir)
    if not custom_ok:
        notes.append(f"predictions are null: {custom_why}")
        log(notes[-1])

    rows: dict[str, dict[str, dict[str, Any]]] = {r: {} for r in a.rate_list}
    try:
        log(f"compute-only: {a.world_size} concurrent single-worker simulator runs, {a.steps} steps")
        compute = compute_only(a, workdir)
        log(f"compute-only: median {compute['median_s']:.1f} s, max {compute['max_s']:.1f} s")
        param_bytes = compute["params"] * 4  # fp32
        with SlowNetwork(a.world_size) as net:
            net.set_rate(None)
            rtt = rtt_seconds(net)
            cal = gloo_allreduce(net, compute["params"], a.allreduce_reps)
            expect = a.world_size * (a.world_size + 1) / 2
            if cal["check_sum"] != expect:
                raise RuntimeError(f"calibration all-reduce gave {cal['check_sum']}, expected {expect}")
            t_ar = statistics.median(cal["seconds_max_over_ranks"])
            wire = 2 * (a.world_size - 1) / a.world_size * param_bytes
            host_bps = 8 * wire / t_ar
            log(f"rtt {rtt * 1e6:.0f} us; host all-reduce of {param_bytes / 1e6:.2f} MB: {t_ar * 1e3:.1f} ms "
                f"= {host_bps / 1e9:.2f} Gbit/s per link (ring)")
            qdisc_shown = {}
            stream_net = {r: network_spec(rate_bps(r) if r != UNLIMITED else host_bps, rtt / 2) for r in a.rate_list}
            for rep in range(a.reps):
                order = live_arms if rep % 2 == 0 else live_arms[::-1]
                for rate in a.rate_list:
                    net.set_rate(rate)
                    qdisc_shown[rate] = net.qdiscs(0)
                    for arm in order:
                        t0 = time.perf_counter()
                        res = timed_run(net, a, arm, workdir / "runs" / rate / arm.name,
                                        {"network": stream_net[rate], "step_time": f"{compute['median_s'] / a.steps:.4f}"})
                        row = rows[rate].setdefault(arm.name, {"args": arm.args, "reps": []})
                        row["reps"].append(res)
                        log(f"rate {rate:>9} arm {arm.name:<16} rep {rep}: "
                            + (f"train {res['train_wall_s']:.1f} s, process {res['process_wall_s']:.1f} s, "
                               f"val {res['final_val_loss']:.4f}" if res["ok"] else f"FAILED ({res['error']})")
                            + f" [{time.perf_counter() - t0:.0f} s]")
        # namespaces are gone from here on; the predictions are simulator runs
        latency = rtt / 2
        specs_nom = {r: network_spec(rate_bps(r), latency) for r in a.rate_list if r != UNLIMITED}
        specs_cal = {r: network_spec(min(rate_bps(r), host_bps) if r != UNLIMITED else host_bps, latency)
                     for r in a.rate_list}
        step_time = compute["median_s"] / a.steps
        cache: dict[str, dict[str, Any]] = {}
        by_name = {arm.name: arm for arm in live_arms}
        for rate, per_arm in rows.items():
            for arm_name, row in per_arm.items():
                method = next((r.get("method") for r in row["reps"] if r.get("ok") and r.get("method")), None)
                for kind, specs in (("nominal", specs_nom), ("calibrated", specs_cal)):
                    spec = specs.get(rate)
                    row[f"network_{kind}"] = spec
                    pr = (predict(a, by_name[arm_name], spec, step_time, compute["params"], method, cache)
                          if spec and custom_ok else None)
                    row[f"predicted_{kind}_s"] = pr["modeled_time_s"] if pr else None
                    if pr and pr.get("error"):
                        row[f"prediction_{kind}_error_log"] = pr["error"]
        summarize(rows, compute)
    finally:
        kill_all()

    text = table(rows, compute)
    print(text)
    record = {
        "config": {k: v for k, v in vars(a).items() if k not in ("cleanup",)},
        "quick": a.quick,
        "world_size": a.world_size,
        "threads_per_process": 1,
        "tbf": {"burst_bytes": {r: tbf_burst(r) for r in a.rate_list if r != UNLIMITED}, "latency": TBF_LATENCY,
                "burst_rule": "max(rate * 1 ms, 32 KiB)", "qdisc_shown_rank0": qdisc_shown},
        "topology": f"hub namespace with a bridge; {a.world_size} worker namespaces, veth to the bridge, "
                    f"{SUBNET}.(i+1)/24; tbf on both veth ends",
        "arms": [{"name": arm.name, "args": arm.args, "skipped": arm.skipped} for arm in arms],
        "common_args": common_args(a),
        "compute_only": compute,
        "network": {"rtt_s": rtt, "latency_s_used": latency, "param_bytes": param_bytes,
                    "allreduce_s_max_over_ranks": cal["seconds_max_over_ranks"], "allreduce_median_s": t_ar,
                    "ring_bytes_per_link": wire, "host_rate_bps": host_bps},
        "prediction": {"supported": custom_ok, "step_time_s": step_time, "specs_nominal": specs_nom,
                       "specs_calibrated": specs_cal,
                       "error_definition": "predicted / measured training-loop wall time - 1"},
        "results": rows,
        "notes": notes,
        "table": text,
        "total_seconds": time.perf_counter() - t_start,
    }
    path = write_record(a.record, record)
    png = RESULTS_DIR / f"{a.record}.png"
    plot(rows, compute, png, f"M={a.world_size} gloo ranks over tbf-limited links, {a.model}, {a.steps} steps"
                             f"{' (quick)' if a.quick else ''}")
    print(f"wrote {path} and {png} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Terminated) as e:  # the namespaces are gone by now (finally / __exit__)
        print(f"slow_network: interrupted ({str(e) or 'SIGINT'}); no record written", file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 143)
