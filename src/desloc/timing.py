r"""Time: a compute and network model, and a virtual clock driven by the engine's own events.

Compute. One local step of worker w takes ``c_w = step_time_s / worker_speeds[w]``. The step time
is given (``step_time_s``, e.g. measured) or derived from FLOPs::

    step_time_s = 6 * params * tokens_per_worker_step / (peak_flops * mfu)

Network (alpha-beta). Worker w's link carries ``B_w = bandwidth * link_speeds[w]`` bytes/s; every
message pays the latency alpha. A ring all-reduce of a payload of n bytes per worker over the
participants P (M = |P|) moves 2(M-1)/M n bytes through every link in 2(M-1) latency hops, at
the pace of the slowest link::

    T_allreduce(n, P) = 2 (M-1) alpha + 2 (M-1)/M * n / min_{w in P} B_w        (0 if M = 1)

A ring all-gather (compressed syncs: every worker receives every worker's encoded payload of n
bytes, :meth:`desloc.comm.base.Communicator.all_gather_flat`) forwards M-1 payloads of n bytes
through every link in M-1 latency hops -- an all-reduce is a reduce-scatter plus an all-gather of
n/M-byte chunks, hence its factor 2 and its 1/M::

    T_allgather(n, P) = (M-1) alpha + (M-1) * n / min_{w in P} B_w                (0 if M = 1)

so gathering a payload of n_c bytes is cheaper than all-reducing the full n bytes when
n_c / n < 2 / M (and its M-1 latencies against 2(M-1)).

A gossip round (``mix``) is point to point: worker w sends its n bytes to each of its d_w
out-peers over its own link, ``S_w = d_w n / B_w``, starting when *it* is ready (a worker that
stopped computing early starts sending early); worker i is done when its own sends and those of
the peers it receives from are through::

    t_i <- alpha + max(t_i + S_i, max_{j -> i} (t_j + S_j))

What B_w limits: a worker's *sending* rate (its uplink). Receiving is not charged: the downlink is
taken to run at the profile's rate, as on asymmetric consumer and cellular links, whose uplink is
the slow direction -- the GASLoC paper's slow-link setting. The all-reduce is charged the same
way: a ring sends 2(M-1)/M n through every participant's uplink, so the slowest uplink paces it.
``--link-speeds`` therefore scales uplinks; a link that is slow both ways (as in
``benchmarks/slow_network.py``, where tbf limits both veth ends) is modeled exactly for the
all-reduce and optimistically for gossip into it (by at most its in-degree x n / B_w a round).

Clock (:class:`VirtualClock`). Each worker has a clock t_w. A local step adds c_w to the workers
that compute it (an idle GASLoC worker adds nothing). A blocking collective moves every
participant to ``max_{w in P} t_w + T_allreduce``; a gossip round moves worker i as above, and
depends on nobody but i's peers. The events are the
Communicator's own calls (:meth:`desloc.comm.base.Communicator.add_listener`, the same calls the
ledger counts), so the model and the execution cannot drift apart. Observer traffic (logged
metrics) costs nothing in the model.

Profiles (per-link bandwidth, one-way latency) -- :data:`PROFILES`::

    datacenter     100 Gb/s    10 us
    ethernet        10 Gb/s   100 us
    cross-region     1 Gb/s    30 ms
    home           100 Mb/s    20 ms
    free           infinite     0     (communication costs nothing: the compute-only floor)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import Any

from desloc.errors import ConfigError, check_range
from desloc.topology import DEGREE


# Bounds of the time model's inputs. Inside them every modeled time stays finite (a step of at most
# 1e9 s at 1e-6 of nominal speed, a byte at 1 bit/s over a link at 1e-6 of nominal: products far below
# the float range for any number of steps a run can take); outside them a time overflows to inf or a
# subnormal input divides into one.
MIN_RATE_BPS, MAX_RATE_BPS = 1.0, 1e21  # 1 bit/s .. 1 Zb/s; "free" is the infinite network
MAX_LATENCY_S = 1e6
MAX_STEP_TIME_S = 1e9
SPEED_FACTORS = (1e-6, 1e6)  # --worker-speeds, --link-speeds
PEAK_TFLOPS = (1e-6, 1e9)
MIN_MFU = 1e-6

# The accelerators the compute model knows by name: peak dense bf16 TFLOP/s of one GPU. One table
# for every command: `train` / `compare` model a worker as one A100 unless told otherwise
# (TimeConfig), `wallclock` / `plan` a worker as a node of 8 H100s, the DES-LOC paper's setting
# (desloc.wallclock.Compute). Both use flops_step_time and the same MFU default.
ACCELERATORS = {"a100": 312.0, "h100": 989.0}
DEFAULT_MFU = 0.4
MEASURED = "measured"  # TimeConfig.step_time_s: this machine's measured step (the rule: TimeConfig)


@dataclass(frozen=True)
class NetworkProfile:
    """``bandwidth_bps``: bits per second of one worker's link; ``latency_s``: alpha."""

    name: str
    bandwidth_bps: float
    latency_s: float

    def __post_init__(self) -> None:
        if not (self.bandwidth_bps == math.inf or MIN_RATE_BPS <= self.bandwidth_bps <= MAX_RATE_BPS):
            raise ConfigError(f"network {self.name!r}: bandwidth must be in [{MIN_RATE_BPS:g}, {MAX_RATE_BPS:g}] "
                              f"bits/s (or inf: a free network), got {self.bandwidth_bps}; e.g. 10e9 for 10 Gb/s")
        if not (math.isfinite(self.latency_s) and 0 <= self.latency_s <= MAX_LATENCY_S):
            raise ConfigError(f"network {self.name!r}: latency must be a finite number of seconds in [0, "
                              f"{MAX_LATENCY_S:g}], got {self.latency_s}; e.g. 1e-4")

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_bps / 8

    def describe(self) -> str:
        bw = "infinite" if math.isinf(self.bandwidth_bps) else _si(self.bandwidth_bps, "b/s")
        return f"{self.name}: {bw} per link, {self.latency_s * 1e3:g} ms latency"


