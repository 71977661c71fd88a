"""The training loop of ``desloc train``, in four parts: build, restore, step, log.

:func:`run_loop` is called by :func:`desloc.train.train` once the run directory is settled. One
loop serves every engine (:mod:`desloc.runtime`): it asks the engine where the workers live, which
process writes the records and where checkpoints go, and torchft's rounds take part through the
engine's hooks. Per step a worker only computes: forward and
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
from desloc.comm.base import Communicator
from desloc.config import TrainConfig
from desloc.data import Corpus, WorkerStreams
from desloc.errors import CheckpointMismatchError, DivergenceError, Interrupted
from desloc.model import GPT
from desloc.records import RunDir, atomic_write_bytes, dumps, plot_run
from desloc.runtime import Engine, Session, checkpoint_state, engine_for, load_state
from desloc.sinks import MetricsSink, NullSink, open_sinks
from desloc.timing import VirtualClock, auto_local_steps
from desloc.workers import StepStats


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


# ------------------------------------------------------------------------------------- build
def build(cfg: TrainConfig, run: RunDir, engine: Engine | str, device: str | None = None,
          comm: Communicator | None = None, *, world_size: int | None = None, corpus: Corpus | None = None) -> Session:
    """Data, model, workers, the method's optimizer and the LR schedule, on ``engine``.
    ``world_size``: the simulator's live workers when membership events changed them. ``engine``
    may also be a backend name with a device and the communicator to wrap
    (:func:`desloc.runtime.engine_for`), as the single-process references of tests/test_ft.py build
    torchft workers."""
    if isinstance(engine, str):
        engine = engine_for(engine, device, comm)
    m = cfg.workers if world_size is None else world_size
    corpus = corpus if corpus is not None else engine.prepare_corpus(cfg.data)
    torch.manual_seed(cfg.seed)
    streams = WorkerStreams(corpus, cfg.data, m, cfg.context, cfg.batch_size, cfg.seed)
    val_batches = streams.val_batches(cfg.eval_batches)  # both check the text's size: before allocating
    model = GPT(cfg.model_config(corpus.vocab_size)).to(engine.device)  # same seed -> same init everywhere
    n_params = sum(p.numel() for p in model.parameters())
    time_model = cfg.time.model(m, n_params, cfg.batch_size * cfg.context)
    method = cfg.method
    if method.local_steps == "auto":  # GASLoC: each worker's H_i from the time model
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        method = dataclasses.replace(method, local_steps=auto_local_steps(time_model, method.period_x,
                                                                          param_bytes, method.topology))
    workers = engine.make_workers(model, m)
    inner = cfg.inner.build(workers.parameters())
    opt = build_method(method, inner, workers.comm, cfg.inner.state_roles(), total_steps=cfg.steps)
    measured = cfg.time.step_time_source == "measured"  # the clock keeps its samples and events (TimeConfig)
    clock = VirtualClock(time_model, measured=[] if measured else None, events=[] if measured else None)
    workers.comm.add_listener(clock)  # the clock hears every call the ledger counts
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    session = Session(cfg, run, engine, corpus, streams, val_batches, workers, opt, sched, n_params, time_model, clock)
    engine.attach(session)
    return session


def lr_factor(cfg: TrainConfig, step: int) -> float:
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
    ns = build(s.cfg, s.run, s.engine, world_size=new, corpus=s.corpus)
    ns.join_source = s.join_source
    ns.workers.load_model_state(resize_tree(s.workers.model_state(), old, new))
    ns.opt.load_state_dict(resize_optimizer_state(s.opt.state_dict(), old, new, s.cfg.join_states, checkpoint_means))
    ns.sched.load_state_dict(s.sched.state_dict())
    ns.clock.load_state_dict(resize_clock_state(s.clock.state_dict(), old, new))
    if ns.engine.is_main:
        print(f"[{s.cfg.method.name}] step {done}: {old} -> {new} workers", file=sys.stderr, flush=True)
    return ns


# ----------------------------------------------------------------------------------- restore
def restore(s: Session, start_step: int | None) -> tuple[int, float]:
    """Load the checkpoint of ``start_step`` (None: a fresh start). Returns (step, elapsed seconds)."""
    if start_step is None:
        if s.engine.is_main and s.run.read_metrics():
            s.run.truncate_metrics(0)  # --resume of a run that crashed before its first checkpoint
        return 0, 0.0
    ckpt = s.engine.load_checkpoint(s.run, start_step)
    if ckpt["data_fingerprint"] != s.corpus.fingerprint:
        raise CheckpointMismatchError("checkpoint was trained on different data or tokenizer "
                                      f"({ckpt['data_fingerprint']} vs {s.corpus.fingerprint})")
    load_state(s, ckpt)
    if s.cfg.events:
        from desloc.membership import join_source

        s.join_source = join_source(s.cfg, ckpt["step"], ckpt["optimizer"], ckpt.get("join_source"))
    if s.engine.is_main:
        s.run.truncate_metrics(ckpt["step"])
    return ckpt["step"], ckpt["elapsed_s"]


def checkpoint(s: Session, step: int, elapsed: float) -> None:
    s.engine.save_checkpoint(s.run, step, checkpoint_state(s, step, elapsed))


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
    part = s.workers.local_part  # a sharded worker checks its own shards
    bad = float(not all(bool(torch.isfinite(part(t)).all()) for t in tensors))
    return s.workers.mean_over_workers({"bad": [bad]})["bad"] == 0


def diverged(s: Session, step: int, what: str, last_ckpt: int) -> None:
    """Record the divergence (summary.json, status "diverged") and stop with DivergenceError."""
    cfg = s.cfg
    if s.engine.is_main:
        s.run.write_summary({"status": "diverged", "diverged_at_step": step, "reason": what,
                             "method": cfg.method.name, "workers": cfg.workers, "steps": cfg.steps,
                             "last_checkpoint_step": last_ckpt if last_ckpt > 0 else None, "seed": cfg.seed})
    raise DivergenceError(f"training diverged at step {step}: {what}. Nothing non-finite was checkpointed "
                          f"(last checkpoint: step {last_ckpt}). Lower --lr (now {cfg.inner.lr:g}) or raise "
                          f"--warmup (now {cfg.warmup_steps})", step)


# --------------------------------------------------------------------------------------- log
def log_row(s: Session, done: int, stats: StepStats, active: list[bool], lr: float, val: list[float] | None,
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
        "backend": s.engine.name, "model": cfg.model, "params": s.n_params, "tokens": s.tokens_through(steps),
        "final_val_loss": val_loss, "final_val_ppl": math.exp(val_loss) if val_loss is not None else None,
        "bytes_sent": comm["bytes_sent"], "bytes_by_state": comm["bytes_by_state"],
        "ddp_equivalent_bytes": comm["ddp_equivalent_bytes"], "ratio_vs_ddp": comm["ratio_vs_ddp"],
        "wall_time_s": elapsed, "tokens_per_s": s.tokens_through(steps) / max(elapsed, 1e-9),
        "periods": {"x": cfg.method.period_x, "u": cfg.method.period_u, "v": cfg.method.period_v},
        "fragments": cfg.method.fragments, "state_delay": cfg.method.state_delay,
        "param_delay": cfg.method.param_delay, "compression": dict(getattr(s.opt, "compression", None) or {}),
        **({"stream": cfg.stream_choice} if getattr(cfg, "stream_choice", None) else {}),
        **time_summary(s, steps),
        **{k: comm[k] for k in ("bytes_by_link", "bytes_by_worker") if k in comm},
        **s.engine.memory_summary(s.workers),
        "seed": cfg.seed,
        **s.engine.summary_extras(),
    }


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
        stacked = s.engine.holds_all_workers
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
           "step_time_source": s.cfg.time.step_time_source,
           **({} if s.clock.measured is None else {"measured_step_samples": len(s.clock.measured)}),
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
@dataclass
class _Run:
    """What :func:`run_loop` keeps from step to step."""

    s: Session
    stop: StopOnSignal
    bar: Any  # tqdm
    show: bool  # the progress bar is shown (else a line every 8 logging steps)
    title: str  # of the plots
    start: int  # the step this process started at
    end: int  # the last step of this call (``stop_after``, or the step a stop was taken at)
    elapsed_before: float  # seconds of the run before this process
    t0: float
    health: Health
    dynamics: StateDynamics | None
    last_ckpt: int
    val_loss: float | None = None
    best_train: float = math.inf  # the lowest logged training loss of this process (--diverge-factor)
    stop_signal: int | None = None
    sink: MetricsSink = dataclasses.field(default_factory=NullSink)  # --tensorboard / --wandb (desloc.sinks)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0


def run_loop(s: Session, start: int, elapsed_before: float, stop_after: int | None, progress: bool | None,
             stop: StopOnSignal) -> dict[str, Any]:
    """Train from step ``start`` to the end (or for ``stop_after`` steps), then write the summary."""
    cfg = s.cfg
    title = (f"{cfg.method.name} ({cfg.inner.name}), M={cfg.workers}"
             + (f" x {s.engine.shards} shards" if s.engine.shards > 1 else "") + f", {cfg.model} "
             f"({s.n_params / 1e6:.2f}M params), {s.engine.name}")
    show = s.engine.is_main and (sys.stderr.isatty() if progress is None else progress)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not show, desc=cfg.method.name, unit="step")
    r = _Run(s, stop, bar, show, title, start, cfg.steps if stop_after is None else min(cfg.steps, start + stop_after),
             elapsed_before, time.perf_counter(), Health(), StateDynamics(s) if cfg.state_dynamics else None, start,
             sink=open_sinks(cfg.to_dict(), s.run.path, start, s.engine.is_main))
    try:
        step = s.engine.start(s, start)  # --ft: join the job; a worker that is behind continues from a peer's step
        r.last_ckpt = bar.n = step
        while step < r.end:
            healed_to = r.s.engine.before_step(r.s, step, r.elapsed())  # --ft: opens the round of a step that syncs
            if healed_to != step:
                step = r.last_ckpt = bar.n = healed_to
                if step >= r.end:
                    break
            if not _step(r, step + 1):  # --ft: the round did not commit, the state was restored: redo the step
                continue
            step += 1
            if r.stop_signal is not None:
                r.end = step
                break
        bar.close()
        return _finish(r)
    finally:
        r.sink.close()  # also after a divergence, a stop or an error: what was logged is kept


def _step(r: _Run, done: int) -> bool:
    """Step ``done`` (its index is ``done - 1``): compute, step the optimizer, log, apply membership
    events, checkpoint. False if the engine asks for the step to be redone."""
    s, cfg = r.s, r.s.cfg
    is_eval = done % cfg.eval_every == 0 or done == cfg.steps
    is_log = done % cfg.log_every == 0 or is_eval
    sitting_out = s.opt.sitting_out()  # GASLoC's idle workers compute nothing this step
    active = [m not in sitting_out for m in s.workers.local_workers]
    batches = [s.streams.batch(m, done - 1) for m in s.workers.local_workers]
    timed = s.clock.measured is not None  # --step-time measured: this step's compute is a sample
    if timed:
        _synchronize(s)
        t0 = time.perf_counter()
    stats = s.workers.forward_backward(batches, s.device_type, cfg.bf16, seed=cfg.seed, step=done - 1,
                                       measure=is_log, idle=sitting_out)
    if timed and any(active):  # one worker's forward + backward (the simulator computes its workers in turn)
        _synchronize(s)
        s.clock.measure((time.perf_counter() - t0) / sum(active))
    r.health.observe(stats.losses, done, active)
    s.clock.local_step([w for w in range(s.workers.world_size) if w not in sitting_out])
    lr = s.sched.get_last_lr()[0]
    s.opt.step()
    if not s.engine.settle(s):
        return False
    if done == cfg.steps:
        s.opt.finish_syncs()  # the last delayed parameter average lands before the final evaluation
    s.sched.step()
    if is_log:
        _log(r, done, stats, active, lr, is_eval)
    elif s.engine.holds_all_workers:
        r.stop_signal = r.stop.signum  # one process: no need to agree
    if cfg.events and done < cfg.steps:  # workers join or leave from the next step on
        r.s = apply_membership(s, done)
        if r.s is not s and r.dynamics is not None:
            r.dynamics.previous = {}
    r.bar.update(1)
    if done % cfg.ckpt_every == 0 or done == r.end or r.stop_signal is not None:
        if not state_is_finite(r.s):
            diverged(r.s, r.health.first_bad_step() or done, "parameters or optimizer states are not finite",
                     r.last_ckpt)
        checkpoint(r.s, done, r.elapsed())
        r.last_ckpt = done
    return True


def _log(r: _Run, done: int, stats: StepStats, active: list[bool], lr: float, is_eval: bool) -> None:
    """A logging step: evaluate (``is_eval``), agree on the row and on stopping, record the row."""
    s = r.s
    val = s.workers.evaluate(s.val_batches, s.device_type, s.cfg.bf16) if is_eval else None
    elapsed = r.elapsed()
    row, agreed = log_row(s, done, stats, active, lr, val, r.health, r.stop, elapsed)
    if r.dynamics is not None:
        row["state_dynamics"] = r.dynamics.measure(s)
    if agreed["nonfinite"] > 0:
        diverged(s, agreed["first_bad"], "the training loss is not finite", r.last_ckpt)
    if is_eval:
        r.val_loss = row["val_loss"]
    if agreed["stop"] > 0:
        r.stop_signal = r.stop.signum or signal.SIGTERM
    if s.engine.is_main:
        s.run.append_metrics(row)
        r.sink.log(row)  # --tensorboard / --wandb: the same row (metrics.jsonl stays the record)
        _report(s, r.bar, r.show, row, r.start, elapsed - r.elapsed_before, is_eval)
    check_loss_rise(r, done, row["train_loss"])


def check_loss_rise(r: _Run, done: int, loss: float | None) -> None:
    """--diverge-factor F: the run diverged when a logged training loss exceeds F x the lowest logged
    so far. ``loss`` is the row's agreed mean over the workers, so every process decides the same.
    The row is already in metrics.jsonl, so the rise is on record."""
    factor = r.s.cfg.diverge_factor
    if factor is None or loss is None:
        return
    if loss > factor * r.best_train:
        diverged(r.s, done, f"the training loss {loss:.4g} exceeds --diverge-factor {factor:g} x its lowest "
                            f"logged value {r.best_train:.4g}", r.last_ckpt)
    r.best_train = min(r.best_train, loss)


def _synchronize(s: Session) -> None:
    """Wait for the device's queued work (a measured step ends when its kernels do)."""
    if s.device_type == "cuda":
        torch.cuda.synchronize()


