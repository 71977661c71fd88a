"""The torchft engine: one worker of a fault-tolerant job (``desloc train --ft``, :mod:`desloc.ft`).

:class:`TorchftEngine` is the layout: this process is one worker (a torchft replica group of one
process) with its own run directory, so it writes its own records and one checkpoint file, and
its communicator's participants change from round to round. :class:`FtRuntime` adds this worker's
torchft ``Manager`` and takes part in the training loop through the engine's hooks
(:meth:`~desloc.runtime.base.Engine.start`, :meth:`~desloc.runtime.base.Engine.before_step`,
:meth:`~desloc.runtime.base.Engine.settle`, :meth:`~desloc.runtime.base.Engine.finish`).

Rounds. A round is one torchft quorum. It is opened at the start of a step whose schedule has a
sync (``opt.schedule.due(t)``: DES-LOC's K_x, K_u, K_v; DDP every step) -- before the step's
forward pass, so the state a peer serves is a whole step's: the same as a checkpoint after step
t-1 -- and closed by the commit decision after the step's sync. Local steps never wait on the
network, and a worker never waits for a peer it does not sync with.

A failed sync is all-or-nothing for the whole step. When the round opens, the worker keeps an
in-memory snapshot of everything a checkpoint after step t-1 holds (one copy of the parameters
and optimizer states, taken at every step that syncs). If the round's commit fails, the method
has already acted on the un-averaged tensors inside ``opt.step()`` (DDP's inner step on the
local gradient, an outer step, a reset of states), so the whole step is undone: parameters,
optimizer states, step counter, ledger, outer state, LR schedule and modeled clock go back to
the snapshot, nothing of the step is logged, and the step is redone in a new round (batches and
dropout masks are a function of (seed, worker, step): the redo computes the same local step).
torchft decides commits per replica group, so the cases are:

* every participant's commit fails (e.g. a peer died during the all-reduce: every survivor's
  collective errors): all of them restore and redo the step together, without the dead peer;
* some commits fail while others succeed: the failed workers are one torchft step behind; the
  redo's round meets the others at their next sync round and the failed workers heal there;
* a worker dies between syncs: the others' next round goes on without it (after the
  Lighthouse's heartbeat timeout); restarted with the same command, it heals.

So after any pattern of failures the live workers hold the same parameters at the next
committed sync. A step that keeps failing (``MAX_FAILED_IN_A_ROW`` commits in a row) stops the
worker: a quorum smaller than ``--ft-min-replicas`` never commits.

Closing round. After the last step every worker takes part in one more round with a
one-element all-reduce (:meth:`TorchftComm.close_round`), so a worker whose last sync failed
while its peers' committed heals from a peer before the peers leave; it then writes its final
checkpoint from the healed state.

Healing. A worker that starts (fresh or restarted after a crash) or whose last commit failed
while its peers' succeeded is behind when its torchft step (committed rounds) is below its
peers'. In the first round it takes part in, torchft fetches a healthy peer's state over HTTP
and desloc loads it: parameters, optimizer states (every one, synced or not), the global step,
the LR schedule, the ledger, the outer optimizer's state and the modeled clock -- exactly what a
checkpoint holds. The worker then continues from the peer's step: it computes that step on its
own batch and takes part in the round's sync, like a worker that had been there all along with
the peer's state. Its metrics rows after the healed step are dropped (they belong to its earlier
life) and ``ft.jsonl`` says whom it healed from.

Founders. Every worker opens a round when it starts. If nobody is ahead, the workers that met
there commit it empty (nothing sent): their torchft step becomes 1, so a latecomer (step 0) is
behind and heals instead of training from the initial weights.

Records. ``<out>/replica<i>/`` is worker i's run directory (config, metrics, checkpoints,
summary, plots), plus ``ft.jsonl``: one line per round opened (step, seconds waited for the
quorum, participants, healed from whom; ``closing`` for the closing round), per commit decision,
and per redo of a step whose commit failed.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from desloc.comm.base import Communicator
from desloc.comm.torchft_comm import TorchftComm
from desloc.config import TrainConfig
from desloc.errors import ConfigError
from desloc.ft import FAULT_ENV, FtConfig, parse_faults, require_torchft
from desloc.runtime.base import Engine, Session, checkpoint_state, load_state
from desloc.workers import FtWorkers, Workers

MAX_FAILED_IN_A_ROW = 10  # failed commits of one step before the worker stops


class TorchftEngine(Engine):
    """One worker of a torchft job over ``comm``, whose rounds someone else opens and closes: a
    job's worker is a :class:`FtRuntime`; a bare ``TorchftEngine`` serves single-process
    references of a job (tests/test_ft.py)."""

    name = "torchft"
    heals_from_peers = True

    def __init__(self, comm: Communicator, device: str = "cpu"):
        self.comm = comm
        self.device = device

    @property
    def is_main(self) -> bool:
        return True  # its own run directory

    def make_workers(self, model: nn.Module, world_size: int) -> Workers:
        return FtWorkers(model, self.comm)

    def localize(self, optimizer: dict[str, Any]) -> dict[str, Any]:
        """The participants change from round to round: the optimizer's world size is this round's."""
        return {**optimizer, "desloc": {**optimizer["desloc"], "world_size": self.comm.world_size}}


def _detached(tree: Any) -> Any:
    """A copy that shares no tensor with the live run (the peer keeps training while it is served)."""
    return copy.deepcopy(tree) if not torch.is_tensor(tree) else tree.detach().clone()


class FtRuntime(TorchftEngine):
    """This worker's torchft Manager, its communicator, and the round / healing logic of the loop."""

    comm: TorchftComm

    def __init__(self, cfg: TrainConfig, run_path: Path):
        require_torchft()
        import warnings

        from torchft import Manager, ProcessGroupGloo

        from desloc.comm.torch_dist import local_store

        # torchft's checkpoint transport rebuilds tensors from a read-only buffer (harmless: they are copied)
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

        ft: FtConfig = cfg.ft
        self.cfg = cfg
        self.replica = ft.replica_id
        group_size = int(os.environ.get("WORLD_SIZE", "1"))
        if group_size != 1:
            raise ConfigError(f"--ft runs one process per replica group (torchrun --nproc_per_node 1 per group), got "
                              f"WORLD_SIZE={group_size}; sharded workers (--shard) run without --ft, under one torchrun")
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:  # torchrun: its agent's store
            self._store = None
            addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        else:  # a plain process: the replica group's own store
            self._store = local_store()
            addr, port = "127.0.0.1", self._store.port
        self.session: Session | None = None  # the loop's Session, set by attach()
        self.done = 0  # steps done, kept current by the loop (the state a peer is served)
        self.elapsed = 0.0
        self.healed: dict[str, Any] | None = None
        self.log_path = run_path / "ft.jsonl"
        timeout = timedelta(seconds=ft.timeout_s)
        self.quorum_timeout = timedelta(seconds=ft.quorum_timeout_s)
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=timeout), load_state_dict=self._load, state_dict=self._state,
            min_replica_size=ft.min_replicas, use_async_quorum=False, init_sync=False, rank=0, world_size=1,
            store_addr=addr, store_port=port, lighthouse_addr=ft.lighthouse_url, replica_id=f"desloc_{self.replica}",
            timeout=timeout, quorum_timeout=self.quorum_timeout, connect_timeout=timeout)
        super().__init__(TorchftComm(self.manager, world_size=cfg.workers, replica=self.replica), "cpu")
        self.comm.on_commit = self._on_commit
        self.rounds = 0
        self.heals: list[dict[str, Any]] = []
        self.redos = 0
        self._snapshot: dict[str, Any] | None = None  # the state before this step's sync (see settle)
        self._failed = False  # a commit of this step's round failed
        self._failed_in_a_row = 0
        self._closing = False
        self._faults = parse_faults(os.environ.get(FAULT_ENV, ""), self.replica)
        if self._faults:
            self.comm.after_reduce = self._inject
        self._write({"event": "start", "t": time.time(), "process_start_t": _process_start_time(), "pid": os.getpid()})

    # ---------------------------------------------------------------- torchft callbacks
    def attach(self, session: Session) -> None:
        self.session = session

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"torchft": self.manager.state_dict()}  # rounds committed so far

    def load_extras(self, ckpt: dict[str, Any]) -> None:
        if "torchft" in ckpt and self.healed is None:
            self.manager.load_state_dict(ckpt["torchft"])  # own checkpoint: rounds committed so far

    def summary_extras(self) -> dict[str, Any]:
        return {"ft": self.summary()}

    def _state(self) -> dict[str, Any]:
        """What a peer that is behind receives (torchft calls this while this worker waits in a round)."""
        s = self.session
        return {"replica": self.replica, "checkpoint": _detached(checkpoint_state(s, self.done, self.elapsed))}

    def _load(self, state: dict[str, Any]) -> None:
        """Adopt a peer's state (called by torchft in this thread, inside start_quorum)."""
        ckpt = state["checkpoint"]
        load_state(self.session, ckpt)
        self.healed = {"from": int(state["replica"]), "step": int(ckpt["step"]), "elapsed_s": ckpt["elapsed_s"]}

    # ------------------------------------------------------------------------- rounds
    def start(self, s: Session, done: int) -> int:
        """When the worker starts: join (heal from a peer if behind). Returns the steps done."""
        done = self._round(s, done)
        if self.healed is None and not s.opt.schedule.due(done + 1):
            self.comm.commit()  # nobody ahead: the founders' empty commit (see the module docstring)
        return done

    def before_step(self, s: Session, done: int, elapsed: float) -> int:
        """Before step done+1: if it syncs, open its round (unless open) and snapshot what a
        checkpoint after the step before it holds, for :meth:`settle`. Returns the steps done (a
        heal moves it; the snapshot is then the healed state)."""
        self.elapsed = elapsed
        self.done = done
        self._snapshot = None
        if not s.opt.schedule.due(done + 1):
            return done
        if not self.comm.round_open:
            done = self._round(s, done)
        self._failed = False
        snapshot = checkpoint_state(s, done, self.elapsed)
        snapshot.pop("torchft", None)  # torchft keeps its own count of committed rounds
        self._snapshot = _detached(snapshot)
        return done

    def settle(self, s: Session) -> bool:
        """After step done+1's ``opt.step()``: True if the step stands (it did not sync, or its
        round committed); False if its commit failed: the snapshot is restored and the loop
        redoes the step (in a new round, where a worker that is behind heals)."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None or not self._failed:
            self._failed_in_a_row = 0
            return True
        load_state(s, snapshot)
        self.redos += 1
        self._failed_in_a_row += 1
        self._write({"event": "redo", "step": self.done + 1, "t": time.time(), "participants": self.comm.world_size,
                     "failed_in_a_row": self._failed_in_a_row})
        if self._failed_in_a_row >= MAX_FAILED_IN_A_ROW:
            raise ConfigError(f"--ft: the sync of step {self.done + 1} failed to commit {self._failed_in_a_row} times "
                              f"in a row (last round: {self.comm.world_size} participants, --ft-min-replicas "
                              f"{self.cfg.ft.min_replicas}); start the Lighthouse with --min-replicas >= "
                              f"--ft-min-replicas, and see {self.log_path} and the peers' logs")
        return False

    def finish(self, s: Session, done: int) -> bool:
        """After the last step: the closing round (module docstring). Returns True if this
        worker's final state came from a peer (healed in the closing round, or in the redo of a
        last sync that failed): the loop then checkpoints it."""
        self.done = done
        self._closing = True
        try:
            if not self.comm.round_open:
                self._round(s, done)
            self.comm.close_round(timeout=self.quorum_timeout)
        finally:
            self._closing = False
        return bool(self.heals) and self.heals[-1]["at_step"] >= done

    def _inject(self, i: int, n: int) -> None:
        """``DESLOC_FT_FAULT``: called after the i-th of a sync's n per-tensor all-reduces."""
        step = self.done + 1
        for fault in self._faults:
            if fault.fired or fault.step != step or self._closing:
                continue
            if fault.kind == "kill" and i == 0:
                self._write({"event": "fault", "kind": "kill", "step": step, "t": time.time(), "after_reduce": i})
                os.kill(os.getpid(), signal.SIGKILL)
            if fault.kind == "commit" and i == n - 1:
                fault.fired = True
                self._write({"event": "fault", "kind": "commit", "step": step, "t": time.time()})
                self.manager.report_error(RuntimeError(f"{FAULT_ENV}: injected commit failure at step {step}"))

    def _round(self, s: Session, done: int) -> int:
        self.done = done
        self.healed = None
        t0 = time.perf_counter()
        self.comm.start_round(timeout=self.quorum_timeout)
        waited = time.perf_counter() - t0
        self.rounds += 1
        row = {"event": "round", "step": done + 1, "t": time.time(), "quorum_s": waited,
               "participants": self.comm.world_size, "manager_step": self.manager.current_step(),
               "healed_from": None, **({"closing": True} if self._closing else {})}
        if self.healed is not None:
            row.update(healed_from=self.healed["from"], step=self.healed["step"] + 1, healed_step=self.healed["step"])
            self.heals.append({"at_step": self.healed["step"], "from": self.healed["from"], "was_at": done})
            print(f"desloc: replica {self.replica}: healed from replica {self.healed['from']} at step "
                  f"{self.healed['step']} (was at {done}); {self.comm.world_size} participants", file=sys.stderr,
                  flush=True)
            done = self.healed["step"]
            self.done = done
            s.run.truncate_metrics(done)  # rows after the healed step belong to this worker's earlier life
        self._write(row)
        return done

    def _on_commit(self, ok: bool, seconds: float) -> None:
        self._failed = self._failed or not ok
        self._write({"event": "commit", "step": self.done + 1, "t": time.time(), "committed": ok,
                     "participants": self.comm.world_size, "commit_s": seconds,
                     **({"closing": True} if self._closing else {})})

    def _write(self, row: dict[str, Any]) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def summary(self) -> dict[str, Any]:
        return {"replica_id": self.replica, "lighthouse": self.cfg.ft.lighthouse, "rounds": self.rounds,
                "committed_syncs": self.comm.committed_syncs, "failed_syncs": self.comm.failed_syncs,
                "redos": self.redos, "heals": self.heals, "torchft_step": self.manager.current_step()}

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)


def _process_start_time() -> float | None:
    """Wall time this process started (Linux /proc), for restart -> rejoin times; None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