PROFILES: dict[str, NetworkProfile] = {
    "datacenter": NetworkProfile("datacenter", 100e9, 10e-6),
    "ethernet": NetworkProfile("ethernet", 10e9, 100e-6),
    "cross-region": NetworkProfile("cross-region", 1e9, 30e-3),
    "home": NetworkProfile("home", 100e6, 20e-3),
    "free": NetworkProfile("free", math.inf, 0.0),
}


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*(bit|kbit|mbit|gbit)(?:/s|ps)?\s*"
                   r"(?::\s*(\d+(?:\.\d+)?(?:e-?\d+)?)\s*(s|ms|us))?\s*$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def profile(name: str) -> NetworkProfile:
    """A named profile (:data:`PROFILES`), or a link written ``RATE[:LATENCY]`` such as
    ``20mbit:0.2ms`` (rates in bit/kbit/mbit/gbit per second, latency in s/ms/us; default 0)."""
    if name in PROFILES:
        return PROFILES[name]
    match = _RATE.match(str(name))
    if not match:
        raise ConfigError(f"unknown network profile {name!r}; choose one of {sorted(PROFILES)} or give a link "
                          "as RATE[:LATENCY], e.g. 20mbit:0.2ms or 1gbit")
    rate, unit, latency, tunit = match.groups()
    bps = float(rate) * _RATE_UNITS[unit.lower()]  # inf when the rate overflows (1e400gbit): refused below
    latency_s = float(latency) * _TIME_UNITS[tunit.lower()] if latency else 0.0
    if not (math.isfinite(bps) and MIN_RATE_BPS <= bps <= MAX_RATE_BPS):
        raise ConfigError(f"--network {name}: the rate must be a finite number of bits/s in [{MIN_RATE_BPS:g}, "
                          f"{MAX_RATE_BPS:g}], got {bps:g} bit/s; e.g. --network 20mbit:0.2ms (or --network free "
                          "for infinite bandwidth)")
    if not (math.isfinite(latency_s) and latency_s <= MAX_LATENCY_S):
        raise ConfigError(f"--network {name}: the latency must be a finite number of seconds <= {MAX_LATENCY_S:g}, "
                          f"got {latency_s:g} s; e.g. --network 20mbit:0.2ms")
    return NetworkProfile(str(name), bps, latency_s)


