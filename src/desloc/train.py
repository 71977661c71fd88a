"""`desloc train`: pretrain a small GPT with M workers under any registered method.

One loop for both engines (:mod:`desloc.workers`): the simulator by default, real processes when
launched under ``torchrun`` (or ``--backend gloo|nccl``). Each step every worker draws its own
batch (:class:`desloc.data.WorkerStreams`, stateless in (seed, worker, step)), runs
forward/backward, and the method's optimizer steps and synchronises. Records go to the run
directory (:mod:`desloc.records`); ``--resume`` continues bit-for-bit from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from desloc import loop
from desloc.algorithms import METHODS, MethodConfig
from desloc.data import DataConfig
from desloc.ft import FtConfig
from desloc.errors import (CheckpointMismatchError, ConfigError, RunComplete,
                           RunDirError, check_finite)
from desloc.model import GPT, GPTConfig
from desloc.optim import InnerConfig
from desloc.records import RunDir, config_diff
from desloc.timing import TimeConfig

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
    ft: FtConfig | None = None  # --ft: this worker is a torchft replica group (desloc.ft)
    shard: int = 1  # --shard N: a worker is N processes sharding the model with FSDP2 (desloc.comm.mesh)

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
        if METHODS[self.method.name].gossips:
            raise ConfigError("--events needs a method that all-reduces: gasloc's per-worker local steps and gossip "
                              "graph are planned for a fixed number of workers")
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
        elif METHODS[self.method.name].gossips:
            refuse = "gasloc gossips with chosen peers, which torchft's quorum all-reduce does not offer"
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

    def _check_method_inner(self) -> None:
        """The method and the inner optimizer must fit together (else a flag is silently ignored)."""
        method, inner = self.method, self.inner
        mt_inner = inner.name.startswith("mtdao")
        if METHODS[method.name].inner == "mtdao" and not mt_inner:
            fix = {"adopt": "mtdao", "adamw": "mtdao-adam"}.get(inner.name)
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


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _check_dist_env(cfg: TrainConfig) -> None:
    """Refuse a half-set torchrun environment, and gloo / nccl without one (or nccl without CUDA)."""
    present = [k for k in _TORCHRUN_VARS if k in os.environ]
    missing = [k for k in _TORCHRUN_VARS if k not in os.environ]
    if present and missing and cfg.backend != "sim":
        raise ConfigError(
            f"the torchrun environment is incomplete: {', '.join(present)} set but {', '.join(missing)} "
            "missing; launch with `torchrun --nproc_per_node M -m desloc ...`, or unset "
            f"{', '.join(present)} to run the simulator (or pass --backend sim)"
        )
    if cfg.backend in ("gloo", "nccl") and missing:
        raise ConfigError(
            f"--backend {cfg.backend} needs torchrun's environment ({', '.join(missing)} not set); "
            f"launch with `torchrun --nproc_per_node {cfg.workers} -m desloc ...`, or drop --backend "
            "to run the simulator"
        )
    if cfg.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--backend nccl needs CUDA, which this torch build / machine does not have; "
                          "use --backend gloo (CPU) or drop --backend")
    for key in ("RANK", "WORLD_SIZE"):
        if key in os.environ and not os.environ[key].strip().isdigit():
            raise ConfigError(f"environment variable {key}={os.environ[key]!r} must be an integer; "
                              "it is set by torchrun")


def _resolve_backend(cfg: TrainConfig) -> str:
    _check_dist_env(cfg)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if cfg.backend == "auto":
        return ("nccl" if torch.cuda.is_available() else "gloo") if under_torchrun else "sim"
    if cfg.backend == "sim" and under_torchrun and int(os.environ["WORLD_SIZE"]) > 1:
        raise ConfigError("--backend sim under torchrun would run the whole simulation on every rank; "
                          "drop --backend (auto) or launch without torchrun")
    return cfg.backend


def _device(cfg: TrainConfig, backend: str) -> str:
    if cfg.device != "auto":
        if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available (torch {torch.__version__}, "
                              "no GPU or a CPU-only build); use --device cpu or --device auto")
        return cfg.device
    if backend == "nccl":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cuda" if torch.cuda.is_available() and backend == "sim" else "cpu"


def _available_memory(device: str) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when unknown)."""
    if device.startswith("cuda"):
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - no driver, old torch: skip the check
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate_sim_memory(cfg: TrainConfig) -> dict[str, int]:
    """Rough bytes the simulator needs: M workers x parameters x (parameter + gradient + optimizer
    and method states), float32, plus one worker's activations (workers run forward one at a time).
    The vocabulary is taken as the requested BPE size (256 for bytes), its upper bound."""
    vocab = cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 256
    mcfg = cfg.model_config(vocab)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(mcfg).parameters())
    states = len(cfg.inner.state_roles())
    if cfg.method.outer is not None:
        states += 2  # anchor copy and outer momentum
    per_worker = n_params * (2 + states) * 4
    tokens = cfg.batch_size * cfg.context
    activations = tokens * (16 * mcfg.n_layer * mcfg.n_embd + 3 * mcfg.vocab_size) * 4
    from desloc.membership import live_workers, parse_events

    events = parse_events(cfg.events)
    most = max([cfg.workers] + [live_workers(cfg.workers, events, e.step) for e in events])  # at the peak
    return {"params": n_params, "states": states, "per_worker": per_worker, "activations": activations,
            "total": most * per_worker + n_params * 4 + activations}