def replay_measured(s: Session) -> list[float] | None:
    """--step-time measured: the step time becomes the median of the measured samples (on torchrun
    the mean over ranks of each rank's median: one small all-reduce, every rank calls this) and
    the clock is replayed at it (the rule: :class:`desloc.timing.TimeConfig`). Returns the modeled
    time after each step, for the metrics rows; None when the step time is not measured."""
    if s.clock.events is None:
        return None
    from statistics import median

    local = median(s.clock.measured) if s.clock.measured else 0.0
    step_time = s.workers.mean_over_workers({"step_time": [local]})["step_time"]
    s.time_model.step_time_s = step_time  # the DDP reference (ddp_reference_time) uses it too
    s.clock, after = s.clock.replay(step_time)
    s.clock.model = s.time_model
    return after


def _finish(r: _Run) -> dict[str, Any]:
    """After the last step of this call: the summary (summary.json once the run is complete), the
    plots, leaving the job; :class:`Interrupted` if a stop was taken."""
    s, cfg, end = r.s, r.s.cfg, r.end
    if end == cfg.steps and s.engine.finish(s, end):  # --ft closing round; healed: a peer's final state
        r.val_loss = s.workers.mean_over_workers({"v": s.workers.evaluate(s.val_batches, s.device_type, cfg.bf16)})["v"]
        checkpoint(s, end, r.elapsed())
    replayed = replay_measured(s)
    result = summary(s, end, r.val_loss, r.elapsed())
    if s.engine.is_main:
        if replayed is not None:  # every row's modeled time at the run's median step time
            rows = [{**row, "modeled_time_s": replayed[row["step"] - 1]} if 0 < row["step"] <= len(replayed) else row
                    for row in s.run.read_metrics()]
            atomic_write_bytes(s.run.path / "metrics.jsonl", "".join(dumps(row) + "\n" for row in rows).encode())
        if end == cfg.steps:
            s.run.write_summary(result)
        plot_run(s.run.path, s.run.read_metrics(), r.title, time_label=cfg.time.describe(s.time_model))
    s.engine.shutdown()
    if r.stop_signal is not None:
        raise Interrupted(f"{signal.Signals(r.stop_signal).name}: stopped after step {end} of {cfg.steps} and "
                          f"saved a checkpoint; continue with: desloc train --out {s.run.path} --resume",
                          int(r.stop_signal), end)
    return result


def _report(s: Session, bar, show: bool, row: dict[str, Any], start: int, elapsed: float, is_eval: bool) -> None:
    cfg, done = s.cfg, row["step"]
    idle = row["train_loss"] is None  # no worker computed this step (gasloc: every H_i < H)
    bar.set_postfix(loss="-" if idle else f"{row['train_loss']:.3f}",
                    tok_s=f"{(done - start) * s.tokens_per_step / max(elapsed, 1e-9):.0f}",
                    sent=human_bytes(row["bytes_sent"]))
    if not show and (done % (cfg.log_every * 8) == 0 or is_eval):
        vl = f" val {row['val_loss']:.4f}" if is_eval else ""
        loss = "-" if idle else f"{row['train_loss']:.4f}"
        print(f"[{cfg.method.name}] step {done}/{cfg.steps} loss {loss}{vl} "
              f"sent {human_bytes(row['bytes_sent'])}", file=sys.stderr, flush=True)