def flops_step_time(params: int, tokens_per_worker_step: int, peak_flops: float, mfu: float) -> float:
    """6 N D / (peak * MFU): seconds of one forward + backward + update on one worker."""
    if not (peak_flops > 0 and 0 < mfu <= 1):
        raise ConfigError(f"peak FLOP/s must be > 0 and MFU in (0, 1], got {peak_flops} and {mfu}; e.g. "
                          "peak 312e12 (A100 bf16) and MFU 0.4")
    return 6.0 * params * tokens_per_worker_step / (peak_flops * mfu)


def _factors(name: str, values: Sequence[float] | None, world_size: int) -> list[float]:
    if values is None:
        return [1.0] * world_size
    values = [float(v) for v in values]
    if len(values) != world_size:
        raise ConfigError(f"{name} needs one factor per worker ({world_size}), got {len(values)}: {values}; "
                          f"e.g. {','.join(['1'] * (world_size - 1) + ['0.25'])}")
    low, high = SPEED_FACTORS
    if not all(math.isfinite(v) and low <= v <= high for v in values):
        raise ConfigError(f"{name} factors must be finite numbers > 0 in [{low:g}, {high:g}], got {values}; 1 = nominal, "
                          "0.25 = four times slower")
    return values


@dataclass
class TimeModel:
    """Compute and network model of M workers. Every input can be overridden."""

    network: NetworkProfile
    step_time_s: float
    world_size: int
    worker_speeds: list[float] | None = None  # compute speed factors (1 nominal, 0.25 = 4x slower)
    link_speeds: list[float] | None = None  # bandwidth factors of each worker's link

    def __post_init__(self) -> None:
        if not (math.isfinite(self.step_time_s) and self.step_time_s >= 0):
            raise ConfigError(f"step time must be a finite number of seconds >= 0, got {self.step_time_s}")
        self.worker_speeds = _factors("--worker-speeds", self.worker_speeds, self.world_size)
        self.link_speeds = _factors("--link-speeds", self.link_speeds, self.world_size)

    def compute_time(self, worker: int) -> float:
        return self.step_time_s / self.worker_speeds[worker]

    def link_bytes_per_s(self, worker: int) -> float:
        return self.network.bytes_per_s * self.link_speeds[worker]

    def all_reduce_time(self, nbytes: float, participants: Sequence[int]) -> float:
        m = len(participants)
        if m <= 1 or nbytes <= 0:
            return 0.0
        slowest = min(self.link_bytes_per_s(w) for w in participants)
        return 2 * (m - 1) * self.network.latency_s + 2 * (m - 1) / m * nbytes / slowest

    def all_gather_time(self, nbytes: float, participants: Sequence[int]) -> float:
        """Ring all-gather of ``nbytes`` per worker: (M-1) alpha + (M-1) n / slowest link (each worker
        forwards the other M-1 payloads through its uplink, one latency hop each)."""
        m = len(participants)
        if m <= 1 or nbytes <= 0:
            return 0.0
        slowest = min(self.link_bytes_per_s(w) for w in participants)
        return (m - 1) * self.network.latency_s + (m - 1) * nbytes / slowest

    def send_time(self, worker: int, nbytes: float, n_peers: int) -> float:
        """S_w: the time worker w's link needs to push ``n_peers`` copies of ``nbytes``."""
        return n_peers * nbytes / self.link_bytes_per_s(worker) if n_peers else 0.0

    def gossip_finish(self, start: Sequence[float], nbytes: float,
                      links: Sequence[tuple[int, int]]) -> dict[int, float]:
        """When each worker of a gossip round is done, given when each was ready (``start``):
        alpha + max(t_i + S_i, max_{j -> i} (t_j + S_j))."""
        out_degree: dict[int, int] = {}
        senders: dict[int, list[int]] = {}
        for src, dst in links:
            out_degree[src] = out_degree.get(src, 0) + 1
            senders.setdefault(dst, []).append(src)
        sent = {w: start[w] + self.send_time(w, nbytes, d) for w, d in out_degree.items()}
        workers = set(out_degree) | set(senders)
        return {i: self.network.latency_s + max([sent.get(i, start[i])] + [sent[j] for j in senders.get(i, [])])
                for i in workers}

    def ddp_step_time(self, nbytes: float) -> float:
        """One DDP step: everyone waits for the slowest worker, then a full all-reduce."""
        workers = range(self.world_size)
        return max(self.compute_time(w) for w in workers) + self.all_reduce_time(nbytes, list(workers))


