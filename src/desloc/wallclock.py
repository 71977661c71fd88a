r"""Modeled wall-clock of the all-reduce methods (`desloc wallclock`) and a period planner (`desloc plan`).

A model, not a measurement: it runs nothing and times nothing. It prices each method's
communication schedule with :mod:`desloc.timing` (6 N D compute, ring all-reduce under the
alpha-beta network model).

Per step, with N parameters, b bytes per parameter on the wire, M workers of G GPUs each, peak
FLOP/s P, utilisation MFU, a global batch of B tokens (B / M per worker) and a link of
bandwidth W bytes/s and latency alpha per worker::

    compute    c = 6 N (B / M) / (G P MFU)
    all-reduce T = 2 (M-1) alpha + 2 (M-1)/M * N b / W          (one model-sized tensor)
    time/step    = c + sum_{tensors j} T / K_j                   (exact mean over a cycle)
    speedup      = time/step(ddp) / time/step(method)

Method schedules (tensor: period), all one all-reduce per tensor when it is due:

    ddp                         gradient: 1                       -> 1 model per step
    local-adam                  x, u, v: K_x                      -> 3 / K_x
    desloc                      x: K_x, u: K_u, v: K_v            -> 1/K_x + 1/K_u + 1/K_v
    keep-states, reset-states   x: K_x                            -> 1 / K_x
    diloco                      x (the pseudo-gradient): K_x = H  -> 1 / K_x
    mtdao                       x: K_x, u^j: K_j, v: K_v          -> 1/K_x + sum_j 1/K_j + 1/K_v

Because a separate all-reduce is paid for each tensor on the steps where it is due, the mean time
per step over one cycle of lcm(periods) steps is exactly ``c + sum_j T / K_j``, whatever the
periods; the total over S steps counts the syncs exactly: ``S c + sum_j floor(S / K_j) T``.
Compute and communication are not overlapped (a sync step pays both).

Fragments (``--fragments F`` in training, :class:`~desloc.algorithms.schedule.SyncSchedule`'s
``fragments``) change *when* a tensor's bytes are sent (fragment f at its own offset inside the
period), not how many are sent per period: with no overlap the mean per step above, the total and
the bytes are the same for every F, so the model takes no F.

Compression (``--compress CODEC`` or ``--compress TAG=CODEC,...``, the codecs of
:mod:`desloc.comm.codecs`; tags as the methods send them: ``params``, ``exp_avg``, ``exp_avg_sq``,
mtdao's ``exp_avg_0``, ``exp_avg_1``, ..., ddp's ``grads``; a bare codec is every tag the method
sends). A compressed tag travels as desloc sends it (:mod:`desloc.algorithms.fastsync`): with M >= 3
workers a compressed all-reduce in two halves -- each worker's message cut into M chunks encoded
(p = M nbytes_codec(ceil(N / M)): the codec's exact bytes, block scales and top-k indices
included), a reduce-scatter of the chunks and an all-gather of the reduced ones, the bytes of a
ring all-reduce of p; with M = 2 an all-gather of p = nbytes_codec(N) (the same bytes)::

    compressed  C = 2 (M-1) alpha + 2 (M-1)/M p / W    (M >= 3)      C = alpha + p / W    (M = 2)
    time/step     = c + sum_{uncompressed j} T / K_j + sum_{compressed j} C_j / K_j
    bytes/step    = sum_{uncompressed j} N b / K_j + sum_{compressed j} p_j / K_j   (per worker, sent)
    bytes ratio   = N b / bytes/step                             (vs uncompressed DDP)

The codecs encode float32, so ``p`` does not depend on b; the uncompressed tags still travel at b.
``bytes/step`` is the ledger's unit (each worker's message, :mod:`desloc.comm.ledger`). A codec
saves bandwidth time whenever p < N b (int8 at b = 2 barely: p ~= 17/16 N against 2 N).

DDP, the reference of every ratio and speedup, is always uncompressed DDP; the ddp row itself is
compressed DDP when ``--compress`` names ``grads`` or gives a bare codec (its ``vs ddp`` is then
against uncompressed DDP). A method that takes no ``--compress`` (reset-states, which zeroes its
states at each whole average) is priced uncompressed. When ``--compress`` is given (and is not
``none``) the record gets the key ``compression`` (the spec as parsed, ``{tag or "*": codec}``) and
every row gets ``compression`` (``{tag: codec}``, what that row compresses); a row that compresses
a tag also gets ``sync_s_by_tag`` (seconds of one sync of each tag). Without ``--compress`` every
output is unchanged. With the paper's periods and ``params=int4,exp_avg=int8,exp_avg_sq=int8``
DES-LOC sends ``N/16 (9/256 + 17/768 + 17/1536) = 105 N / 24576`` bytes per step (N a multiple
of 64), ``98304 / 105 = 936.23x`` fewer than fp32 DDP (``--bytes-per-param 4``).

Which assumptions move the answer. Let ``r`` be DDP's communication over its compute::

    r = T / c ~= 2 (M-1) b G P MFU / (6 B W)        (N cancels; latency is negligible at 100 Gb/s)

DES-LOC at (256, 768, 1536) sends 1/170.67 of DDP's bytes, so its speedup is
``(1 + r) / (1 + r / 170.67)``, close to ``1 + r``. Every input enters r as a factor: the number of
workers M most (2(M-1)/M grows with M and each worker's share of a fixed global batch shrinks), then
equally b, G, P, MFU, 1/B and 1/W; the model size N and the periods barely matter.
:func:`sensitivity` halves and doubles each of them. The DES-LOC paper states 1.3x-2.1x over DDP for
1B-13B models on 100 Gb/s links and did not publish its inputs: that band is r in [0.30, 1.11].

`desloc plan` (:func:`plan`) picks the periods from the betas and a target overhead; its rule is
written out in :data:`PLAN_RULE`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from desloc.errors import ConfigError, check_finite, check_int, check_period, check_range
from desloc.timing import (ACCELERATORS, DEFAULT_MFU, PROFILES, NetworkProfile, TimeModel, flops_step_time, half_life,
                           profile)



class _AllReduceMethods(Sequence[str]):
    """The registered methods that all-reduce (every one but the gossiping ones), in registry
    order, read live: a method registered later gets a row too."""

    def _names(self) -> tuple[str, ...]:
        from desloc.algorithms import METHODS as REGISTRY

        return tuple(name for name, spec in REGISTRY.items() if not spec.gossips)

    def __getitem__(self, i):  # type: ignore[override]
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


METHODS: Sequence[str] = _AllReduceMethods()
PAPER_PERIODS = (256, 768, 1536)
PAPER_MODELS = ("1b", "7b", "13b")
PAPER_CLAIM = (1.3, 2.1)
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


# ------------------------------------------------------------------------------------ inputs
def parse_size(text: str) -> int:
    """A parameter count: ``125m``, ``1.3b``, ``7b``, ``13B``, ``7e9`` or ``350000000``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e\+?[0-9]+)?)\s*([kmbt]?)\s*", str(text).lower())
    value = float(m.group(1)) * _SUFFIX.get(m.group(2), 1.0) if m else float("nan")
    if not (math.isfinite(value) and value >= 1):
        raise ConfigError(f"unknown model size {text!r}; give a parameter count such as 125m, 1.3b, 7b or 7e9")
    return round(value)


