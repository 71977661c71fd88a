"""``desloc train --ft``: a sync that fails is undone for the whole step on every live worker.

Failures are injected through ``DESLOC_FT_FAULT`` (:mod:`desloc.ft`) into real worker processes
and a real Lighthouse (``benchmarks/ft_job.py``):

* For every method (ddp, local-adam, desloc, desloc + Nesterov, diloco, reset-states, mtdao),
  two workers, 12 steps: replica 1's commit fails at step 4 (its peer commits), every
  participant's commit fails at step 8, and replica 0's commit of the last round (step 12)
  fails. Each failed worker restores its snapshot and redoes the step; replica 1 heals from its
  peer at the next round, replica 0 in the closing round. Both workers end bitwise equal, and
  bitwise equal to a reference that trains the two workers in one process, every sync averaging
  both workers' tensors (what the commits that failed had already sent) and each heal copying
  the peer's state where ft.jsonl says it happened. Two workers make the comparison exact: a
  two-term sum is the same in any order, and both torchft and the reference divide that sum by 2.
  Metrics rows are not repeated by the redos.
* A worker SIGKILLs itself between the per-tensor all-reduces of one sync: both survivors'
  commits fail, they redo the step together with two participants and end identical (an outer
  step on un-averaged parameters would leave their outer anchors different for good); the
  worker, started again with the same command, heals from a survivor and ends identical too.

Skipped when torchft is not installed (``pip install -e '.[ft]'``).
"""

from __future__ import annotations

import copy
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft", reason="torchft is an optional extra: pip install -e '.[ft]'")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from ft_job import FtJob  # noqa: E402

from desloc import loop  # noqa: E402
from desloc.comm.base import Communicator, PendingReduce  # noqa: E402
from desloc.comm.ledger import CommLedger  # noqa: E402
from desloc.errors import ConfigError  # noqa: E402
from desloc.ft import parse_faults  # noqa: E402
from desloc.records import RunDir  # noqa: E402
from desloc.train import TrainConfig  # noqa: E402

COMMON = ["--batch-size", "4", "--log-every", "2", "--ckpt-every", "16", "--seed", "3"]
METHODS = {  # every one syncs at steps 4, 8 and 12 (K_x = 2; DDP every step)
    "ddp": ["--method", "ddp"],
    "local-adam": ["--method", "local-adam", "--kx", "2"],
    "desloc": ["--method", "desloc", "--kx", "2"],
    "desloc+nesterov": ["--method", "desloc", "--kx", "2", "--outer", "nesterov", "--outer-momentum", "0.5"],
    "diloco": ["--method", "diloco", "--kx", "2", "--outer-momentum", "0.5"],
    "reset-states": ["--method", "reset-states", "--kx", "2"],
    "mtdao": ["--method", "mtdao", "--kx", "2"],
}
FAULTS = "commit:4:1,commit:8:*,commit:12:0"


# ----------------------------------------------------------------------------- reference
class Exchange:
    """One step's sync among the reference's workers: each member hands in its tensors; every
    member gets their sum in member order divided by the member count (torchft's AVG)."""

    def __init__(self) -> None:
        self.members: list[int] = []
        self.handed: dict[int, list[torch.Tensor]] = {}
        self.barrier = threading.Barrier(1)

    def begin(self, members: list[int]) -> None:
        self.members, self.handed = sorted(members), {}
        self.barrier = threading.Barrier(len(self.members), timeout=60)

    def reduce(self, rank: int, tensors: list[torch.Tensor]) -> None:
        if rank not in self.members:
            return  # not in this round: its tensors stay its own
        self.handed[rank] = list(tensors)
        self.barrier.wait()
        n = len(self.members)
        means = []
        for i in range(len(tensors)):
            total = self.handed[self.members[0]][i].clone()
            for m in self.members[1:]:
                total += self.handed[m][i]
            means.append(total / n)
        self.barrier.wait()  # everyone has read the others' tensors before any is overwritten
        for t, mean in zip(tensors, means):
            t.copy_(mean)