@dataclass
class TimeConfig:
    """How a run's time is modeled (``desloc train --network ... --worker-speeds ...``).

    network: a profile name (:data:`PROFILES`).
    worker_speeds: compute speed factor of each worker (1 nominal, 0.25 = four times slower).
    link_speeds: bandwidth factor of each worker's link (0.1 = a tenth of the profile's).
    step_time_s: seconds of one local step at speed 1; None derives it from FLOPs,
        6 * params * tokens per worker step / (peak_tflops * 1e12 * mfu), so the modeled time
        does not depend on the machine the run happens to use. "measured": this machine's own
        step -- the modeled time then reads "this run on M machines like this one, connected by
        ``network``".
    peak_tflops, mfu: the accelerator assumed for that (default A100 bf16 dense, 312, at 40%).

    The rule of ``step_time_s="measured"``: the loop times every step's forward and backward on
    this process (after a device synchronize) and divides by the workers it computed, giving one
    worker's compute per step (the optimizer's update is left out: its call also carries the
    method's communication, which the network model charges). The run's step time is the median
    of all those samples -- on torchrun the mean over ranks of each rank's median -- and every
    local step of the run costs that median: at the end the clock is replayed from its recorded
    events (:meth:`VirtualClock.replay`) at the median, and the summary's ``modeled_time_s`` and
    every metrics row's come from the replay. While the run is going the clock runs on the median
    of the samples so far, so a row read before the end (or a plot of a stopped run) is provisional.
    Not with ``--events`` (a replay across membership changes is not modeled) nor with GASLoC's
    ``--local-steps auto`` (which needs the step time before the first step).
    """

    network: str = "datacenter"
    worker_speeds: list[float] | None = None
    link_speeds: list[float] | None = None
    step_time_s: float | str | None = None
    peak_tflops: float = ACCELERATORS["a100"]
    mfu: float = DEFAULT_MFU

    def __post_init__(self) -> None:
        profile(self.network)
        for name in ("worker_speeds", "link_speeds"):
            values = getattr(self, name)
            if values is not None:
                setattr(self, name, _factors(f"--{name.replace('_', '-')}", values, len(values)))
        if self.step_time_s is not None and self.step_time_s != MEASURED:
            check_range("step_time_s (--step-time)", self.step_time_s, 0, MAX_STEP_TIME_S,
                        example="--step-time 0.25 (seconds), --step-time measured (this machine's), or drop "
                                "it to derive the step time from FLOPs")
        check_range("peak_tflops (--peak-tflops)", self.peak_tflops, *PEAK_TFLOPS, example="--peak-tflops 312 (A100)")
        check_range("mfu (--mfu)", self.mfu, MIN_MFU, 1, example="--mfu 0.4")

    @property
    def step_time_source(self) -> str:
        """Where the step time comes from: "flops" | "given" | "measured"."""
        return "flops" if self.step_time_s is None else "measured" if self.step_time_s == MEASURED else "given"

    def describe(self, model: TimeModel) -> str:
        """The network and compute model in words, for the plots of modeled time, e.g.
        ``datacenter (100 Gb/s, 0.01 ms); A100-class 312 TFLOP/s x MFU 0.4 = 12.3 ms/step``."""
        net = model.network
        bw = "free" if math.isinf(net.bandwidth_bps) else f"{_si(net.bandwidth_bps, 'b/s')}, {net.latency_s * 1e3:g} ms"
        step = f"{model.step_time_s * 1e3:.3g} ms/step"
        compute = {"flops": f"{self.peak_tflops:g} TFLOP/s x MFU {self.mfu:g} = {step}",
                   "given": f"given {step}", "measured": f"measured {step} (this machine)"}[self.step_time_source]
        return f"{net.name} ({bw}); {compute}"

    def model(self, world_size: int, params: int, tokens_per_worker_step: int) -> TimeModel:
        step = self.step_time_s
        if step == MEASURED:
            step = 0.0  # until the first step is measured (VirtualClock.measure)
        elif step is None:
            step = flops_step_time(params, tokens_per_worker_step, self.peak_tflops * 1e12, self.mfu)
        return TimeModel(profile(self.network), step, world_size, self.worker_speeds, self.link_speeds)