def model_params(model: str | None, params: float | None, default: str = "7b") -> int:
    """The parameter count from ``--model SIZE`` or ``--params N`` (one of them; neither: ``default``)."""
    if model is not None and params is not None:
        raise ConfigError(f"--model {model} and --params {params:g} both set the model size; pass one of them")
    if params is None:
        return parse_size(model or default)
    check_finite("--params", params, "--params 7e9")
    if not params >= 1:
        raise ConfigError(f"--params must be a parameter count >= 1, got {params:g}; e.g. --params 7e9")
    return round(params)


def _number(x: float) -> float | None:
    """JSON has no infinity: the free network's bandwidth is written as null."""
    return x if math.isfinite(x) else None


MAX_BANDWIDTH_GBPS = 1e12  # 1 Zb/s; beyond it use the free profile (infinite bandwidth)
MAX_LATENCY_MS = 1e9  # about 11.6 days per message


def custom_profile(bandwidth_gbps: float, latency_ms: float) -> NetworkProfile:
    """``--bandwidth-gbps X --latency-ms Y`` as a profile named ``custom``. The bandwidth is at least
    1 bit/s (1e-9 Gb/s) and at most :data:`MAX_BANDWIDTH_GBPS`, the latency at most
    :data:`MAX_LATENCY_MS`: inside these bounds no modeled time overflows."""
    check_range("--bandwidth-gbps", bandwidth_gbps, 1e-9, MAX_BANDWIDTH_GBPS,
                example="--bandwidth-gbps 100 (Gb/s per worker link; use --profiles free for infinite bandwidth)")
    check_range("--latency-ms", latency_ms, 0, MAX_LATENCY_MS, example="--latency-ms 0.01")
    return NetworkProfile("custom", bandwidth_gbps * 1e9, latency_ms * 1e-3)


def network(name: str) -> NetworkProfile:
    """A network as ``desloc train --network`` takes it (:func:`desloc.timing.profile`): a profile
    name or a link ``RATE[:LATENCY]`` such as ``20mbit:0.2ms``."""
    try:
        return profile(name)
    except ConfigError as err:
        raise ConfigError(f"{err}; or give --bandwidth-gbps X --latency-ms Y") from None


MAX_WORKERS = 1_000_000


