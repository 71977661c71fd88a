"""The engine protocol, and the session an engine runs.

An :class:`Engine` is where a run's workers live and everything that decides: its communicator,
its device, how the workers are built (:mod:`desloc.workers`), which process writes the records,
the checkpoint layout (which files a process writes and reads, and which must exist for a
resume), what it adds to a checkpoint, and its memory summary. The training loop
(:mod:`desloc.loop`) asks the engine and never looks at a backend name. Four engines:

* :class:`~desloc.runtime.simulator.SimEngine` -- all M workers in this process (the default);
* :class:`~desloc.runtime.processes.ProcessEngine` -- one worker per process under torchrun
  (gloo / nccl);
* :class:`~desloc.runtime.sharded.ShardedEngine` -- a worker is a replica group of N processes
  sharding the model with FSDP2 (``--shard N``);
* :class:`~desloc.runtime.torchft.TorchftEngine` -- one worker of a fault-tolerant torchft job
  (``--ft``), whose rounds take part in the loop through the hooks (:meth:`Engine.start`,
  :meth:`Engine.before_step`, :meth:`Engine.settle`, :meth:`Engine.finish`), no-ops elsewhere.

A :class:`Session` is what one run holds while it trains; :func:`checkpoint_state` /
:func:`load_state` are everything a run needs to continue (a checkpoint; under ``--ft``, also
what a peer is served).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from desloc.algorithms import SyncedOptimizer
from desloc.comm.base import Communicator
from desloc.config import TrainConfig
from desloc.data import Corpus, DataConfig, WorkerStreams
from desloc.records import RunDir
from desloc.timing import TimeModel, VirtualClock
from desloc.workers import Workers


class Engine(ABC):
    """Where the workers of a run live (see the module docstring)."""

    name: str  # the backend recorded in summary.json: "sim", "gloo", "nccl" or "torchft"
    device: str
    comm: Communicator | None = None  # this process's communicator (the simulator makes one per workers)
    shards: int = 1  # processes per worker (--shard)
    holds_all_workers = False  # every worker's tensors are in this process: a stop needs no agreement
    heals_from_peers = False  # a worker without a checkpoint of its own continues from a peer's state

    # ------------------------------------------------------------------------- layout
    @property
    @abstractmethod
    def is_main(self) -> bool:
        """Whether this process writes the run's records (metrics, summary, plots, latest.json)."""

    @classmethod
    def launched_as_main(cls) -> bool:
        """:attr:`is_main` before the engine is started (from the launcher's environment)."""
        return True

    @abstractmethod
    def make_workers(self, model: nn.Module, world_size: int) -> Workers:
        """The workers of ``model`` (freshly initialised, the same on every process)."""

    def prepare_corpus(self, data: DataConfig) -> Corpus:
        """The tokenizer and token cache of ``data``."""
        return Corpus.prepare(data, progress=False)

    # ---------------------------------------------------------------------- checkpoints
    @classmethod
    def resume_ranks(cls, cfg: TrainConfig) -> list[int]:
        """The checkpoint files a resume needs (every process's): one per run directory."""
        return [0]

    @property
    def checkpoint_rank(self) -> int:
        """This process's checkpoint file of a step."""
        return 0

    @property
    def checkpoint_files(self) -> int:
        """How many files a step's checkpoint has (latest.json's "ranks")."""
        return 1

    def save_checkpoint(self, run: RunDir, step: int, state: dict[str, Any]) -> None:
        """Write this process's part of the checkpoint of ``step``; the main process then points
        latest.json at it, once every process has written its part."""
        run.save_checkpoint(step, self.checkpoint_rank, state)
        self.after_save()
        if self.is_main:
            run.publish_checkpoint(step, ranks=self.checkpoint_files)

    def after_save(self) -> None:
        """Between this process's write and the publication of a checkpoint (one process: nothing)."""

    def load_checkpoint(self, run: RunDir, step: int) -> dict[str, Any]:
        """This process's checkpoint of ``step``, verified."""
        return run.load_checkpoint(self.checkpoint_rank, step)

    def checkpoint_extras(self) -> dict[str, Any]:
        """What this engine adds to a checkpoint (see :meth:`load_extras`)."""
        return {}

    def load_extras(self, ckpt: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_extras` added to ``ckpt``."""

    def localize(self, optimizer: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's optimizer state as this process loads it (unchanged but under --ft)."""
        return optimizer

    # -------------------------------------------------------------------------- summary
    def memory_summary(self, workers: Workers) -> dict[str, Any]:
        """Peak memory of this process (and, where there are several, of each)."""
        peak = peak_memory_bytes(self.device)
        return {"peak_memory_bytes": peak,
                "peak_memory_kind": "cuda_max_allocated" if self.device.startswith("cuda") else "max_rss",
                "peak_memory_per_process": self.per_process(workers, peak)}

    def per_process(self, workers: Workers, value: float) -> list[int]:
        """Every process's ``value`` (integers), in rank order: this process's only."""
        return [int(value)]

    def summary_extras(self) -> dict[str, Any]:
        """What this engine adds to summary.json."""
        return {}

    # ----------------------------------------------------------------------------- hooks
    def attach(self, session: Session) -> None:
        """``session`` was built on this engine (it is the state a peer is served under --ft)."""

    def start(self, s: Session, done: int) -> int:
        """The loop starts after ``done`` steps; returns the steps done (a heal moves it)."""
        return done

    def before_step(self, s: Session, done: int, elapsed: float) -> int:
        """Before step ``done + 1`` (``elapsed``: seconds so far); returns the steps done (a heal moves it)."""
        return done

    def settle(self, s: Session) -> bool:
        """After the step's ``opt.step()``: False if the step must be redone (its state was restored)."""
        return True

    def finish(self, s: Session, done: int) -> bool:
        """After the last step: True if the final state changed (came from a peer), so that the loop
        evaluates and checkpoints it again."""
        return False

    def shutdown(self) -> None:
        """The run is over (records written): leave the job."""


def peak_memory_bytes(device: str) -> int:
    """This process's peak memory: the CUDA caching allocator's peak on a GPU, else the peak
    resident set size (Linux ``ru_maxrss``; the whole process: interpreter, torch, data)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class Session:
    """Everything one run holds while it trains."""

    cfg: TrainConfig
    run: RunDir
    engine: Engine
    corpus: Corpus
    streams: WorkerStreams
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    workers: Workers
    opt: SyncedOptimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    n_params: int
    time_model: TimeModel
    clock: VirtualClock
    join_source: dict[str, Any] | None = None  # --join-states checkpoint: desloc.membership.join_source

    @property
    def device_type(self) -> str:
        return self.engine.device.split(":")[0]

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one step of the live workers."""
        return self.workers.world_size * self.cfg.batch_size * self.cfg.context

    def tokens_through(self, done: int) -> int:
        """Tokens of steps 1 .. ``done`` (membership events change the workers per step)."""
        from desloc.membership import parse_events, worker_steps

        return worker_steps(self.cfg.workers, parse_events(self.cfg.events), done) * self.cfg.batch_size * self.cfg.context


def load_state(s: Session, ckpt: dict[str, Any]) -> None:
    """Model, optimizer (states, step, ledger, outer state), LR schedule and clock from a checkpoint
    (or, under --ft, from a peer: the same dict)."""
    s.workers.load_model_state(ckpt["model"])
    s.opt.load_state_dict(s.engine.localize(ckpt["optimizer"]))
    s.sched.load_state_dict(ckpt["scheduler"])
    if "clock" in ckpt:
        s.clock.load_state_dict(ckpt["clock"])
    s.engine.load_extras(ckpt)


def checkpoint_state(s: Session, step: int, elapsed: float) -> dict[str, Any]:
    """Everything a run needs to continue after ``step`` (a checkpoint; under --ft, what a peer gets)."""
    state = {"step": step, "elapsed_s": elapsed, "data_fingerprint": s.corpus.fingerprint,
             "model": s.workers.model_state(), "optimizer": s.opt.state_dict(), "scheduler": s.sched.state_dict(),
             "clock": s.clock.state_dict()}
    if s.cfg.events:  # what --join-states checkpoint joiners get, also after a resume from here
        from desloc.membership import join_source

        s.join_source = join_source(s.cfg, step, state["optimizer"], s.join_source)
        if s.join_source is not None:
            state["join_source"] = s.join_source
    state.update(s.engine.checkpoint_extras())
    return state
