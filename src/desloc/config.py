"""The configuration of a training run: :class:`TrainConfig`, validated once, in one place.

Every check that does not need the engine lives here, so a library user who builds a
``TrainConfig`` gets the same errors as ``desloc train`` (which maps each field to its flag).
What needs the engine (the torchrun environment, the device, memory) is checked by
:func:`desloc.train.check_resources` once the engine is resolved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from desloc.algorithms import METHODS, MethodConfig
from desloc.data import DataConfig
from desloc.errors import ConfigError, check_finite
from desloc.ft import FtConfig
from desloc.model import GPTConfig
from desloc.optim import InnerConfig
from desloc.timing import TimeConfig

# The MT-DAO inner optimizer of the same flavour as a plain one: method mtdao needs one.
MTDAO_FLAVOUR = {"adopt": "mtdao", "adamw": "mtdao-adam"}
SCHEDULES = ("cosine", "wsd", "constant")
BACKENDS = ("auto", "sim", "gloo", "nccl")


@dataclass
class TrainConfig:
    """Everything a run needs; saved resolved as ``config.json``."""

    method: MethodConfig = field(default_factory=lambda: MethodConfig("desloc", period_x=16))
    inner: InnerConfig = field(default_factory=lambda: InnerConfig("adamw", lr=3e-3, weight_decay=0.1))
    data: DataConfig = field(default_factory=DataConfig)
    model: str = "tiny"  # preset
    model_overrides: dict[str, Any] = field(default_factory=dict)
    workers: int = 4  # M (the simulator's; under torchrun the world size must match or be 0)
    steps: int = 300
    batch_size: int = 16  # sequences per worker per step
    seq_len: int | None = None  # default: the model's block_size
    schedule: str = "cosine"
    warmup_steps: int | None = None  # None: min(100, steps // 10)
    min_lr_ratio: float = 0.1
    wsd_decay_fraction: float = 0.2
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 100
    seed: int = 0
    backend: str = "auto"
    time: TimeConfig = field(default_factory=TimeConfig)  # how time is modeled (desloc.timing)
    state_dynamics: bool = False  # log each state's relative change and spread (DES-LOC Fig. 2)
    events: str | None = None  # simulator membership events, e.g. "16:add=4,48:drop=2" (desloc.membership)
    join_states: str = "average"  # a joining worker's optimizer states: average | zeros | checkpoint
    bf16: bool = False
    device: str = "auto"
    diverge_factor: float | None = None  # also diverged when a logged train loss > F x the lowest logged one
    ft: FtConfig | None = None  # --ft: this worker is a torchft replica group (desloc.ft)
    shard: int = 1  # --shard N: a worker is N processes sharding the model with FSDP2 (desloc.runtime.sharded, desloc.comm.fsdp)
    tensorboard: bool = False  # also log every metrics row to RUN/tensorboard (desloc.sinks)
    wandb: bool = False  # also log every metrics row to W&B, offline without credentials (desloc.sinks)

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "eval_every", "eval_batches", "log_every", "ckpt_every"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"train {f} must be an integer >= 1, got {v!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"train workers (M) must be an integer >= 1, got {self.workers!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown lr schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        if self.warmup_steps is None:
            self.warmup_steps = min(100, self.steps // 10)
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise ConfigError(f"warmup_steps must be an integer, got {self.warmup_steps!r}; e.g. warmup_steps=10")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"train seed must be an integer >= 0, got {self.seed!r}; e.g. seed=0")
        check_finite("min_lr_ratio", self.min_lr_ratio, "min_lr_ratio=0.1")
        if self.diverge_factor is not None:
            check_finite("diverge_factor", self.diverge_factor, "diverge_factor=1.5")
            if self.diverge_factor <= 1.0:
                raise ConfigError(f"diverge_factor must be > 1 (a logged training loss above diverge_factor x the "
                                  f"lowest logged one stops the run), got {self.diverge_factor}; e.g. diverge_factor=1.5, "
                                  "or leave it unset to stop only on a non-finite loss")
        check_finite("wsd_decay_fraction", self.wsd_decay_fraction, "wsd_decay_fraction=0.2")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ConfigError(f"wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")
        if not isinstance(self.model_overrides, dict):
            raise ConfigError(f"model_overrides must be a dict of model fields, got {self.model_overrides!r}")
        if "vocab_size" in self.model_overrides:
            raise ConfigError(
                f"model vocab_size={self.model_overrides['vocab_size']!r} cannot be overridden: the "
                "vocabulary comes from the tokenizer; set the BPE size with --vocab-size "
                "(DataConfig.vocab_size) or use --tokenizer byte (256)"
            )
        cfg = self.model_config()  # validates preset and overrides
        if self.seq_len is not None and (isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int)):
            raise ConfigError(f"seq_len must be an integer or None (= block_size), got {self.seq_len!r}")
        if self.seq_len is not None and not 1 <= self.seq_len <= cfg.block_size:
            raise ConfigError(f"seq_len must be in [1, block_size={cfg.block_size}], got {self.seq_len}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N") from None
        self._check_method_inner()
        self._check_events()
        self._check_ft()
        self._check_shard()
        for name in ("worker_speeds", "link_speeds"):
            values = getattr(self.time, name)
            if values is not None and len(values) != self.workers:
                raise ConfigError(f"--{name.replace('_', '-')} needs one factor per worker ({self.workers}), got "
                                  f"{len(values)}: {values}; e.g. --{name.replace('_', '-')} "
                                  + ",".join(["1"] * (self.workers - 1) + ["0.25"]))
        if self.time.step_time_source == "measured":  # the rule: desloc.timing.TimeConfig
            if self.events:
                raise ConfigError("--step-time measured with --events: the modeled time is replayed at the run's "
                                  "median step time, which is not modeled across membership changes; give "
                                  "--step-time SECONDS (e.g. a measured run's summary step_time_s) or drop --events")
            if self.method.local_steps == "auto":
                raise ConfigError("--step-time measured with --local-steps auto: GASLoC's H_i come from the step "
                                  "time before the first step is measured; give --step-time SECONDS or explicit "
                                  "--local-steps, e.g. 32,32,32,8")
        self._check_sync_happens()
        self._check_fast_syncs()
        self._resolve_stream()

    def _fast_syncs(self) -> list[str]:
        """The fast-sync flags this run sets (for the refusals of --ft / --shard / --events)."""
        m = self.method
        on = {"--fragments": m.fragments != 1, "--state-delay": m.state_delay != 0,
              "--fragment-alpha": m.fragment_alpha != 0, "--compress": m.compression is not None, "--stream": m.stream}
        return [flag for flag, v in on.items() if v]

    def _check_fast_syncs(self) -> None:
        flags = self._fast_syncs()
        if not flags:
            return
        refuse = None
        if self.ft is not None:
            refuse = ("--ft heals a worker from a peer between whole steps; fragments, delayed and compressed "
                      "averages keep state across steps that a healed worker could not receive")
        elif self.shard != 1:
            refuse = ("--shard: FSDP2 owns the parameters of a replica group and its communicator has no "
                      "all-gather of encoded payloads; streamed and compressed syncs run unsharded")
        elif self.events:
            refuse = ("--events changes the workers mid-run, while fragments, delayed averages and the shared "
                      "values of compressed syncs assume the same workers throughout")
        if refuse:
            raise ConfigError(f"{', '.join(flags)}: {refuse}; drop {' / '.join(flags)}")

    def _resolve_stream(self) -> None:
        """--stream: fill the fragments and delays left at their defaults by the rule of
        :mod:`desloc.stream` (idempotent: a config read back from config.json resolves the same)."""
        self.stream_choice = None
        if not self.method.stream:
            return
        from desloc.model import GPT
        from desloc.stream import apply_stream, stream_choice

        vocab = 256 if self.data.tokenizer == "byte" else self.data.vocab_size
        with torch.device("meta"):
            numel = sum(p.numel() for p in GPT(self.model_config(vocab)).parameters())
        timed = self.time.network != TimeConfig.network or self.time.step_time_source == "given"
        model = self.time.model(self.workers, numel, self.batch_size * self.context) if timed else None
        choice = stream_choice(self.method, self.inner.state_roles(), 4 * numel, numel, model)
        self.method = apply_stream(self.method, choice)
        self.stream_choice = choice.record()

    def _check_events(self) -> None:
        from desloc.membership import JOIN_POLICIES, check_events, parse_events

        if self.join_states not in JOIN_POLICIES:
            raise ConfigError(f"join_states (--join-states) must be one of {', '.join(JOIN_POLICIES)}, got "
                              f"{self.join_states!r}")
        events = parse_events(self.events)
        if not events:
            return
        check_events(self.workers, events, self.steps)
        if self.backend in ("gloo", "nccl"):
            raise ConfigError("--events changes the workers of a simulator run; with torchrun a worker that dies "
                              "stops the run (continue with --resume). Drop --events or use --backend sim")
        METHODS[self.method.name].check_run("events")
        if self.time.worker_speeds is not None or self.time.link_speeds is not None:
            raise ConfigError("--events with --worker-speeds / --link-speeds: the joining workers' speeds are not "
                              "given; drop one of them")

    def _check_ft(self) -> None:
        if self.ft is None:
            return
        if isinstance(self.ft, dict):
            self.ft = FtConfig(**self.ft)
        self.ft.check(self.workers)
        refuse = None
        if self.events:
            refuse = "--events schedules membership in the simulator; under --ft workers join and leave for real"
        elif "ft" in METHODS[self.method.name].refuses:
            refuse = METHODS[self.method.name].refuses["ft"]
        elif self.method.param_delay:
            refuse = (f"--param-delay {self.method.param_delay} keeps an average in flight across steps, which a "
                      "worker healing from a peer could not receive; use --param-delay 0")
        elif self.backend not in ("auto", "gloo"):
            refuse = f"--backend {self.backend}: --ft runs its own torchft gloo process group; drop --backend"
        elif self.device != "auto" and torch.device(self.device).type != "cpu":
            refuse = (f"--device {self.device}: --ft is built and tested on CPU (torchft's gloo process group); "
                      "use --device cpu")
        if refuse:
            raise ConfigError(f"--ft: {refuse}")

    def _check_shard(self) -> None:
        """--shard N: a worker is a replica group of N FSDP2 processes (torchrun only)."""
        n = self.shard
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"--shard must be an integer >= 1 (processes per worker), got {n!r}; e.g. --shard 2")
        if n == 1:
            return
        refuse = None
        if self.backend == "sim":
            refuse = ("--backend sim: the simulator holds whole workers in one process; launch with "
                      f"`torchrun --nproc_per_node {self.workers * n} -m desloc train --shard {n} ...`")
        elif self.ft is not None:
            refuse = "--ft: a torchft replica group is one process here; drop --shard or --ft"
        elif self.events:
            refuse = "--events schedules membership in the simulator; drop --events"
        elif self.method.param_delay:
            refuse = (f"--param-delay {self.method.param_delay} needs flat parameter buffers, which FSDP2 owns "
                      "when sharded; use --param-delay 0")
        elif self.state_dynamics:
            refuse = "--state-dynamics is computed on whole tensors; drop it (or --shard)"
        elif self.batch_size % n:
            refuse = (f"--batch-size {self.batch_size} (a worker's batch) is split over its {n} shards by rows; use "
                      f"a multiple of {n}, e.g. --batch-size {max(n, self.batch_size // n * n)}")
        if refuse:
            raise ConfigError(f"--shard {n}: {refuse}")

    def _check_sync_happens(self) -> None:
        """K_x > steps: the workers would never be averaged (and the ratio vs DDP would be infinite)."""
        kx, steps = self.method.period_x, self.steps
        if METHODS[self.method.name].syncs_params and kx > steps:
            raise ConfigError(f"K_x={kx} > steps={steps}: no parameter sync would happen, the workers would "
                              f"train apart and never be averaged; lower --kx (e.g. --kx {max(1, steps // 4)}) "
                              f"or raise --steps (to at least {kx})")

    def _check_method_inner(self) -> None:
        """The method and the inner optimizer must fit together (else a flag is silently ignored)."""
        method, inner = self.method, self.inner
        mt_inner = inner.name.startswith("mtdao")
        if METHODS[method.name].inner == "mtdao" and not mt_inner:
            fix = MTDAO_FLAVOUR.get(inner.name)
            raise ConfigError(
                f"method {method.name} needs the MT-DAO inner optimizer (mtdao = ADOPT flavour, mtdao-adam = Adam "
                f"flavour), got inner {inner.name!r}; "
                + (f"use inner {fix!r}" if fix else "there is no SGD flavour; use inner 'mtdao' or 'mtdao-adam'")
            )
        periods = method.momentum_periods
        if periods is not None:
            if not mt_inner:
                raise ConfigError(
                    f"momentum_periods {periods} set one period per MT-DAO momentum, but the inner "
                    f"optimizer {inner.name!r} has no MT-DAO momenta (they would be ignored); use inner "
                    "'mtdao' / 'mtdao-adam' (or --method mtdao), or drop --momentum-periods and set --ku"
                )
            if len(periods) != len(inner.mt_betas):
                raise ConfigError(
                    f"momentum_periods has {len(periods)} entries {periods} but the MT-DAO inner optimizer "
                    f"has {len(inner.mt_betas)} momenta (mt_betas={list(inner.mt_betas)}); give one period "
                    "per momentum, or change --mt-betas / --mt-omegas"
                )

    def unused(self, in_compare: bool = False) -> dict[str, str]:
        """Every field this run ignores, by dotted path (``method.topology``, ``inner.beta1``, ...),
        each with the reason. The method's fields come from its spec
        (:meth:`~desloc.algorithms.spec.MethodSpec.unused`); the CLI refuses the flags of these
        fields when they are given (and ``compare`` those that every method ignores)."""
        import math

        from desloc.membership import parse_events
        from desloc.timing import profile

        m, inner = self.method, self.inner
        out = {f"method.{f}": why for f, why in METHODS[m.name].unused(m, inner.name, in_compare).items()}
        if not any(e.op == "add" for e in parse_events(self.events)):
            out["join_states"] = "no worker joins (add an event such as --events 100:add=4)"
        if self.time.step_time_s is not None:
            for f in ("peak_tflops", "mfu"):
                out[f"time.{f}"] = "--step-time gives the modeled step time; --peak-tflops and --mfu only derive it from FLOPs"
        if math.isinf(profile(self.time.network).bandwidth_bps):
            out["time.link_speeds"] = f"the {self.time.network} network has infinite bandwidth, which no factor changes"
        out.update({f"inner.{f}": why for f, why in _inner_unused(inner.name).items()})
        if self.data.tokenizer == "byte":
            out["data.vocab_size"] = "the byte tokenizer always has 256 symbols; --vocab-size sets the BPE vocabulary"
        if self.data.partition != "dirichlet":
            out["data.alpha"] = f"--alpha is the Dirichlet concentration of --partition dirichlet, not {self.data.partition}"
        if self.schedule == "constant":
            out["min_lr_ratio"] = "the constant schedule never decays the learning rate"
        return out

    def model_config(self, vocab_size: int | None = None) -> GPTConfig:
        overrides = dict(self.model_overrides)
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        return GPTConfig.from_preset(self.model, **overrides)

    @property
    def context(self) -> int:
        return self.seq_len or self.model_config().block_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists), as written to and read from config.json."""
        import json

        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ConfigError(f"unknown train config field(s) {unknown}; fields are {sorted(known)}")
        ft = d.pop("ft", None)
        return cls(method=MethodConfig(**d.pop("method", {})), inner=InnerConfig(**d.pop("inner", {})),
                   data=DataConfig(**d.pop("data", {})), time=TimeConfig(**d.pop("time", {})),
                   ft=FtConfig(**ft) if ft else None, **d)