@dataclass(frozen=True)
class Compute:
    """The compute side of the model. Defaults: an H100 node per worker (our assumption)."""

    workers: int = 16  # M: data-parallel workers, one network link each
    gpus_per_worker: int = 8  # G: GPUs inside a worker (their reduction is free: NVLink)
    peak_tflops: float = ACCELERATORS["h100"]  # P per GPU: H100 SXM dense bf16
    mfu: float = DEFAULT_MFU  # model FLOP utilisation
    batch_tokens: int = 4_194_304  # B: global batch in tokens (2048 sequences of 2048)
    seq_len: int = 2048  # reported only: 6 N D ignores attention FLOPs
    bytes_per_param: float = 2.0  # b: bf16 on the wire (4 = fp32)

    def __post_init__(self) -> None:
        for name, value, example in (("--peak-tflops", self.peak_tflops, "989 (H100 bf16) or 312 (A100)"),
                                     ("--mfu", self.mfu, "0.4"), ("--bytes-per-param", self.bytes_per_param, "2")):
            check_finite(name, value, f"{name} {example.split()[0]}")
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}; e.g. {name} {example}")
        if self.mfu > 1:
            raise ConfigError(f"--mfu is a fraction of peak in (0, 1], got {self.mfu}; e.g. --mfu 0.4")
        if isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers < 2:
            raise ConfigError(f"--workers must be an integer >= 2 (with one worker nothing is communicated), got "
                              f"{self.workers!r}")
        # the workers are iterated (one link each): at most a million; the rest fit a float exactly
        for name, value, low, high in (("--workers", self.workers, 2, MAX_WORKERS),
                                       ("--gpus-per-worker", self.gpus_per_worker, 1, 2**53),
                                       ("--batch-tokens", self.batch_tokens, 1, 2**53),
                                       ("--seq-len", self.seq_len, 1, 2**53)):
            check_int(name, value, low, high)

    def step_time(self, params: int) -> float:
        """c: seconds of one local step of one worker; finite and > 0 (else a ConfigError naming the
        inputs: e.g. a peak so large that 6 N D / peak underflows to 0)."""
        c = flops_step_time(params, self.batch_tokens / self.workers,  # type: ignore[arg-type]
                            self.gpus_per_worker * self.peak_tflops * 1e12, self.mfu)
        if not (math.isfinite(c) and c > 0):
            raise ConfigError(f"the modeled compute time per step is {c:g} s for {params:g} parameters with "
                              f"--peak-tflops {self.peak_tflops:g}, --mfu {self.mfu:g}, --gpus-per-worker "
                              f"{self.gpus_per_worker}, --batch-tokens {self.batch_tokens} and --workers "
                              f"{self.workers}; bring them into a realistic range (e.g. --peak-tflops 989)")
        return c

    def time_model(self, params: int, net: NetworkProfile) -> TimeModel:
        return TimeModel(net, self.step_time(params), self.workers)

    def allreduce_s(self, params: int, net: NetworkProfile) -> float:
        """T: one ring all-reduce of a model-sized tensor over all M workers."""
        return self.time_model(params, net).all_reduce_time(params * self.bytes_per_param, range(self.workers))

    def allgather_s(self, params: int, net: NetworkProfile, codec: str) -> float:
        """C: one compressed sync of a model-sized float32 tensor as desloc sends it: the two-half
        compressed all-reduce of p bytes (M >= 3), or the all-gather of p (M = 2)."""
        from desloc.algorithms.fastsync import two_stage

        model, p = self.time_model(params, net), encoded_bytes(codec, params, self.workers)
        if two_stage(self.workers):
            return model.all_reduce_time(p, range(self.workers))
        return model.all_gather_time(p, range(self.workers))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out.update(tokens_per_worker_step=self.batch_tokens / self.workers,
                   sequences_per_worker_step=self.batch_tokens / self.workers / self.seq_len,
                   wire_dtype={2.0: "bf16", 4.0: "fp32", 1.0: "8-bit"}.get(float(self.bytes_per_param), "custom"))
        return out


ASSUMED = {
    "compute": "6 N (B/M) / (G P MFU) per worker step (forward + backward; attention FLOPs and the optimizer "
               "step ignored)",
    "collective": "ring all-reduce over the M workers: 2(M-1) alpha + 2(M-1)/M n / W, one per tensor when due",
    "link": "one link of the profile's bandwidth per worker; the reduction among a worker's G GPUs is free",
    "overlap": "none: compute and communication are not overlapped",
    "states": "parameters and every optimizer state travel at the same bytes per parameter",
    "model_sizes": "nominal parameter counts (1b = 1e9)",
}


# -------------------------------------------------------------------------------- compression
def encoded_bytes(codec: str, params: int, workers: int = 2) -> int:
    """p: the exact bytes one worker sends for ``params`` float32 values under ``codec`` (scales,
    indices included; with ``workers`` >= 3 the M encoded chunks of the two-half all-reduce)."""
    from desloc.algorithms.fastsync import encoded_bytes as sync_bytes
    from desloc.comm.codecs import get_codec

    return sync_bytes(get_codec(codec), params, workers)


def parse_wallclock_compression(spec: str | Mapping[str, str] | None, tags: Sequence[str]) -> dict[str, str]:
    """``--compress`` as :func:`desloc.comm.codecs.parse_compression` reads it (``{}``: uncompressed),
    every named tag checked against ``tags`` (what the methods shown send); a ConfigError naming
    ``--compress`` otherwise."""
    from desloc.comm.codecs import parse_compression

    if isinstance(spec, Mapping):
        spec = ",".join([spec["*"]] * ("*" in spec) + [f"{t}={c}" for t, c in spec.items() if t != "*"])
    try:
        out = parse_compression(spec)
    except ConfigError as err:
        raise ConfigError(f"--compress: {err}") from None
    unknown = [t for t in out if t != "*" and t not in tags]
    if unknown:
        raise ConfigError(f"--compress {spec!r}: unknown tag {unknown[0]!r}; the methods shown send "
                          f"{', '.join(tags)} (ddp: grads); e.g. --compress params=int4,exp_avg=int8,exp_avg_sq=int8 "
                          "or a bare codec for every tag (--compress int8)")
    return out


def row_codecs(method: str, sched: Sequence[tuple[str, int]], spec: Mapping[str, str] | None) -> dict[str, str]:
    """``{tag: codec}`` of the tags ``method`` sends compressed under ``spec`` (a tag's own entry, else
    ``"*"``; ``none`` is uncompressed); ``{}`` for a method that takes no ``--compress`` (reset-states)."""
    from desloc.algorithms import METHODS as REGISTRY

    if not spec or "compression" not in REGISTRY[method].fields:
        return {}
    out = {}
    for tag, _ in sched:
        name = spec.get(tag, spec.get("*"))
        if name is not None and name != "none":
            out[tag] = name
    return out


