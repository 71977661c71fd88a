"""The training loop of ``desloc train``, in four parts: build, restore, step, log.

:func:`run_loop` is called by :func:`desloc.train.train` once the run directory is settled. One
loop serves both engines (:mod:`desloc.workers`). Per step a worker only computes: forward and
backward on its own batch, then the method's optimizer step (which communicates when the
method's schedule says so). Everything else that would make real workers wait for each other
happens only at logging and checkpoint steps, in one small all-reduce (``mean_over_workers``):
the logged means, whether any worker saw a non-finite loss, and whether any worker was asked to
stop (SIGINT / SIGTERM). In the simulator, where that costs nothing, a stop is taken right after
the current step; under torchrun at the next logging or checkpoint step, the same on every rank.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from desloc.algorithms import build_method
from desloc.timing import TimeModel, VirtualClock, auto_local_steps
from desloc.data import Corpus, WorkerStreams
from desloc.errors import CheckpointMismatchError, DivergenceError, Interrupted
from desloc.model import GPT
from desloc.records import RunDir, plot_run
from desloc.workers import FtWorkers, ProcessWorkers, ShardedWorkers, SimWorkers


class StopOnSignal:
    """SIGINT / SIGTERM ask the loop to stop after a step; a second one acts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        if self.announce:
            print(f"\ndesloc: {signal.Signals(signum).name} received: finishing this step and saving a "
                  "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass
class Session:
    """Everything one run holds while it trains."""

    cfg: Any  # TrainConfig
    run: RunDir
    backend: str
    device: str
    corpus: Corpus
    streams: WorkerStreams
    val_batches: list
    workers: SimWorkers | ProcessWorkers
    opt: Any  # SyncedOptimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    n_params: int
    time_model: TimeModel
    clock: VirtualClock
    ft: Any = None  # desloc.ft.FtRuntime under --ft
    join_source: dict[str, Any] | None = None  # --join-states checkpoint: desloc.membership.join_source

    @property
    def ckpt_rank(self) -> int:
        """This process's checkpoint file: one per run directory in the simulator and under --ft,
        one per process under torchrun (with --shard: per process, the global rank)."""
        if self.backend in ("sim", "torchft"):
            return 0
        return getattr(self.workers, "global_rank", self.rank)

    @property
    def ckpt_ranks(self) -> int:
        if self.backend in ("sim", "torchft"):
            return 1
        return self.workers.world_size * self.shards

    @property
    def shards(self) -> int:
        """Processes per worker (--shard; 1 unless the worker is a sharded replica group)."""
        return getattr(self.workers, "shards", 1)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one step of the live workers."""
        return self.workers.world_size * self.cfg.batch_size * self.cfg.context

    def tokens_through(self, done: int) -> int:
        """Tokens of steps 1 .. ``done`` (membership events change the workers per step)."""
        from desloc.membership import parse_events, worker_steps

        return worker_steps(self.cfg.workers, parse_events(self.cfg.events), done) * self.cfg.batch_size * self.cfg.context

    @property
    def rank(self) -> int:
        return self.workers.local_workers[0] if self.backend != "sim" else 0


# ------------------------------------------------------------------------------------- build
def build(cfg, run: RunDir, backend: str, device: str, comm, world_size: int | None = None,
          corpus: Corpus | None = None, ft=None) -> Session:
    """Data, model, workers, the method's optimizer and the LR schedule, on either engine.
    ``world_size``: the simulator's live workers when membership events changed them; ``ft``: the
    torchft runtime (``--ft``), whose communicator is ``comm``."""

    m = cfg.workers if world_size is None else world_size
    corpus = corpus if corpus is not None else _prepare_corpus(cfg, comm if ft is None else None)
    torch.manual_seed(cfg.seed)
    streams = WorkerStreams(corpus, cfg.data, m, cfg.context, cfg.batch_size, cfg.seed)
    val_batches = streams.val_batches(cfg.eval_batches)  # both check the text's size: before allocating
    model = GPT(cfg.model_config(corpus.vocab_size)).to(device)  # same seed -> same init everywhere
    n_params = sum(p.numel() for p in model.parameters())
    time_model = cfg.time.model(m, n_params, cfg.batch_size * cfg.context)
    method = cfg.method
    if method.local_steps == "auto":  # GASLoC: each worker's H_i from the time model
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        method = dataclasses.replace(method, local_steps=auto_local_steps(time_model, method.period_x,
                                                                          param_bytes, method.topology))
    if comm is None:
        workers = SimWorkers(model, m)
    elif getattr(comm, "mesh", None) is not None:  # --shard: a worker is an FSDP2 replica group
        from desloc.comm.mesh import shard_model

        workers = ShardedWorkers(shard_model(model, comm.mesh), comm)
    else:
        workers = ProcessWorkers(model, comm) if ft is None else FtWorkers(model, comm)
    inner = cfg.inner.build(workers.parameters())
    opt = build_method(method, inner, workers.comm, cfg.inner.state_roles())
    clock = VirtualClock(time_model)
    workers.comm.add_listener(clock)  # the clock hears every call the ledger counts
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    session = Session(cfg, run, backend, device, corpus, streams, val_batches, workers, opt, sched, n_params,
                      time_model, clock, ft)
    if ft is not None:
        ft.attach(session)
    return session


def _prepare_corpus(cfg, comm) -> Corpus:
    """Rank 0 builds the tokenizer and token cache; the other ranks then load it. (Under --ft each
    worker prepares it itself: the cache is written atomically.)"""
    first = comm is None or getattr(comm, "global_rank", comm.rank) == 0
    if not first:
        comm.barrier()
    corpus = Corpus.prepare(cfg.data, progress=False)
    if comm is not None and first:
        comm.barrier()
    return corpus


def lr_factor(cfg, step: int) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":  # warmup-stable-decay: flat, then linear decay over the tail
        decay_start = cfg.steps - int(cfg.wsd_decay_fraction * cfg.steps)
        if step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(cfg.steps - decay_start, 1)
        return 1.0 - (1.0 - cfg.min_lr_ratio) * frac
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


# -------------------------------------------------------------------------------- membership
def apply_membership(s: Session, done: int) -> Session:
    """After step ``done``: the session of the workers live from the next step on (the same one
    when no event happens). See :mod:`desloc.membership` for the rules."""
    from desloc.membership import (live_workers, parse_events, resize_clock_state, resize_optimizer_state,
                                   resize_tree)

    events = parse_events(s.cfg.events)
    old, new = s.workers.world_size, live_workers(s.cfg.workers, events, done)
    if new == old:
        return s
    s.opt.finish_syncs()
    checkpoint_means = None
    if s.cfg.join_states == "checkpoint" and new > old:
        if s.join_source is not None:
            checkpoint_means = s.join_source["states"]
        else:
            import warnings

            from desloc.errors import DeslocWarning

            warnings.warn(f"--join-states checkpoint: no checkpoint of the --ckpt-every {s.cfg.ckpt_every} schedule "
                          f"before step {done}; the joining workers get the current averaged states", DeslocWarning)
    ns = build(s.cfg, s.run, s.backend, s.device, None, world_size=new, corpus=s.corpus)
    ns.join_source = s.join_source
    ns.workers.load_model_state(resize_tree(s.workers.model_state(), old, new))
    ns.opt.load_state_dict(resize_optimizer_state(s.opt.state_dict(), old, new, s.cfg.join_states, checkpoint_means))
    ns.sched.load_state_dict(s.sched.state_dict())
    ns.clock.load_state_dict(resize_clock_state(s.clock.state_dict(), old, new))
    if ns.workers.is_main:
        print(f"[{s.cfg.method.name}] step {done}: {old} -> {new} workers", file=sys.stderr, flush=True)
    return ns


# ----------------------------------------------------------------------------------- restore
def restore(s: Session, start_step: int | None) -> tuple[int, float]:
    """Load the checkpoint of ``start_step`` (None: a fresh start). Returns (step, elapsed seconds)."""
    if start_step is None:
        if s.workers.is_main and s.run.read_metrics():
            s.run.truncate_metrics(0)  # --resume of a run that crashed before its first checkpoint
        return 0, 0.0
    ckpt = s.run.load_checkpoint(s.ckpt_rank, start_step)
    if s.shards > 1:  # the replica group's tensors are in its DCP checkpoint
        from desloc.comm.mesh import load_sharded

        ckpt = load_sharded(ckpt, s.run.checkpoint_file(start_step, s.ckpt_rank).parent / f"replica{s.rank}",
                            s.workers.mesh, s.device)
    if ckpt["data_fingerprint"] != s.corpus.fingerprint:
        raise CheckpointMismatchError("checkpoint was trained on different data or tokenizer "
                                      f"({ckpt['data_fingerprint']} vs {s.corpus.fingerprint})")
    load_state(s, ckpt)
    if s.cfg.events:
        from desloc.membership import join_source

        s.join_source = join_source(s.cfg, ckpt["step"], ckpt["optimizer"], ckpt.get("join_source"))
    if s.workers.is_main:
        s.run.truncate_metrics(ckpt["step"])
    return ckpt["step"], ckpt["elapsed_s"]


def load_state(s: Session, ckpt: dict[str, Any]) -> None:
    """Model, optimizer (states, step, ledger, outer state), LR schedule and clock from a checkpoint
    (or, under --ft, from a peer: the same dict)."""
    s.workers.load_model_state(ckpt["model"])
    optimizer = ckpt["optimizer"]
    if s.backend == "torchft":  # the participants change from round to round
        optimizer = {**optimizer, "desloc": {**optimizer["desloc"], "world_size": s.workers.comm.world_size}}
    s.opt.load_state_dict(optimizer)
    s.sched.load_state_dict(ckpt["scheduler"])
    if "clock" in ckpt:
        s.clock.load_state_dict(ckpt["clock"])
    if "process_ledger" in ckpt:
        s.workers.comm.process_ledger.load_state_dict(ckpt["process_ledger"])
    if "torchft" in ckpt and s.ft is not None and s.ft.healed is None:
        s.ft.manager.load_state_dict(ckpt["torchft"])  # own checkpoint: rounds committed so far


def checkpoint_state(s: Session, step: int, elapsed: float) -> dict[str, Any]:
    """Everything a run needs to continue after ``step`` (a checkpoint; under --ft, what a peer gets)."""
    state = {"step": step, "elapsed_s": elapsed, "data_fingerprint": s.corpus.fingerprint,
             "model": s.workers.model_state(), "optimizer": s.opt.state_dict(), "scheduler": s.sched.state_dict(),
             "clock": s.clock.state_dict()}
    if s.ft is not None:
        state["torchft"] = s.ft.manager.state_dict()
    if s.cfg.events:  # what --join-states checkpoint joiners get, also after a resume from here
        from desloc.membership import join_source

        s.join_source = join_source(s.cfg, step, state["optimizer"], s.join_source)
        if s.join_source is not None:
            state["join_source"] = s.join_source
    if hasattr(s.workers.comm, "process_ledger"):  # --shard: what this process sent (its shards)
        state["process_ledger"] = s.workers.comm.process_ledger.state_dict()
    return state


def checkpoint(s: Session, step: int, elapsed: float) -> None:
    state = checkpoint_state(s, step, elapsed)
    if s.shards > 1:  # DCP, one checkpoint per replica group; this process keeps the rest
        from desloc.comm.mesh import save_sharded
        from desloc.records import writing

        where = s.run.checkpoint_file(step, s.ckpt_rank).parent / f"replica{s.rank}"
        with writing(where, serializer=False):  # a failed write names the directory (records.writing)
            state = save_sharded(state, where, s.workers.mesh)
    s.run.save_checkpoint(step, s.ckpt_rank, state)
    if s.backend not in ("sim", "torchft"):
        s.workers.comm.barrier()
    if s.workers.is_main:
        s.run.publish_checkpoint(step, ranks=s.ckpt_ranks)


# -------------------------------------------------------------------------------------- step
class Health:
    """The first step with a non-finite loss on this process, tracked on the device (no sync)."""

    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None

    def observe(self, losses: torch.Tensor, step: int, active: list[bool]) -> None:
        if self.first_bad is None:
            self.first_bad = torch.zeros((), dtype=torch.int64, device=losses.device)
        if not any(active):
            return
        if not all(active):
            losses = losses[torch.tensor(active, device=losses.device)]
        bad = ~torch.isfinite(losses).all()
        self.first_bad = torch.where(bad & (self.first_bad == 0), step, self.first_bad)

    def first_bad_step(self) -> int:
        """0 if every loss so far was finite (reads the device)."""
        return 0 if self.first_bad is None else int(self.first_bad.item())


def state_is_finite(s: Session) -> bool:
    """Every parameter and optimizer-state tensor finite, on every worker."""
    s.opt.wait_for_syncs()  # states in flight (overlapped syncs) are read only once they have landed
    tensors = list(s.opt.params) + [v for st in s.opt.inner.state.values() for v in st.values()
                                    if torch.is_tensor(v) and v.is_floating_point()]
    part = getattr(s.workers, "local", lambda t: t)  # a sharded worker checks its own shards
    bad = float(not all(bool(torch.isfinite(part(t)).all()) for t in tensors))
    return s.workers.mean_over_workers({"bad": [bad]})["bad"] == 0


def diverged(s: Session, step: int, what: str, last_ckpt: int) -> None:
    """Record the divergence (summary.json, status "diverged") and stop with DivergenceError."""
    cfg = s.cfg
    if s.workers.is_main:
        s.run.write_summary({"status": "diverged", "diverged_at_step": step, "reason": what,
                             "method": cfg.method.name, "workers": cfg.workers, "steps": cfg.steps,
                             "last_checkpoint_step": last_ckpt if last_ckpt > 0 else None, "seed": cfg.seed})
    raise DivergenceError(f"training diverged at step {step}: {what}. Nothing non-finite was checkpointed "
                          f"(last checkpoint: step {last_ckpt}). Lower --lr (now {cfg.inner.lr:g}) or raise "
                          f"--warmup (now {cfg.warmup_steps})", step)


# --------------------------------------------------------------------------------------- log
def log_row(s: Session, done: int, stats, active: list[bool], lr: float, val: list[float] | None,
            health: Health, stop: StopOnSignal, elapsed: float) -> tuple[dict[str, Any], dict[str, float]]:
    """The metrics row of step ``done`` and the agreed control values, from one averaging.
    Training loss and gradient norm are means over the workers that computed this step."""
    columns = {"train_loss": [v if a else 0.0 for v, a in zip(stats.losses.tolist(), active)],
               "grad_norm": [v if a else 0.0 for v, a in zip(stats.grad_norms, active)],
               "active": [float(a) for a in active], "param_norm": s.workers.param_norms()}
    if val is not None:
        columns["val_loss"] = val
    bad = health.first_bad_step()
    columns["nonfinite"] = [float(bad > 0)]
    columns["stop"] = [float(stop.signum or 0)]
    mean = s.workers.mean_over_workers(columns)
    summary = s.opt.comm_summary()
    share = mean["active"]  # of the workers that computed this step (1.0: all of them)
    row = {"step": done, "train_loss": mean["train_loss"] / share if share else None,
           "val_loss": mean.get("val_loss"), "lr": lr,
           "grad_norm": mean["grad_norm"] / share if share else None, "param_norm": mean["param_norm"],
           "tokens": s.tokens_through(done), "workers": s.workers.world_size, "bytes_sent": summary["bytes_sent"],
           "bytes_by_state": summary["bytes_by_state"], "elapsed_s": elapsed,
           "modeled_time_s": s.clock.now}
    return row, {"nonfinite": mean["nonfinite"], "first_bad": bad or done, "stop": mean["stop"]}


def summary(s: Session, steps: int, val_loss: float | None, elapsed: float) -> dict[str, Any]:
    cfg, comm = s.cfg, s.opt.comm_summary()
    return {
        "status": "complete" if steps == cfg.steps else "partial",
        "method": cfg.method.name, "inner": cfg.inner.name, "workers": cfg.workers,
        "workers_final": s.workers.world_size, "steps": steps,
        "backend": s.backend, "model": cfg.model, "params": s.n_params, "tokens": s.tokens_through(steps),
        "final_val_loss": val_loss, "final_val_ppl": math.exp(val_loss) if val_loss is not None else None,
        "bytes_sent": comm["bytes_sent"], "bytes_by_state": comm["bytes_by_state"],
        "ddp_equivalent_bytes": comm["ddp_equivalent_bytes"], "ratio_vs_ddp": comm["ratio_vs_ddp"],
        "wall_time_s": elapsed, "tokens_per_s": s.tokens_through(steps) / max(elapsed, 1e-9),
        "periods": {"x": cfg.method.period_x, "u": cfg.method.period_u, "v": cfg.method.period_v},
        **time_summary(s, steps),
        **{k: comm[k] for k in ("bytes_by_link", "bytes_by_worker") if k in comm},
        **memory_summary(s),
        "seed": cfg.seed,
    }


def peak_memory_bytes(device: str) -> int:
    """This process's peak memory: the CUDA caching allocator's peak on a GPU, else the peak
    resident set size (Linux ``ru_maxrss``; the whole process: interpreter, torch, data)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def memory_summary(s: Session) -> dict[str, Any]:
    """Peak memory per process (and, with --shard, what each process sent and the mesh)."""
    peak = peak_memory_bytes(s.device)
    out: dict[str, Any] = {"peak_memory_bytes": peak,
                           "peak_memory_kind": "cuda_max_allocated" if s.device.startswith("cuda") else "max_rss"}
    if s.backend in ("sim", "torchft"):
        out["peak_memory_per_process"] = [peak]
        return out
    out["peak_memory_per_process"] = [int(v) for v in s.workers.per_process(peak)]
    if s.shards > 1:
        ledger = s.workers.comm.process_ledger
        out["shard"] = {"replica_groups": s.workers.world_size, "shards": s.shards,
                        "processes": s.workers.world_size * s.shards,
                        "bytes_sent_per_process": [int(v) for v in s.workers.per_process(ledger.total_bytes)],
                        "bytes_by_state_this_process": ledger.method_bytes_by_tag}
    return out


class StateDynamics:
    """DES-LOC Fig. 2 as metrics (``--state-dynamics``): for the parameters and every synced state,
    the relative change since the previous logging step, ||s_t - s_prev|| / ||s_prev||, and the
    spread across workers, ||s^m - E_m s|| / ||E_m s||, each averaged over workers. The spread needs
    every worker's tensor, so it is computed in the simulator only (None under torchrun)."""

    def __init__(self, s: Session) -> None:
        self.names = ["params", *s.cfg.inner.state_roles()]
        self.previous: dict[str, list[torch.Tensor]] = {}

    def _tensors(self, s: Session, name: str) -> list[torch.Tensor]:
        return list(s.opt.params) if name == "params" else s.opt.state_tensors(name)

    def measure(self, s: Session) -> dict[str, dict[str, float | None]]:
        s.opt.wait_for_syncs()
        stacked = s.workers.engine == "sim"
        out = {}
        for name in self.names:
            now = [t.detach().float() for t in self._tensors(s, name)]
            if not now:
                continue
            norm = _norms(now, stacked)
            before = self.previous.get(name)
            change = None
            if before is not None and len(before) == len(now):
                change = (_norms([a - b for a, b in zip(now, before)], stacked) / norm_clamp(_norms(before, stacked)))
                change = s.workers.mean_over_workers({"c": change.tolist()})["c"]
            spread = None
            if stacked:
                mean = [t.mean(0, keepdim=True) for t in now]
                spread = (_norms([t - m for t, m in zip(now, mean)], True) / norm_clamp(_norms(mean, True))).mean().item()
            out[name] = {"rel_change": change, "spread": spread, "norm": s.workers.mean_over_workers(
                {"n": norm.tolist()})["n"]}
            self.previous[name] = [t.clone() for t in now]
        return out


def _norms(tensors: list[torch.Tensor], stacked: bool) -> torch.Tensor:
    """Per-worker L2 norm over a list of tensors ([M] if stacked on dim 0, else [1])."""
    if stacked:
        return torch.stack([t.flatten(1).pow(2).sum(1) for t in tensors]).sum(0).sqrt()
    return torch.stack([t.pow(2).sum() for t in tensors]).sum().sqrt().reshape(1)


def norm_clamp(norm: torch.Tensor) -> torch.Tensor:
    return norm.clamp_min(1e-30)


def time_summary(s: Session, steps: int) -> dict[str, Any]:
    """Modeled time of the run so far, the compute-only floor, and DDP's time under the same model."""
    param_bytes = sum(s.workers.comm.payload_bytes(p) for p in s.opt.params)
    ddp = ddp_reference_time(s, steps, param_bytes)
    modeled = s.clock.now
    out = {"network": s.time_model.network.name, "step_time_s": s.time_model.step_time_s,
           "worker_speeds": s.time_model.worker_speeds, "link_speeds": s.time_model.link_speeds,
           "modeled_time_s": modeled, "compute_only_time_s": s.clock.compute_only,
           "ddp_modeled_time_s": ddp, "speedup_vs_ddp_modeled": ddp / modeled if modeled > 0 else None}
    if getattr(s.opt, "local_steps", None) is not None:
        out["local_steps"] = list(s.opt.local_steps)
    return out


def ddp_reference_time(s: Session, steps: int, param_bytes: int) -> float:
    """Modeled time of DDP over the run's first ``steps`` steps with the run's membership: step t
    costs one DDP step (the slowest worker's compute, then the gradient all-reduce) among the
    workers live at step t (``--events``), not the final count."""
    from desloc.membership import live_workers, parse_events

    events = [e for e in parse_events(s.cfg.events) if e.step < steps]
    if not events:
        return steps * s.time_model.ddp_step_time(param_bytes)
    total, start = 0.0, 0
    for end in [e.step for e in events] + [steps]:  # steps [start, end) have the same live workers
        model = dataclasses.replace(s.time_model, world_size=live_workers(s.cfg.workers, events, start),
                                    worker_speeds=None, link_speeds=None)  # --events runs have nominal speeds
        total += (end - start) * model.ddp_step_time(param_bytes)
        start = end
    return total


def human_bytes(n: float) -> str:
    """Bytes in SI units (kB = 1000 B, as network rates are counted)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


# -------------------------------------------------------------------------------------- loop
def run_loop(s: Session, start: int, elapsed_before: float, stop_after: int | None, progress: bool | None,
             stop: StopOnSignal) -> dict[str, Any]:
    cfg, workers = s.cfg, s.workers
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    title = (f"{cfg.method.name} ({cfg.inner.name}), M={cfg.workers}"
             + (f" x {s.shards} shards" if s.shards > 1 else "") + f", {cfg.model} "
             f"({s.n_params / 1e6:.2f}M params), {s.backend}")
    show = workers.is_main and (sys.stderr.isatty() if progress is None else progress)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not show, desc=cfg.method.name, unit="step")
    t0 = time.perf_counter()
    health = Health()
    dynamics = StateDynamics(s) if cfg.state_dynamics else None
    val_loss, stop_signal, last_ckpt = None, None, start
    ft = s.ft
    step = start
    if ft is not None:  # join the job; a worker that is behind continues from a peer's step
        step = ft.start(s, start)
        last_ckpt = step
        bar.n = step
    while step < end:
        if ft is not None:
            ft.elapsed = elapsed_before + time.perf_counter() - t0
            healed_to = ft.before_step(s, step)  # opens the round of a step that syncs
            if healed_to != step:
                step, last_ckpt = healed_to, healed_to
                bar.n = step
                if step >= end:
                    break
        done = step + 1
        step = done  # ``step`` counts the steps done from here on; this step's index is done - 1
        is_eval = done % cfg.eval_every == 0 or done == cfg.steps
        is_log = done % cfg.log_every == 0 or is_eval
        sitting_out = s.opt.sitting_out()  # GASLoC's idle workers compute nothing this step
        active = [m not in sitting_out for m in workers.local_workers]
        batches = [s.streams.batch(m, done - 1) for m in workers.local_workers]
        stats = workers.forward_backward(batches, s.device_type, cfg.bf16, seed=cfg.seed, step=done - 1, measure=is_log,
                                         idle=sitting_out)
        health.observe(stats.losses, done, active)
        s.clock.local_step([w for w in range(workers.world_size) if w not in sitting_out])
        lr = s.sched.get_last_lr()[0]
        s.opt.step()
        if ft is not None and not ft.settle(s):  # the round did not commit: state restored, redo the step
            step = done - 1
            continue
        if done == cfg.steps:
            s.opt.finish_syncs()  # the last delayed parameter average lands before the final evaluation
        s.sched.step()
        if is_log:
            val = workers.evaluate(s.val_batches, s.device_type, cfg.bf16) if is_eval else None
            elapsed = elapsed_before + time.perf_counter() - t0
            row, agreed = log_row(s, done, stats, active, lr, val, health, stop, elapsed)
            if dynamics is not None:
                row["state_dynamics"] = dynamics.measure(s)
            if agreed["nonfinite"] > 0:
                diverged(s, agreed["first_bad"], "the training loss is not finite", last_ckpt)
            if is_eval:
                val_loss = row["val_loss"]
            if agreed["stop"] > 0:
                stop_signal = stop.signum or signal.SIGTERM
            if workers.is_main:
                s.run.append_metrics(row)
                _report(s, bar, show, row, start, elapsed - elapsed_before, is_eval)
        elif workers.engine == "sim":
            stop_signal = stop.signum  # one process: no need to agree
        if cfg.events and done < cfg.steps:  # workers join or leave from the next step on
            s = apply_membership(s, done)
            if s.workers is not workers:
                workers = s.workers
                if dynamics is not None:
                    dynamics.previous = {}
        bar.update(1)
        if done % cfg.ckpt_every == 0 or done == end or stop_signal is not None:
            if not state_is_finite(s):
                diverged(s, health.first_bad_step() or done, "parameters or optimizer states are not finite",
                         last_ckpt)
            checkpoint(s, done, elapsed_before + time.perf_counter() - t0)
            last_ckpt = done
        if stop_signal is not None:
            end = done
            break
    bar.close()
    if ft is not None and end == cfg.steps and ft.finish(s, end):  # closing round; healed: a peer's final state
        val_loss = workers.mean_over_workers({"v": workers.evaluate(s.val_batches, s.device_type, cfg.bf16)})["v"]
        checkpoint(s, end, elapsed_before + time.perf_counter() - t0)
    elapsed = elapsed_before + time.perf_counter() - t0
    result = summary(s, end, val_loss, elapsed)
    if ft is not None:
        result["ft"] = ft.summary()
    if workers.is_main:
        if end == cfg.steps:
            s.run.write_summary(result)
        plot_run(s.run.path, s.run.read_metrics(), title)
    if ft is not None:
        ft.shutdown()
    elif s.backend != "sim":
        from desloc.comm.torch_dist import shutdown

        workers.comm.barrier()
        shutdown()
    if stop_signal is not None:
        raise Interrupted(f"{signal.Signals(stop_signal).name}: stopped after step {end} of {cfg.steps} and "
                          f"saved a checkpoint; continue with: desloc train --out {s.run.path} --resume",
                          int(stop_signal), end)
    return result


def _report(s: Session, bar, show: bool, row: dict[str, Any], start: int, elapsed: float, is_eval: bool) -> None:
    cfg, done = s.cfg, row["step"]
    bar.set_postfix(loss=f"{row['train_loss']:.3f}",
                    tok_s=f"{(done - start) * s.tokens_per_step / max(elapsed, 1e-9):.0f}",
                    sent=human_bytes(row["bytes_sent"]))
    if not show and (done % (cfg.log_every * 8) == 0 or is_eval):
        vl = f" val {row['val_loss']:.4f}" if is_eval else ""
        print(f"[{cfg.method.name}] step {done}/{cfg.steps} loss {row['train_loss']:.4f}{vl} "
              f"sent {human_bytes(row['bytes_sent'])}", file=sys.stderr, flush=True)