class LockstepComm(Communicator):
    """The reference's communicator for worker ``rank``: syncs through the shared :class:`Exchange`."""

    def __init__(self, rank: int, world_size: int, exchange: Exchange):
        self.rank = rank
        self.world_size = world_size
        self.ledger = CommLedger(world_size)
        self.exchange = exchange

    @property
    def stacked(self) -> bool:
        return False

    def worker_numel(self, tensor: torch.Tensor) -> int:
        return tensor.numel()

    def all_reduce_mean(self, tensors, tags) -> None:
        self.exchange.reduce(self.rank, list(tensors))

    def all_reduce_mean_flat(self, buffers, tags, hidden_steps=None):
        self.exchange.reduce(self.rank, list(buffers))
        return [PendingReduce(b) for b in buffers]


def reference(config: dict, workers: int, steps: int, members, heals: dict[int, list[tuple[int, int]]],
              workdir: Path) -> list[dict[str, torch.Tensor]]:
    """The job in one process: every worker steps on its own batches (forward and backward in
    turn, the optimizer steps in threads that meet in each sync); ``members(t)`` are the workers
    whose tensors step t's sync averages; ``heals[h]`` = [(worker, source)]: after step h the
    worker takes the source's whole state. Returns every worker's final parameters."""
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1)
    cfg = TrainConfig.from_dict(config)
    exchange = Exchange()
    sessions = [loop.build(cfg, RunDir(workdir / f"ref{i}"), "torchft", "cpu", LockstepComm(i, workers, exchange))
                for i in range(workers)]

    def heal(done: int) -> None:
        for i, src in heals.get(done, []):
            loop.load_state(sessions[i], copy.deepcopy(loop.checkpoint_state(sessions[src], done, 0.0)))

    for step in range(steps):
        heal(step)
        exchange.begin(members(step + 1))
        for i, s in enumerate(sessions):
            s.workers.forward_backward([s.streams.batch(i, step)], "cpu", False, seed=cfg.seed, step=step)
        errors: list[BaseException] = []

        def opt_step(s) -> None:
            try:
                s.opt.step()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                exchange.barrier.abort()

        threads = [threading.Thread(target=opt_step, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            raise errors[0]
        for s in sessions:
            s.sched.step()
    heal(steps)
    return [{k: v.detach().clone() for k, v in s.workers.net.state_dict().items()} for s in sessions]


def heals_of(rounds: dict[int, list[dict]]) -> dict[int, list[tuple[int, int]]]:
    heals: dict[int, list[tuple[int, int]]] = {}
    for i, rows in rounds.items():
        for r in rows:
            if r["event"] == "round" and r.get("healed_from") is not None:
                heals.setdefault(r["healed_step"], []).append((i, r["healed_from"]))
    return heals


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------- tests
def test_fault_specs_are_parsed_per_replica_and_bad_ones_name_the_variable():
    faults = parse_faults("commit:4:1, commit:8:*,kill:9:0+2", replica=2)
    assert [(f.kind, f.step) for f in faults] == [("commit", 8), ("kill", 9)]
    assert parse_faults("", replica=0) == []
    for bad in ("commit:4", "crash:4:1", "commit:0:1", "commit:x:1", "kill:4:a"):
        with pytest.raises(ConfigError, match="DESLOC_FT_FAULT"):
            parse_faults(bad, replica=0)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("method", list(METHODS))
def test_failed_commits_are_undone_for_the_whole_step_on_every_worker(tmp_path, method):
    steps = 12
    args = [*COMMON, *METHODS[method], "--steps", str(steps), "--eval-every", str(steps)]
    with FtJob(tmp_path / "job", workers=2, train_args=args, min_replicas=2,
               extra_env={"DESLOC_FT_FAULT": FAULTS}) as job:
        job.start()
        rcs = job.wait(300)
        assert rcs == {0: 0, 1: 0}, [job.log(i) for i in range(2)]
        rounds = {i: job.rounds(i) for i in range(2)}
        models = [job.final_model(i, steps) for i in range(2)]
        summaries = [job.summary(i) for i in range(2)]
        metrics = [RunDir(job.out / f"replica{i}").read_metrics() for i in range(2)]
        config = json.loads((job.out / "replica0" / "config.json").read_text())

    def failed(i: int) -> list[int]:
        return [r["step"] for r in rounds[i] if r["event"] == "commit" and not r["committed"]]

    def redone(i: int) -> list[int]:
        return [r["step"] for r in rounds[i] if r["event"] == "redo"]

    heals = heals_of(rounds)
    assert _equal(models[0], models[1]), f"the workers differ: max {_max_diff(models[0], models[1]):.3e}"
    ref = reference(config, 2, steps, lambda t: [0, 1], heals, tmp_path)
    assert _equal(models[0], ref[0]), f"max difference to the reference {_max_diff(models[0], ref[0]):.3e}"
    assert _equal(ref[0], ref[1])
    assert failed(0) == redone(0) == [8, 12] and failed(1) == redone(1) == [4, 8], rounds
    # replica 1 healed from replica 0 at its next round; replica 0 in the closing round, at the end
    assert heals[steps] == [(0, 1)] and [(w, src) for h, ws in heals.items() if h < steps for w, src in ws] == [(1, 0)]
    closing = [r for r in rounds[1] if r["event"] == "commit" and r.get("closing")]
    assert len(closing) == 1 and closing[0]["committed"]
    for i in range(2):
        assert summaries[i]["status"] == "complete" and summaries[i]["ft"]["redos"] == 2
        logged = [row["step"] for row in metrics[i]]
        assert logged == sorted(set(logged)), f"replica {i} logged a step twice: {logged}"
    assert summaries[0]["final_val_loss"] == summaries[1]["final_val_loss"]


@pytest.mark.timeout(600)
def test_a_worker_killed_during_an_all_reduce_leaves_the_survivors_identical_and_heals(tmp_path):
    steps, victim, at = 96, 2, 12  # DES-LOC + Nesterov: params and exp_avg (K_u = 12) all-reduced one by one
    args = [*COMMON, "--method", "desloc", "--outer", "nesterov", "--outer-momentum", "0.5", "--kx", "4",
            "--steps", str(steps), "--eval-every", str(steps), "--log-every", "4"]
    with FtJob(tmp_path / "job", workers=3, train_args=args, min_replicas=2, heartbeat_timeout_ms=1000,
               extra_env={"DESLOC_FT_FAULT": f"kill:{at}:{victim}"}) as job:
        job.start()
        assert job.procs[victim].wait(240) == -9, job.log(victim)  # it killed itself inside step 12's sync
        job.launch(victim)  # the same command: it rejoins
        rcs = job.wait(480)
        assert rcs == {0: 0, 1: 0, 2: 0}, [job.log(i) for i in range(3)]
        rounds = {i: job.rounds(i) for i in range(3)}
        models = [job.final_model(i, steps) for i in range(3)]
    for m in models[1:]:
        assert _equal(models[0], m), f"the workers disagree after the last sync: max {_max_diff(models[0], m):.3e}"
    fault = [r for r in rounds[victim] if r["event"] == "fault"]
    assert [(r["kind"], r["step"], r["after_reduce"]) for r in fault] == [("kill", at, 0)]
    for i in (0, 1):  # both survivors' commits failed; they redid step 12 together, without the victim
        at_step = [r for r in rounds[i] if r.get("step") == at and r["event"] in ("commit", "redo")]
        assert [(r["event"], r.get("committed")) for r in at_step] == [("commit", False), ("redo", None),
                                                                        ("commit", True)], at_step
        assert at_step[-1]["participants"] == 2
    heals = [r for r in rounds[victim] if r["event"] == "round" and r.get("healed_from") is not None]
    assert len(heals) == 1 and heals[0]["healed_from"] in (0, 1) and at <= heals[0]["healed_step"] < steps - 4