# ---------------------------------------------------------------------------------- schedules
def schedule(method: str, kx: int, ku: int, kv: int,
             momentum_periods: Sequence[int] | None = None) -> list[tuple[str, int]]:
    """(tensor, period) pairs: what the method all-reduces and how often -- the method's own
    :meth:`~desloc.algorithms.spec.MethodSpec.schedule` for an Adam inner optimizer (MT-DAO's for
    mtdao, with ``len(momentum_periods)`` momenta, default two on K_u), with K_x, K_u, K_v taken
    as the method takes them (module docstring)."""
    from desloc.algorithms import METHODS as REGISTRY
    from desloc.algorithms import MethodConfig
    from desloc.optim import INNER_OPTIMIZERS
    from desloc.optim.mtdao import state_roles as mtdao_roles

    spec = REGISTRY.get(method)
    if spec is None or spec.gossips:
        raise ConfigError(f"unknown method {method!r} for the time model; choose from {', '.join(METHODS)}")
    mt = spec.inner == "mtdao"
    roles = mtdao_roles(len(momentum_periods) if momentum_periods else 2) if mt else INNER_OPTIMIZERS["adamw"]
    given = {"period_x": kx, "period_u": ku, "period_v": kv,
             "momentum_periods": list(momentum_periods) if momentum_periods is not None else None}
    cfg = MethodConfig(name=method, **spec.project(given, "mtdao-adam" if mt else "adamw"))
    return [(tag, k) for tag, k in spec.schedule(cfg, roles).periods.items() if k is not None]


def models_per_step(sched: Sequence[tuple[str, int]]) -> float:
    """Model-sized tensors each worker contributes per step, on average (the ledger's unit)."""
    return sum(1 / k for _, k in sched)