@dataclass
class VirtualClock:
    """Per-worker clocks advanced by local steps and by the communicator's events.

    The network is one shared resource: a collective starts when every participant is ready and
    the previous collective has left the wire (``link_free``), and lasts ``all_reduce_time`` (an
all-gather: ``all_gather_time``). A
    blocking collective holds its participants until it ends. One left in flight for k local
    steps (``hidden_steps=k``: an overlapped state sync, k = 1; a delayed parameter sync, k = d)
    lets them compute on; each waits for it after its k-th next local step, so only the part of
    the transfer longer than that compute shows (hidden traffic costs nothing when the compute is
    longer)."""

    model: TimeModel
    time: list[float] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)
    link_free: float = 0.0
    pending: list[list[float]] = field(default_factory=list)  # per worker: [steps left, end] pairs
    # --step-time measured (TimeConfig): the measured seconds of one worker's step, each sample, and
    # every event since step 0, so that the run can be replayed at the samples' median (None: not measured)
    measured: list[float] | None = None
    events: list[tuple[Any, ...]] | None = None

    def __post_init__(self) -> None:
        m = self.model.world_size
        self.time = self.time or [0.0] * m
        self.compute = self.compute or [0.0] * m
        self.pending = self.pending or [[] for _ in range(m)]

    def measure(self, seconds: float) -> None:
        """One more sample of one worker's measured compute per step; the model's step time becomes
        the median of the samples so far (provisional until :meth:`replay`)."""
        self.measured = (self.measured or []) + [float(seconds)]
        self.model.step_time_s = median(self.measured)

    def replay(self, step_time_s: float) -> tuple["VirtualClock", list[float]]:
        """The clock of the same events with every local step costing ``step_time_s``, and its
        ``now`` after each step (entry t-1: after step t and its communication, when step t's
        metrics row is logged)."""
        if self.events is None:
            raise ValueError("replay needs the recorded events of a --step-time measured run")
        model = dataclasses.replace(self.model, step_time_s=step_time_s)
        clock = VirtualClock(model, measured=list(self.measured or []), events=[])
        after: list[float] = []
        stepped = False
        for kind, *args in self.events:
            if kind == "step":
                if stepped:  # the previous step and its communication are through
                    after.append(clock.now)
                stepped = True
            getattr(clock, {"step": "local_step", "all_reduce": "on_all_reduce", "all_gather": "on_all_gather",
                            "mix": "on_mix"}[kind])(*args)
        if stepped:
            after.append(clock.now)
        return clock, after

    def local_step(self, workers: Sequence[int]) -> None:
        if self.events is not None:
            self.events.append(("step", list(workers)))
        for w in workers:
            c = self.model.compute_time(w)
            self.time[w] += c
            self.compute[w] += c
        for w, waits in enumerate(self.pending):  # a global step passes for every worker
            left = []
            for steps, end in zip(waits[0::2], waits[1::2]):
                if steps <= 1:
                    self.time[w] = max(self.time[w], end)
                else:
                    left += [steps - 1, end]
            self.pending[w] = left

    # ---- Communicator listener interface (desloc.comm.base)
    def on_all_reduce(self, nbytes: int, participants: Sequence[int], hidden_steps: int = 0) -> None:
        if self.events is not None:
            self.events.append(("all_reduce", nbytes, list(participants), hidden_steps))
        self._collective(self.model.all_reduce_time(nbytes, participants), participants, hidden_steps)

    def on_all_gather(self, nbytes: int, participants: Sequence[int], hidden_steps: int = 0) -> None:
        """An all-gather of ``nbytes`` per worker (compressed syncs): as :meth:`on_all_reduce`, lasting
        ``all_gather_time``."""
        if self.events is not None:
            self.events.append(("all_gather", nbytes, list(participants), hidden_steps))
        self._collective(self.model.all_gather_time(nbytes, participants), participants, hidden_steps)

    def _collective(self, duration: float, participants: Sequence[int], hidden_steps: int) -> None:
        """Starts when every participant is ready and the link is free; blocking or ``hidden_steps`` deferred."""
        start = max([self.link_free] + [self.time[w] for w in participants])
        end = start + duration
        self.link_free = end
        for w in participants:
            if hidden_steps:
                self.pending[w] += [hidden_steps, end]
            else:
                self.time[w] = end

    def on_mix(self, nbytes: int, links: Sequence[tuple[int, int]]) -> None:
        if self.events is not None:
            self.events.append(("mix", nbytes, [tuple(link) for link in links]))
        for i, done in self.model.gossip_finish(list(self.time), nbytes, links).items():
            self.time[i] = done

    @property
    def now(self) -> float:
        """When the last worker is done (with every transfer in flight): the run's modeled time."""
        return max(max(self.time), max((end for waits in self.pending for end in waits[1::2]), default=0.0))

    @property
    def compute_only(self) -> float:
        """The longest time any worker spent computing (the floor with free communication)."""
        return max(self.compute)

    def state_dict(self) -> dict[str, Any]:
        return {"time": list(self.time), "compute": list(self.compute), "link_free": self.link_free,
                "pending": [list(p) for p in self.pending],
                **({} if self.events is None else {"measured": list(self.measured or []), "events": list(self.events)})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.time, self.compute = [float(t) for t in state["time"]], [float(c) for c in state["compute"]]
        self.link_free = float(state.get("link_free", 0.0))
        self.pending = [list(p) for p in state.get("pending", [[] for _ in self.time])]
        if self.events is not None and "events" in state:  # --step-time measured: the samples and events so far
            self.events = [tuple(e) for e in state["events"]]
            self.measured = [float(t) for t in state["measured"]]
            if self.measured:
                self.model.step_time_s = median(self.measured)


def half_life(beta: float) -> float:
    """tau_0.5(beta) = ln 0.5 / ln beta: steps for an EMA with decay beta to halve a contribution."""
    if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
        raise ConfigError(f"beta must be in [0, 1), got {beta!r}; e.g. 0.9 (half-life 6.58 steps)")
    return 0.0 if beta == 0 else math.log(0.5) / math.log(beta)


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g} {prefix}{unit}"
    return f"{value:g} {unit}"