def check_resources(cfg: TrainConfig) -> None:
    """Fail fast, before any data is read or memory allocated: the engine's environment, the
    device, and whether the simulator's M replicas fit in the available memory."""
    backend = _resolve_backend(cfg)
    device = _device(cfg, backend)
    if backend != "sim":
        return
    est = estimate_sim_memory(cfg)
    avail = _available_memory(device)
    if avail is None or est["total"] <= avail:
        return
    fit = max(0, (avail - est["total"] + cfg.workers * est["per_worker"]) // est["per_worker"])
    where = "GPU" if device.startswith("cuda") else "RAM"
    raise ConfigError(
        f"the simulator would need about {est['total'] / 1e9:.1f} GB for M={cfg.workers} workers of a "
        f"{est['params'] / 1e6:.2f}M-parameter model (parameter, gradient and {est['states']} optimizer/method "
        f"states per worker in float32, plus activations) but only {avail / 1e9:.1f} GB of {where} is "
        f"available; use fewer workers (about {fit} fit: --workers {max(1, fit)}), a smaller model "
        "(--model / --set), or one process per worker (torchrun)"
    )


def _init_process_comm(cfg: TrainConfig, backend: str, timeout_s: float = 600.0):
    from desloc.comm.torch_dist import TorchDistComm, init_from_env

    if cfg.shard > 1:
        from desloc.comm.mesh import check_shard

        check_shard(cfg.shard, int(os.environ["WORLD_SIZE"]))  # before any process group exists
    init_from_env(backend, timeout_s=timeout_s)
    if cfg.shard > 1:
        from desloc.comm.mesh import MeshComm, init_mesh, limit_cpu_heap_fragmentation

        if backend == "gloo":
            limit_cpu_heap_fragmentation()
        comm = MeshComm(init_mesh(cfg.shard, "cuda" if backend == "nccl" else "cpu"))
        if comm.world_size != cfg.workers:
            raise ConfigError(f"--workers {cfg.workers} but torchrun started {comm.world_size * cfg.shard} processes, "
                              f"{comm.world_size} replica groups of --shard {cfg.shard}; pass --workers "
                              f"{comm.world_size} (or leave it out)")
        return comm
    comm = TorchDistComm()
    if comm.world_size != cfg.workers:
        raise ConfigError(f"--workers {cfg.workers} but torchrun started {comm.world_size} processes; "
                          f"pass --workers {comm.world_size}")
    return comm


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool | None = None, overwrite: bool = False, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run (or resume) a training run into ``out``; returns the summary (also summary.json).

    ``out`` must be empty (or hold only desloc's records and ``overwrite`` is set) unless
    ``resume``. Raises :class:`RunComplete` when resuming a finished run (nothing changes),
    :class:`DivergenceError` on a non-finite loss or state (nothing non-finite is checkpointed)
    and :class:`Interrupted` after SIGINT / SIGTERM (the current step finishes and is saved).
    """
    if cfg.ft is not None:
        return _train_ft(cfg, out, resume, stop_after, progress, overwrite)
    backend = _resolve_backend(cfg)
    if cfg.shard > 1 and backend == "sim":
        raise ConfigError(f"--shard {cfg.shard}: a sharded worker is {cfg.shard} processes, launched by torchrun; the "
                          f"simulator holds whole workers in one process. Run `torchrun --nproc_per_node "
                          f"{cfg.workers * cfg.shard} -m desloc train --shard {cfg.shard} ...` or drop --shard")
    check_resources(cfg)
    if cfg.events and backend != "sim":
        raise ConfigError("--events changes the workers of a simulator run; under torchrun a worker that dies stops "
                          "the run (continue with --resume). Drop --events or run the simulator")
    is_main = backend == "sim" or int(os.environ.get("RANK", "0")) == 0
    run = RunDir(out, quiet=not is_main)
    if is_main:
        run.lock()
    try:
        start_step = _check_run_dir(run, cfg, backend) if resume else None
        if is_main and not resume:
            run.start_fresh(cfg.to_dict(), overwrite)
        with loop.StopOnSignal(announce=is_main) as stop:
            comm = _init_process_comm(cfg, backend, timeout_s) if backend != "sim" else None
            from desloc.membership import live_workers, parse_events

            live = live_workers(cfg.workers, parse_events(cfg.events), start_step or 0)  # a resume replays events
            session = loop.build(cfg, run, backend, _device(cfg, backend), comm, world_size=live)
            start, elapsed_before = loop.restore(session, start_step)
            return loop.run_loop(session, start, elapsed_before, stop_after, progress, stop)
    finally:
        run.unlock()


def _train_ft(cfg: TrainConfig, out: str | Path, resume: bool, stop_after: int | None, progress: bool | None,
              overwrite: bool) -> dict[str, Any]:
    """One worker (replica group ``cfg.ft.replica_id``) of a fault-tolerant job, in ``out/replica<i>``.

    The same command starts it and restarts it after a crash: a directory that already holds this
    worker's records (same settings) is continued -- from its own latest checkpoint, then from a
    peer if the job is ahead (:mod:`desloc.ft`)."""
    from desloc.ft import FtRuntime, replica_dir, require_torchft

    require_torchft()
    run = RunDir(replica_dir(out, cfg.ft.replica_id))
    run.lock()
    try:
        rejoin = resume or (run.path / "config.json").exists() and not overwrite
        start_step = _check_run_dir(run, cfg, "torchft") if rejoin else None
        if not rejoin:
            run.start_fresh(cfg.to_dict(), overwrite)
        with loop.StopOnSignal() as stop:
            ft = FtRuntime(cfg, run.path)
            session = loop.build(cfg, run, "torchft", "cpu", ft.comm, ft=ft)
            start, elapsed_before = loop.restore(session, start_step)
            return loop.run_loop(session, start, elapsed_before, stop_after, progress, stop)
    finally:
        run.unlock()


def _check_run_dir(run: RunDir, cfg: TrainConfig, backend: str) -> int | None:
    """--resume: the run must exist with the same settings, be unfinished, and keep a checkpoint."""
    from desloc.ft import identity

    saved = TrainConfig.from_dict(run.read_config()).to_dict()  # fields added since: their defaults
    diff = config_diff(identity(saved), identity(cfg.to_dict()))
    if diff:
        raise CheckpointMismatchError(f"--resume: the run in {run.path} was made with different "
                                      f"settings ({'; '.join(diff)}); resume without changing them")
    summary = run.read_summary()
    if summary is not None and summary.get("status") == "diverged":
        raise RunDirError(f"the run in {run.path} diverged at step {summary.get('diverged_at_step')}; resuming "
                          "would repeat it. Start a new run (another --out, or --overwrite) with a lower "
                          "--lr or a longer --warmup")
    if summary is not None and summary.get("steps") == cfg.steps:
        raise RunComplete(f"the run in {run.path} is complete ({cfg.steps} steps, final val loss "
                          f"{summary.get('final_val_loss')}); nothing was changed. To train longer, start a "
                          "new run with more --steps", summary)
    ranks = [0] if backend in ("sim", "torchft") else list(range(cfg.workers * cfg.shard))
    step = run.resume_step(ranks)
    if step == cfg.steps and summary is None:  # finished, but summary.json was lost or damaged
        why = run.summary_damage() or "it is missing"
        raise RunDirError(f"the run in {run.path} finished (its checkpoint is at step {step} of {cfg.steps}) but "
                          f"{run.path / 'summary.json'} is unusable: {why}; resuming cannot recompute its final "
                          "numbers. Start it again with --overwrite (same settings: the same result)")
    if step is None and backend == "torchft":
        return None  # a worker restarted before its first checkpoint: its state comes from a peer
    if step is None and (run.read_metrics() or run.checkpoint_steps()):
        raise RunDirError(f"--resume: no valid checkpoint in {run.ckpt_root}, but the run has records; nothing "
                          "was changed. Start again with --overwrite (this discards them) or choose another --out")
    return step


def unresolved_defaults() -> dict[str, Any]:
    """TrainConfig defaults before methods resolve what follows from K_x (so --kx moves K_u, K_v and
    the outer momentum mu(K_x)): those fields go back to ``"auto"``."""
    d = TrainConfig().to_dict()
    d["method"].update(period_u="auto", period_v="auto", outer_momentum="auto")  # mu(H) follows --kx
    d["inner"].update(beta2=None, eps=None)
    d["warmup_steps"] = None
    return d