def _inner_unused(name: str) -> dict[str, str]:
    """The InnerConfig fields inner optimizer ``name`` ignores, with the reason."""
    out = {}
    mt = name.startswith("mtdao")
    if not mt:
        for f in ("mt_betas", "mt_omegas"):
            out[f] = f"the inner optimizer {name} is not MT-DAO; use --inner mtdao / mtdao-adam or --method mtdao"
    if name != "sgdm":
        out["momentum"] = (f"only the sgdm inner optimizer has a momentum, not {name}"
                           + ("" if mt else "; its first-moment decay is --beta1"))
    if name == "sgdm" or mt:
        out["beta1"] = (f"the {name} inner optimizer does not use beta1; "
                        + ("its momentum is --momentum" if name == "sgdm" else "its momentum decays are --mt-betas"))
    if name == "sgdm":
        out["beta2"] = "the sgdm inner optimizer has no second moment"
    return out


def unresolved_defaults() -> dict[str, Any]:
    """TrainConfig defaults before methods resolve what follows from K_x (so --kx moves K_u, K_v and
    the outer momentum mu(K_x)): those fields go back to ``"auto"``."""
    d = TrainConfig().to_dict()
    d["method"].update(period_u="auto", period_v="auto", outer_lr="auto", outer_momentum="auto")  # follow --kx
    d["inner"].update(beta2=None, eps=None)
    d["warmup_steps"] = None
    return d