def exchange_time(model: TimeModel, worker: int, nbytes: float, topology: str) -> float:
    """Worker ``worker``'s own communication per GASLoC round: latency plus its sends
    (``complete``: one all-reduce of everyone)."""
    if topology == "complete":
        return model.all_reduce_time(nbytes, list(range(model.world_size)))
    degree = DEGREE[topology]
    return (model.network.latency_s + model.send_time(worker, nbytes, degree)) if degree else 0.0


def auto_local_steps(model: TimeModel, period: int, nbytes: float, topology: str) -> list[int]:
    """GASLoC's H_i so that no worker makes the others wait (the GASLoC paper's Fig. 3 rule).

    The round of the fastest worker f takes ``R = H c_f + E_f`` (H local steps, then its own
    exchange E). Worker i does as many steps as fit in the same time after its own exchange::

        H_i = clamp(floor((R - E_i) / c_i), 1, H)

    A slow processor (larger c_i) or a slow link (larger E_i) both lower H_i. E.g. with the
    exchange of one model taking 5/3 of a step at full bandwidth, a worker whose link has 10% of
    it gets H_i = 15 of H = 30 with one peer and H_i = 1 with two peers, as in the paper.
    """
    workers = range(model.world_size)
    exchange = [exchange_time(model, w, nbytes, topology) for w in workers]
    fastest = min(workers, key=lambda w: (model.compute_time(w), exchange[w]))
    round_time = period * model.compute_time(fastest) + exchange[fastest]
    out = []
    for w in workers:
        c = model.compute_time(w)
        steps = period if c == 0 else math.floor((round_time - exchange[w]) / c + 1e-9)
        out.append(int(min(period, max(1, steps))))
    return out