def method_time(params: int, sched: Sequence[tuple[str, int]], net: NetworkProfile, compute: Compute,
                steps: int, codecs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Compute, mean communication and time per step, and the exact total over ``steps`` steps.
    ``codecs`` (:func:`row_codecs`): the tags all-gathered encoded instead of all-reduced; with
    any, the result also holds ``sync_s_by_tag`` (seconds of one sync of each tag)."""
    c, t = compute.step_time(params), compute.allreduce_s(params, net)
    if not codecs:
        comm = sum(t / k for _, k in sched)
        return {"compute_s": c, "allreduce_s": t, "comm_per_step_s": comm, "time_per_step_s": c + comm,
                "comm_fraction": comm / (c + comm) if c + comm > 0 else 0.0,
                "total_time_s": steps * c + sum(steps // k for _, k in sched) * t}
    cost = {tag: compute.allgather_s(params, net, codecs[tag]) if tag in codecs else t for tag, _ in sched}
    comm = sum(cost[tag] / k for tag, k in sched)
    return {"compute_s": c, "allreduce_s": t, "comm_per_step_s": comm, "time_per_step_s": c + comm,
            "comm_fraction": comm / (c + comm) if c + comm > 0 else 0.0,
            "total_time_s": steps * c + sum((steps // k) * cost[tag] for tag, k in sched),
            "sync_s_by_tag": cost}


def bytes_per_step(params: int, sched: Sequence[tuple[str, int]], compute: Compute,
                   codecs: Mapping[str, str] | None = None) -> float:
    """Bytes one worker sends per step, on average: N b per uncompressed sync, the encoded payload
    per compressed one (the ledger's unit)."""
    if not codecs:
        return models_per_step(sched) * params * compute.bytes_per_param
    return sum((encoded_bytes(codecs[tag], params, compute.workers) if tag in codecs else params * compute.bytes_per_param) / k
               for tag, k in sched)


def wallclock_rows(models: dict[str, int], profiles: Sequence[NetworkProfile], compute: Compute,
                   periods: tuple[int, int, int], steps: int, momentum_periods: Sequence[int] | None = None,
                   methods: Sequence[str] = METHODS,
                   compression: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per (model, profile, method); speedups and byte ratios against uncompressed DDP on the
    same model and network. ``compression``: a parsed ``--compress`` spec (:func:`row_codecs` applies
    it per method); with one, every row gets the key ``compression``."""
    rows = []
    ddp = models_per_step(schedule("ddp", *periods))
    for model, params in models.items():
        for net in profiles:
            base = method_time(params, schedule("ddp", *periods), net, compute, steps)["time_per_step_s"]
            for method in methods:
                sched = schedule(method, *periods, momentum_periods)
                codecs = row_codecs(method, sched, compression)
                t = method_time(params, sched, net, compute, steps, codecs)
                per_step = models_per_step(sched)
                sent = bytes_per_step(params, sched, compute, codecs)
                rows.append({"model": model, "params": params, "method": method, "profile": net.name,
                             "periods": dict(sched), "models_per_step": per_step, "bytes_per_step": sent,
                             "bytes_ratio_vs_ddp": ddp * params * compute.bytes_per_param / sent if codecs
                             else ddp / per_step, **t,
                             "speedup_vs_ddp": base / t["time_per_step_s"],
                             **({"compression": codecs} if compression else {})})
    return rows


# -------------------------------------------------------------------------------- sensitivity
def ddp_comm_ratio(params: int, net: NetworkProfile, compute: Compute) -> float:
    """r = T / c: DDP's communication per step over its compute."""
    return compute.allreduce_s(params, net) / compute.step_time(params)


def band_ratio(speedup: float, bytes_ratio: float = 256 / 1.5) -> float:
    """The r at which a method sending 1/bytes_ratio of DDP's bytes is ``speedup`` times faster."""
    return (speedup - 1) / (1 - speedup / bytes_ratio)


def sensitivity(params: int, net: NetworkProfile, compute: Compute, periods: tuple[int, int, int],
                method: str = "desloc", model: str = "",
                compression: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Speedup of ``method`` (compressed as ``compression`` says) over uncompressed DDP when one
    assumption is halved or doubled, the rest at base."""

    def speedup(p: int, n: NetworkProfile, c: Compute, k: tuple[int, int, int]) -> float:
        sched = schedule(method, *k)
        t = method_time(p, sched, n, c, 1, row_codecs(method, sched, compression))["time_per_step_s"]
        return method_time(p, schedule("ddp", *k), n, c, 1)["time_per_step_s"] / t

    bases = {"workers": compute.workers, "gpus_per_worker": compute.gpus_per_worker,
             "peak_tflops": compute.peak_tflops, "mfu": compute.mfu, "batch_tokens": compute.batch_tokens,
             "bytes_per_param": compute.bytes_per_param, "bandwidth_gbps": net.bandwidth_bps / 1e9,
             "latency_ms": net.latency_s * 1e3, "periods_kx_ku_kv": periods[0], "model_params": params}
    base = speedup(params, net, compute, periods)
    rows = []
    for name, value in bases.items():
        half, double = (speedup(*_vary(name, f, params, net, compute, periods)) for f in (0.5, 2.0))
        effect = max(abs(math.log(half / base)), abs(math.log(double / base)))
        rows.append({"assumption": name, "base_value": _number(value), "speedup_if_halved": half,
                     "speedup_if_doubled": double, "effect": effect})
    rows.sort(key=lambda r: -r["effect"])
    return {"method": method, "model": model, "profile": net.name, "base_speedup": base,
            "ddp_comm_over_compute": ddp_comm_ratio(params, net, compute), "rows": rows,
            "most_influential": [r["assumption"] for r in rows if r["effect"] > 0.5 * rows[0]["effect"]]}


def _vary(name: str, factor: float, params: int, net: NetworkProfile, compute: Compute,
          periods: tuple[int, int, int]) -> tuple[int, NetworkProfile, Compute, tuple[int, int, int]]:
    """The inputs with assumption ``name`` scaled by ``factor`` (integers rounded, MFU at most 1)."""
    if name == "bandwidth_gbps":
        return params, replace(net, bandwidth_bps=net.bandwidth_bps * factor), compute, periods
    if name == "latency_ms":
        return params, replace(net, latency_s=net.latency_s * factor), compute, periods
    if name == "periods_kx_ku_kv":  # K_x, K_u, K_v together
        return params, net, compute, tuple(max(1, round(k * factor)) for k in periods)  # type: ignore[return-value]
    if name == "model_params":  # at least one parameter (a 1-parameter model halved is still 1)
        return max(1, round(params * factor)), net, compute, periods
    value = getattr(compute, name) * factor
    if isinstance(getattr(compute, name), int):
        value = max(2 if name == "workers" else 1, round(value))
    return params, net, replace(compute, **{name: min(1.0, value) if name == "mfu" else value}), periods


# ------------------------------------------------------------------------------------ record
def wallclock_record(models: dict[str, int] | None = None, profiles: Sequence[NetworkProfile] | None = None,
                     compute: Compute | None = None, periods: tuple[int, int, int] = PAPER_PERIODS,
                     steps: int = 15360, momentum_periods: Sequence[int] | None = None,
                     compression: str | Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `desloc wallclock --json` record; with no arguments, the DES-LOC paper's setting.
    ``compression``: ``--compress`` (a spec string or ``{tag or "*": codec}``); when it compresses
    anything the record and its rows get the key ``compression`` (module docstring)."""
    models = models or {m: parse_size(m) for m in PAPER_MODELS}
    profiles = list(profiles or [PROFILES["datacenter"]])
    compute = compute or Compute()
    for name, k in zip(("--kx", "--ku", "--kv"), periods):
        check_period(name, k)
    for j, k in enumerate(momentum_periods or []):
        check_period(f"--momentum-periods[{j}]", k)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps must be an integer >= 1 (the run length for total time), got {steps!r}")
    tags = list(dict.fromkeys(tag for m in METHODS for tag, _ in schedule(m, *periods, momentum_periods)))
    spec = parse_wallclock_compression(compression, tags)
    rows = wallclock_rows(models, profiles, compute, periods, steps, momentum_periods, compression=spec)
    key = "7b" if "7b" in models else next(iter(models))
    sens = sensitivity(models[key], profiles[0], compute, periods, model=key, compression=spec)
    desloc = [r["speedup_vs_ddp"] for r in rows if r["method"] == "desloc" and r["profile"] == profiles[0].name]
    return require_finite({
        "rows": rows,
        "assumptions": {**compute.describe(), **ASSUMED, "periods": dict(zip(("kx", "ku", "kv"), periods)),
                        "momentum_periods": list(momentum_periods) if momentum_periods else [periods[1]] * 2,
                        "steps": steps, "models": models,
                        "profiles": {n.name: {"bandwidth_gbps": _number(n.bandwidth_bps / 1e9),
                                              "latency_ms": n.latency_s * 1e3} for n in profiles},
                        **(_compression_assumptions(spec) if spec else {})},
        "paper": {"claimed_speedup": "1.3x-2.1x", "claimed_range": list(PAPER_CLAIM),
                  "setting": "DES-LOC vs DDP, 1B-13B models, 100 Gb/s links, K_x=256, K_u=768, K_v=1536",
                  "source": "Iacob et al., DES-LOC, arXiv 2505.22549 (a model; its inputs were not published)",
                  "ddp_comm_over_compute_for_claim": [band_ratio(s) for s in PAPER_CLAIM],
                  "ours_desloc_speedup": [min(desloc), max(desloc)], "ours_profile": profiles[0].name,
                  "ours_within_claim": PAPER_CLAIM[0] <= min(desloc) and max(desloc) <= PAPER_CLAIM[1]},
        "sensitivity": sens,
        **({"compression": spec} if spec else {}),
    })


def _compression_assumptions(spec: Mapping[str, str]) -> dict[str, str]:
    from desloc.algorithms import METHODS as REGISTRY
    from desloc.comm.codecs import format_compression

    refused = [m for m in METHODS if "compression" not in REGISTRY[m].fields]
    return {
        "compressed_collective": (f"--compress {format_compression(dict(spec))}: a compressed tag is desloc's "
                                  "compressed all-reduce of its encoded message p (the codec's exact bytes, scales "
                                  "and indices included): a reduce-scatter of encoded chunks and an all-gather of the "
                                  "reduced ones, 2 (M-1) alpha + 2 (M-1)/M p / W (M = 2: an all-gather of p)"),
        "compressed_reference": ("bytes / ddp's and vs ddp are against uncompressed DDP; the ddp row is compressed "
                                 "DDP when --compress names grads or gives a bare codec; bytes are each worker's "
                                 "payload (the ledger's unit), not its link traffic"
                                 + (f"; {', '.join(refused)} {'takes' if len(refused) == 1 else 'take'} no "
                                    "--compress and " + ("is" if len(refused) == 1 else "are") + " priced uncompressed"
                                    if refused else "")),
        "states": ("uncompressed tags travel at the bytes per parameter above, compressed ones at their codec's "
                   "bytes of float32 values"),
    }


def require_finite(record: Any, path: str = "") -> Any:
    """``record`` if every float in it is finite, else a ConfigError naming the first that is not.
    Only the free network's bandwidth is infinite by design, and it is written as None."""
    if isinstance(record, float) and not math.isfinite(record):
        raise ConfigError(f"the model's {path or 'result'} is {record} for these inputs (an overflow or an "
                          "undefined ratio); bring the model size, bandwidth, latency, peak FLOP/s, MFU and batch "
                          "into a realistic range")
    if isinstance(record, dict):
        for key, value in record.items():
            require_finite(value, f"{path}.{key}" if path else str(key))
    elif isinstance(record, (list, tuple)):
        for i, value in enumerate(record):
            require_finite(value, f"{path}[{i}]")
    return record


def comparison_text(record: dict[str, Any]) -> str:
    """The honest paragraph: where the model lands against the paper's 1.3x-2.1x, and why."""
    paper, sens = record["paper"], record["sensitivity"]
    lo, hi = paper["ours_desloc_speedup"]
    rlo, rhi = paper["ddp_comm_over_compute_for_claim"]
    where = "inside" if paper["ours_within_claim"] else ("below" if hi < PAPER_CLAIM[0] else
                                                         "above" if lo > PAPER_CLAIM[1] else "across")
    top = sens["rows"][0]
    moved = [x for r in sens["rows"] for x in (r["speedup_if_halved"], r["speedup_if_doubled"])]
    span = (min(moved), max(moved))
    ours = f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}x-{hi:.2f}x"
    time = {r["method"]: r["time_per_step_s"] for r in record["rows"]
            if r["model"] == sens["model"] and r["profile"] == sens["profile"]}
    local_adam = ""
    if {"desloc", "local-adam"} <= time.keys():
        gap = time["local-adam"] / time["desloc"] - 1
        local_adam = (f"Local Adam (K = K_x) takes {100 * gap:.1f}% longer per step than DES-LOC here"
                      + (": with DDP's bytes cut 85x or more both are nearly compute bound, and DES-LOC's halving "
                         "of Local Adam's bytes pays off on slower networks." if gap < 0.05 else "."))
    bytes_sentence = ("DES-LOC sends 1/170.67 of DDP's bytes, so its speedup is about (1 + r) / (1 + r/170.67)")
    if "compression" in record:
        row = next(r for r in record["rows"] if r["model"] == sens["model"] and r["profile"] == sens["profile"]
                   and r["method"] == "desloc")
        x = sens["ddp_comm_over_compute"] * row["compute_s"] / row["comm_per_step_s"] if row["comm_per_step_s"] \
            else math.inf
        bytes_sentence = (f"with --compress {_codecs_text(row['compression'])} DES-LOC sends "
                          f"1/{row['bytes_ratio_vs_ddp']:.2f} of uncompressed DDP's bytes and its syncs take "
                          f"1/{x:.2f} of DDP's communication time, so its speedup is (1 + r) / (1 + r/{x:.2f})")
    return (f"This is a model, not a measurement. Under the assumptions above DES-LOC is {ours} faster than DDP on "
            f"{sens['profile']}, {where} the paper's stated 1.3x-2.1x. The answer is set by one number, r = DDP's "
            f"communication / compute per step = {sens['ddp_comm_over_compute']:.2f} here; {bytes_sentence}. "
            f"The model size cancels out of r (compute "
            f"and bytes both grow with N; only latency does not), so the paper's spread over 1B-13B must come from "
            f"inputs that change with size and were not published: the 1.3x-2.1x band is r = {rlo:.2f}-{rhi:.2f}. "
            f"Most sensitive: {top['assumption']} (halved {top['speedup_if_halved']:.2f}x, doubled "
            f"{top['speedup_if_doubled']:.2f}x); bytes per parameter, GPUs per worker, peak FLOP/s, MFU, the global "
            f"batch and the bandwidth each scale r by the same factor; the periods and the latency barely matter on "
            f"{sens['profile']}. Halving or doubling any one input alone gives {span[0]:.2f}x-{span[1]:.2f}x. "
            f"{local_adam}")


def _codecs_text(codecs: Mapping[str, str]) -> str:
    return ",".join(f"{t}={c}" for t, c in codecs.items()) or "none"


def _show(x: float | None) -> str:
    return "inf" if x is None else f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:  # the first column left-aligned, numbers right-aligned
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_wallclock(record: dict[str, Any]) -> str:
    a = record["assumptions"]
    header = ["model", "profile", "method", "bytes / ddp's", "compute s", "comm s/step", "time/step s", "comm %",
              "total h", "vs ddp"]
    rows = [[r["model"], r["profile"], r["method"], f"1/{r['bytes_ratio_vs_ddp']:.2f}",
             f"{r['compute_s']:.3f}", f"{r['comm_per_step_s']:.4f}", f"{r['time_per_step_s']:.3f}",
             f"{100 * r['comm_fraction']:.1f}", f"{r['total_time_s'] / 3600:.2f}", f"{r['speedup_vs_ddp']:.2f}x"]
            for r in record["rows"]]
    if "compression" in record:  # a column only when --compress is given: the default table is unchanged
        header.insert(3, "compressed")
        for row, r in zip(rows, record["rows"]):
            row.insert(3, _codecs_text(r["compression"]))
    k = a["periods"]
    nets = "; ".join(f"{n} {_show(p['bandwidth_gbps'])} Gb/s, {p['latency_ms']:g} ms" for n, p in a["profiles"].items())
    assumptions = [
        (f"periods K_x={k['kx']}, K_u={k['ku']}, K_v={k['kv']} (local-adam, keep/reset-states, diloco: K_x; mtdao "
         f"momenta: {a['momentum_periods']}); total over {a['steps']} steps; vs ddp = ddp's time per step / the "
         "method's"),
        (f"workers M={a['workers']}, {a['gpus_per_worker']} GPUs each at {a['peak_tflops']:g} TFLOP/s peak, "
         f"MFU {a['mfu']:g}"),
        (f"global batch {a['batch_tokens']} tokens = {a['batch_tokens'] / a['seq_len']:g} sequences of "
         f"{a['seq_len']} ({a['tokens_per_worker_step']:g} tokens per worker step)"),
        f"{a['bytes_per_param']:g} bytes per parameter on the wire ({a['wire_dtype']}); {a['states']}",
        f"network: {nets}; {a['link']}",
        a["collective"], a["compute"], a["overlap"], f"model sizes: {a['model_sizes']}",
    ]
    if "compression" in record:
        assumptions[5:5] = [a["compressed_collective"], a["compressed_reference"]]
    s = record["sensitivity"]
    sens_rows = [[r["assumption"], _show(r["base_value"]), f"{r['speedup_if_halved']:.2f}x",
                  f"{r['speedup_if_doubled']:.2f}x"] for r in s["rows"]]
    return "\n".join([
        _table(header, rows), "", "Assumptions (the paper did not publish its inputs; these are ours):",
        *(f"  - {x}" for x in assumptions), "",
        (f"Sensitivity: {s['method']} vs ddp, {s['model']} on {s['profile']} (base {s['base_speedup']:.2f}x), "
         "one assumption halved / doubled:"),
        _table(["assumption", "base", "halved", "doubled"], sens_rows), "",
        f"Paper: {record['paper']['claimed_speedup']} ({record['paper']['setting']}).", comparison_text(record)])


# ----------------------------------------------------------------------------------------- plan
PLAN_RULE = (
    "K_x: the smallest period whose whole schedule (x, u, v) costs at most target x compute per step "
    "(starting from the smallest K_x meeting the target for the parameters alone, kx_params_only); "
    "K_u = max(3 K_x, the smallest multiple of K_x >= tau_0.5(beta1)); K_v = max(6 K_x, the smallest multiple "
    "of K_x >= tau_0.5(beta2)); MT-DAO momenta K_j = max(3 K_x, the smallest multiple of K_x >= tau_0.5(beta_j)). "
    "Source: DES-LOC (arXiv 2505.22549): choose K_x from bandwidth, it is the critical knob; K_u = 3 K_x and "
    "K_v = 6 K_x are the paper's defaults (here a floor); the half-life tau_0.5(beta) = ln 0.5 / ln beta is the "
    "paper's scale for a state's period (K_u matters only near tau_0.5(beta1), K_v barely matters), and at a "
    "period K = tau_0.5 a state drifts at most half of its clipping bound between syncs (1 - beta^K = 0.5). "
    "States are synced on multiples of K_x, so never more often than the parameters.")


def _state_period(kx: int, tau: float, floor: int) -> int:
    return max(floor * kx, kx * math.ceil(tau / kx - 1e-12))


def _periods(kx: int, taus: Sequence[float], floors: Sequence[int]) -> list[int]:
    return [_state_period(kx, t, f) for t, f in zip(taus, floors)]


MTDAO_NOTE = ("mtdao: beta1 is unused (its momenta are --mt-betas); ku is DES-LOC's period for beta1, shown for "
              "comparison and not counted")


def _smallest_kx(ratio: float, taus: Sequence[float], floors: Sequence[int]) -> tuple[int, int]:
    """(K_x for the parameters alone, K_x for the whole schedule), ``ratio`` = T / (target x c).

    The target is T (1/K_x + sum_j 1/K_j) <= target x c. The sum is not monotone in K_x (K_j rounds
    tau_j up to a multiple of K_x), so K_x is scanned upward from the parameters-only bound
    ceil(ratio). With every state at its floor the cost is (1 + sum_j 1/floor_j) / K_x, an upper
    bound, so that K_x always meets the target and ends the scan (as it does after 2e6 candidates,
    which only extreme targets reach)."""
    if ratio <= 0:
        return 1, 1
    params_only = max(1, math.ceil(ratio - 1e-9))
    always = max(1, math.ceil((1 + sum(1 / f for f in floors)) * ratio - 1e-9))

    def cost(kx: int) -> float:
        return 1 / kx + sum(1 / k for k in _periods(kx, taus, floors))

    scan = range(params_only, min(always, params_only + 2_000_000))
    return params_only, next((k for k in scan if cost(k) <= (1 + 1e-12) / ratio), always)


def plan(beta1: float = 0.9, beta2: float = 0.999, params: int = 7_000_000_000,
         net: NetworkProfile = PROFILES["datacenter"], target_overhead: float = 0.1,
         compute: Compute | None = None, mt_betas: Sequence[float] | None = None) -> dict[str, Any]:
    """Periods from the betas' half-lives and a communication target (:data:`PLAN_RULE`)."""
    compute = compute or Compute()
    for name, beta in [("--beta1", beta1), ("--beta2", beta2)] + [(f"--mt-betas[{j}]", b) for j, b in
                                                                 enumerate(mt_betas or [])]:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            flag = name.split("[")[0]
            example = "0.999 (half-life 692.80 steps)" if flag == "--beta2" else "0.9 (half-life 6.58 steps)"
            raise ConfigError(f"{name} must be in [0, 1), got {beta!r}; e.g. {flag} {example}")
    check_finite("--target-overhead", target_overhead, "--target-overhead 0.1")
    if not target_overhead > 0:
        raise ConfigError(f"--target-overhead must be > 0 (communication as a fraction of compute), got "
                          f"{target_overhead}; e.g. --target-overhead 0.1 for at most 10%")
    tau1, tau2 = half_life(beta1), half_life(beta2)
    mt_taus = [half_life(b) for b in mt_betas or []]
    taus, floors = ([*mt_taus, tau2], [3] * len(mt_taus) + [6]) if mt_betas else ([tau1, tau2], [3, 6])
    c, t = compute.step_time(params), compute.allreduce_s(params, net)
    ratio = require_finite(t / (target_overhead * c), "all-reduce time / (target overhead x compute time)")
    kx0, kx = _smallest_kx(ratio, taus, floors)
    ku, kv = _state_period(kx, tau1, 3), _state_period(kx, tau2, 6)
    mt_periods = _periods(kx, mt_taus, [3] * len(mt_taus))
    sched = schedule("mtdao", kx, ku, kv, mt_periods) if mt_betas else schedule("desloc", kx, ku, kv)
    per_step = models_per_step(sched)
    local_adam = len(sched) / kx  # the same tensors, all every K_x
    comm = sum(t / k for _, k in sched)
    half_lives: dict[str, Any] = {"beta1": tau1, "beta2": tau2}
    periods: dict[str, Any] = {"kx": kx, "ku": ku, "kv": kv}
    if mt_betas:
        half_lives["mt_betas"] = mt_taus
        periods["momentum_periods"] = mt_periods
    return require_finite({
        "method": "mtdao" if mt_betas else "desloc",
        "betas": {"beta1": beta1, "beta2": beta2, "mt_betas": list(mt_betas or [])},
        "half_lives": half_lives, "periods": periods, "kx_params_only": kx0,
        "states": dict(sched), "models_per_step": per_step,
        "bytes_per_step": per_step * params * compute.bytes_per_param,
        "ratio_vs_ddp": 1 / per_step, "ratio_vs_local_adam": local_adam / per_step,
        "compute_s": c, "allreduce_s": t, "comm_per_step_s": comm, "overhead": comm / c if c else 0.0,
        "target_overhead": target_overhead, "speedup_vs_ddp": (c + t) / (c + comm), "rule": PLAN_RULE,
        "assumptions": {**compute.describe(), **ASSUMED, "params": params, "profile": net.name,
                        "bandwidth_gbps": _number(net.bandwidth_bps / 1e9),
                        "latency_ms": net.latency_s * 1e3, **({"note": MTDAO_NOTE} if mt_betas else {})},
    })


def format_plan(p: dict[str, Any]) -> str:
    h, k, a = p["half_lives"], p["periods"], p["assumptions"]
    lines = [f"half-lives (steps): beta1={p['betas']['beta1']:g} -> {h['beta1']:.2f}, "
             f"beta2={p['betas']['beta2']:g} -> {h['beta2']:.2f}"
             + "".join(f", mt beta {b:g} -> {t:.2f}" for b, t in zip(p["betas"]["mt_betas"], h.get("mt_betas", [])))]
    lines.append(f"periods ({p['method']}): K_x={k['kx']} (parameters alone would need K_x >= {p['kx_params_only']}), "
                 f"K_u={k['ku']}, K_v={k['kv']}"
                 + (f", momenta K_j={k['momentum_periods']}" if "momentum_periods" in k else ""))
    lines.append(f"per step: {p['models_per_step']:.5f} model-sized tensors = {p['bytes_per_step'] / 1e6:.4g} MB per "
                 f"worker; DDP sends {p['ratio_vs_ddp']:.2f}x these bytes, Local Adam at K={k['kx']} "
                 f"{p['ratio_vs_local_adam']:.2f}x")
    lines.append(f"time per step: compute {p['compute_s']:.3f} s + communication {p['comm_per_step_s']:.4f} s "
                 f"(overhead {100 * p['overhead']:.1f}% of compute, target {100 * p['target_overhead']:g}%); "
                 f"modeled speedup over DDP {p['speedup_vs_ddp']:.2f}x on {a['profile']} "
                 f"({_show(a['bandwidth_gbps'])} Gb/s, {a['latency_ms']:g} ms)")
    lines.append(f"assumptions: {a['params']:.3g} parameters, M={a['workers']} workers x {a['gpus_per_worker']} GPUs "
                 f"at {a['peak_tflops']:g} TFLOP/s, MFU {a['mfu']:g}, batch {a['batch_tokens']} tokens, "
                 f"{a['bytes_per_param']:g} bytes/parameter, ring all-reduce, no overlap (a model)")
    if "note" in a:
        lines.append(a["note"])
    lines.append(f"rule: {p['rule']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI plumbing
