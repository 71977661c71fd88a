"""A deterministic training workload that runs on both engines (simulator and real gloo).

Used by ``tests/test_gloo_equivalence.py`` and ``tests/test_resume.py``. Not a test module
itself (the leading underscore keeps pytest from collecting it).

* The model is a tiny MLP (4 -> 8 -> 1, tanh) built from a fixed seed, identical on every worker;
  ``model="scalar"`` in the job adds a 0-dim parameter (a learned output scale), whose optimizer
  states are 0-dim on torch.distributed, like Adam's ``step`` counter.
* Worker ``m`` at global step ``t`` trains on a batch drawn from a ``torch.Generator`` seeded by
  ``(seed, m, t)``: every worker sees different (non-IID: shifted by ``m``) data, and a resumed run
  sees exactly the batches the uninterrupted run saw.
* A *job* lists (method, inner) combinations and what to do with each: ``"full"`` (train
  ``0..steps`` and snapshot), ``"save"`` (train ``0..save_at`` and write a checkpoint) and/or
  ``"resume"`` (load that checkpoint into freshly built objects, train ``save_at..steps``,
  snapshot). Optional job keys: ``model`` ("mlp" or "scalar"), ``bucket_bytes`` (the gloo
  communicator's bucket size: small values split every all-reduce into several buckets) and
  ``observer`` (after every step each rank also averages its loss through the communicator as
  ``ProcessWorkers`` does for the logged metrics). :func:`run_job_sim` runs a job on :class:`~desloc.SimulatedComm`;
  :func:`spawn_ranks` runs it in ``world_size`` real processes on gloo with one
  ``torch.multiprocessing`` spawn for all combinations (spawning costs seconds, training
  milliseconds).

A *snapshot* is ``{"params": {name: T}, "states": {"<param>.<state>": T}, "scalars":
{"<param>.<state>": T}, "global_step": int, "ledger": dict, "ledger_summary": dict}``; in the
simulator ``T`` carries the
workers on dim 0, in a rank it is that rank's tensor. :func:`stack_ranks` turns the per-rank
snapshots into the simulator's layout so the two compare directly.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

from desloc import InnerConfig, MethodConfig, SimulatedComm, build_method
from desloc.sim import StackedReplicas

METHODS = ("ddp", "local-adam", "desloc", "keep-states", "reset-states")
INNERS = ("adamw", "sgdm", "adopt")
# Issue 4's methods: outer optimizers, MT-DAO, and GASLoC on every topology (``gasloc@slow``:
# one-peer gossip with the last worker doing 1 of H = 3 local steps per round).
EXTRA_COMBOS = (
    ("diloco", "adamw"), ("diloco", "sgdm"), ("desloc+nesterov", "adamw"), ("local-adam+nesterov", "adopt"),
    ("mtdao", "mtdao"), ("mtdao", "mtdao-adam"),
    ("gasloc@one-peer", "adamw"), ("gasloc@two-peer", "adamw"), ("gasloc@ring", "sgdm"),
    ("gasloc@complete", "adamw"), ("gasloc@none", "adamw"), ("gasloc@slow", "adamw"),
)
COMBOS = tuple((m, i) for m in METHODS for i in INNERS) + EXTRA_COMBOS

# desloc: K_x, K_u, K_v pairwise distinct so parameters and each state sync at different steps;
# local-adam / keep-states / reset-states: K = 3.
DESLOC_PERIODS = (2, 3, 5)
LOCAL_PERIOD = 3
STEPS = 13  # not a multiple of any period: the run ends mid-period too
SAVE_AT = 7  # checkpoint step: a multiple of none of 2, 3, 5 -- mid-period for every method
SEED = 1234
BATCH = 8


def combo_key(method: str, inner: str) -> str:
    return f"{method}/{inner}"


# ------------------------------------------------------------------------------- configuration
def method_config(method: str, world_size: int = 2, sync: dict | None = None) -> MethodConfig:
    """The combo's config; ``sync`` (a job variant) sets ``overlap`` and/or ``param_delay``
    ("max" = K_x - 1)."""
    cfg = _method_config(method, world_size)
    for key, value in (sync or {}).items():
        if key == "param_delay" and value == "max":
            value = cfg.period_x - 1
        if key in ("overlap", "param_delay"):
            setattr(cfg, key, value)
    return MethodConfig(**cfg.to_dict()) if sync else cfg  # validated again


def supports_delay(method: str) -> bool:
    return not (method == "ddp" or method.startswith("gasloc"))


def _method_config(method: str, world_size: int = 2) -> MethodConfig:
    if "@" in method:  # gasloc@<topology>
        topology = method.split("@", 1)[1]
        if topology == "slow":
            return MethodConfig("gasloc", period_x=LOCAL_PERIOD, topology="one-peer",
                                local_steps=[LOCAL_PERIOD] * (world_size - 1) + [1])
        return MethodConfig("gasloc", period_x=LOCAL_PERIOD, topology=topology)
    if method.endswith("+nesterov"):
        base = _method_config(method.split("+")[0], world_size)
        base.outer = "nesterov"
        return base
    if method == "mtdao":
        return MethodConfig("mtdao", period_x=LOCAL_PERIOD, momentum_periods=[2, 5], period_v=4)
    if method == "desloc":
        kx, ku, kv = DESLOC_PERIODS
        return MethodConfig(method, period_x=kx, period_u=ku, period_v=kv)
    if method == "ddp":
        return MethodConfig(method, period_x=1)
    return MethodConfig(method, period_x=LOCAL_PERIOD)


# ADOPT's eps. Its step divides by max(sqrt(v), eps), and right after reset-states zeroes v that
# is eps itself: a gradient difference dg then moves u by up to (1 - beta1) dg / eps and x by
# lr (1 - beta1) dg / eps. At the default 1e-6 that is 1e5 dg and 1e3 dg: the delayed reset-states
# run at M = 4 meets |g| = 1.8e-6 (inside the unclamped zone |g| < eps t^(1/4)) at step 11, and
# two summation orders of the means then end 4e-5 apart in x and 3e-3 in u, far above what the
# rounding of the means can explain (tests/_numerics.py). At 1e-2 the gains are 10 dg and 0.1 dg,
# the run is well-conditioned, and v is still used (sqrt(v) = |g_0| > 1e-2 without resets).
ADOPT_EPS = 1e-2
# The amplification budget of this workload (tests/_numerics.py: reorder_tolerance's ``gain``):
# how much the STEPS inner steps may magnify the differences that two summation orders inject
# into the means. tests/test_simulator.py checks every combo against it in the simulator under
# other summation orders (measured: |diff| / bound <= 0.1, the largest for reset-states x ADOPT).
REORDER_GAIN = 10.0


def inner_config(inner: str) -> InnerConfig:
    # Large enough learning rates that every step visibly moves the parameters.
    return InnerConfig(inner, lr=0.05 if inner == "sgdm" else 0.01, weight_decay=0.01,
                       eps=ADOPT_EPS if inner == "adopt" else None)


class ScaledMLP(nn.Module):
    """The MLP times a learned 0-dim scale (a scalar parameter)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.scale = nn.Parameter(torch.tensor(1.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def make_model(seed: int = SEED, kind: str = "mlp") -> nn.Module:
    """The MLP (``kind="scalar"``: with a 0-dim scale), initialised from ``seed`` without
    touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "scalar":
            return ScaledMLP()
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def make_batch(seed: int, worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker ``worker``'s batch at global step ``step``: a function of (seed, worker, step) only."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + worker) * 1_000_003 + step)
    x = torch.randn(BATCH, 4, generator=g) + 0.5 * worker
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(BATCH, 1, generator=g)
    return x, y


def _loss(model: nn.Module, seed: int, worker: int, step: int) -> torch.Tensor:
    x, y = make_batch(seed, worker, step)
    return ((model(x) - y) ** 2).mean()


# Per-coordinate optimizer states, by name (every inner optimizer's declared state roles). Shapes
# cannot tell them from scalar counters: a 0-dim parameter's moments are 0-dim on a rank.
STATE_NAMES = frozenset(n for i in INNERS + ("mtdao", "mtdao-adam") for n in InnerConfig(i).state_roles())


def _split_state(params: dict[str, torch.Tensor], opt) -> tuple[dict, dict]:
    states, scalars = {}, {}
    for name, p in params.items():
        for key, value in opt.inner.state[p].items():
            if key in STATE_NAMES:
                states[f"{name}.{key}"] = value.detach().clone()
            else:
                scalars[f"{name}.{key}"] = value.detach().clone() if torch.is_tensor(value) else value
    return states, scalars


def _snapshot(params: dict[str, torch.Tensor], opt) -> dict[str, Any]:
    states, scalars = _split_state(params, opt)
    return {
        "params": {n: p.detach().clone() for n, p in params.items()},
        "states": states,
        "scalars": scalars,
        "global_step": opt.global_step,
        "ledger": opt.comm.ledger.state_dict(),
        "ledger_summary": opt.comm.ledger.summary(),
        "buckets_reduced": getattr(opt.comm, "buckets_reduced", None),  # gloo: network all-reduces
    }


# ------------------------------------------------------------------------------------ simulator
class ReorderedComm(SimulatedComm):
    """The simulator with another, equally valid, summation order in every mean: ``order`` is a
    permutation of the workers (summed left to right) or ``"pairwise"`` ((x_0 + x_1) + (x_2 + x_3)
    + ...). What gloo's ring (each chunk starts at another rank) or another CPU's kernels do."""

    def __init__(self, world_size: int, order: tuple[int, ...] | str):
        super().__init__(world_size)
        if order != "pairwise" and sorted(order) != list(range(world_size)):
            raise ValueError(f"order must be a permutation of range({world_size}) or 'pairwise', got {order!r}")
        self.order = order

    def _average(self, tensors) -> None:
        for tensor in tensors:
            rows = list(tensor) if self.order == "pairwise" else [tensor[m] for m in self.order]
            if self.order == "pairwise":
                while len(rows) > 1:
                    rows = [rows[i] + rows[i + 1] if i + 1 < len(rows) else rows[i] for i in range(0, len(rows), 2)]
                total = rows[0]
            else:
                total = rows[0].clone()
                for row in rows[1:]:
                    total += row
            tensor.copy_((total / self.world_size).expand_as(tensor))


def build_sim(method: str, inner: str, world_size: int, seed: int = SEED, model: str = "mlp",
              sync: dict | None = None, sum_order: tuple[int, ...] | str | None = None):
    """``sum_order``: None for :class:`SimulatedComm`, else :class:`ReorderedComm`'s order."""
    comm = SimulatedComm(world_size) if sum_order is None else ReorderedComm(world_size, sum_order)
    replicas = StackedReplicas(make_model(seed, model), world_size)
    icfg = inner_config(inner)
    opt = build_method(method_config(method, world_size, sync), icfg.build(replicas.parameters()), comm,
                       icfg.state_roles(), zero_copy=(sync or {}).get("zero_copy", True))
    return replicas, opt


def train_sim(replicas: StackedReplicas, opt, start: int, stop: int, seed: int = SEED) -> None:
    for step in range(start, stop):
        replicas.zero_grad()
        for m in range(replicas.world_size):
            _loss(replicas[m], seed, m, step).backward()
        replicas.collect_grads()
        opt.step()


def snapshot_sim(replicas: StackedReplicas, opt) -> dict[str, Any]:
    return _snapshot(dict(replicas.named_parameters()), opt)


def run_simulated(method: str, inner: str, world_size: int, steps: int = STEPS, seed: int = SEED,
                  model: str = "mlp", sync: dict | None = None, sum_order: tuple[int, ...] | str | None = None) -> dict:
    """Train ``steps`` steps on the simulator; the snapshot's tensors are stacked ``[M, ...]``."""
    replicas, opt = build_sim(method, inner, world_size, seed, model, sync, sum_order)
    train_sim(replicas, opt, 0, steps, seed)
    return snapshot_sim(replicas, opt)


def run_job_sim(world_size: int, job: dict) -> dict[str, dict]:
    """Run ``job`` (see :func:`make_job`) on the simulator; checkpoints are ``*__sim.pt``.

    With one intra-op thread, as every gloo rank (:func:`rank_main`): torch splits a reduction
    among threads differently with more, so the bitwise comparisons hold whatever the caller's
    ``OMP_NUM_THREADS``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_job_sim(world_size, job)
    finally:
        torch.set_num_threads(threads)


def _run_job_sim(world_size: int, job: dict) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for method, inner in job["combos"]:
        key = combo_key(method, inner)
        out: dict[str, Any] = {}
        if "full" in job["ops"]:
            for name, sync in _full_runs(method, job):
                out[name] = run_simulated(method, inner, world_size, job["steps"], job["seed"], job.get("model", "mlp"),
                                          sync)
        if "save" in job["ops"]:
            replicas, opt = build_sim(method, inner, world_size, job["seed"], sync=job.get("sync"))
            train_sim(replicas, opt, 0, job["save_at"], job["seed"])
            torch.save({"model": replicas.state_dict(), "optim": opt.state_dict()},
                       checkpoint_path(job["ckpt_dir"], method, inner, "sim"))
        if "resume" in job["ops"]:
            replicas, opt = build_sim(method, inner, world_size, job["seed"], sync=job.get("sync"))
            ckpt = torch.load(checkpoint_path(job["ckpt_dir"], method, inner, "sim"))
            replicas.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optim"])
            train_sim(replicas, opt, job["save_at"], job["steps"], job["seed"])
            out["resumed"] = snapshot_sim(replicas, opt)
        results[key] = out
    return results


def _sim_entry(world_size: int, job: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    torch.save(run_job_sim(world_size, job), out_path)


def run_sim_in_fresh_process(world_size: int, job: dict, workdir: str | os.PathLike, timeout_s: float = 90.0) -> dict:
    """Run ``job`` on the simulator in a newly spawned interpreter (nothing shared in memory)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_path = workdir / "sim_result.pt"
    proc = mp.get_context("spawn").Process(target=_sim_entry, args=(world_size, job, str(out_path)))
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
        raise TimeoutError(f"simulator process did not finish within {timeout_s}s")
    if proc.exitcode != 0:
        raise RuntimeError(f"simulator process exited with code {proc.exitcode}")
    return torch.load(out_path)


# ------------------------------------------------------------------------------------ real gloo
def build_dist(method: str, inner: str, seed: int = SEED, model: str = "mlp", bucket_bytes: int | None = None,
               sync: dict | None = None):
    from desloc.comm.torch_dist import TorchDistComm

    comm = TorchDistComm() if bucket_bytes is None else TorchDistComm(bucket_bytes=bucket_bytes)
    model = make_model(seed, model)
    icfg = inner_config(inner)
    opt = build_method(method_config(method, comm.world_size, sync), icfg.build(model.parameters()), comm,
                       icfg.state_roles(), zero_copy=(sync or {}).get("zero_copy", True))
    return model, opt


def train_dist(model: nn.Module, opt, rank: int, start: int, stop: int, seed: int = SEED,
               observer: bool = False) -> None:
    from desloc.workers import ProcessWorkers

    workers = ProcessWorkers(model, opt.comm) if observer else None
    for step in range(start, stop):
        model.zero_grad(set_to_none=False)  # in place, as the training loop: DDP's grads stay flat views
        loss = _loss(model, seed, rank, step)
        loss.backward()
        opt.step()
        if workers is not None:  # logged metrics, averaged through the same communicator
            workers._mean([loss.item(), float(step)])


def snapshot_dist(model: nn.Module, opt) -> dict[str, Any]:
    return _snapshot(dict(model.named_parameters()), opt)


def checkpoint_path(ckpt_dir: str | os.PathLike, method: str, inner: str, rank: int | str) -> Path:
    return Path(ckpt_dir) / f"{method}__{inner}__rank{rank}.pt"


def _full_runs(method: str, job: dict) -> list[tuple[str, dict | None]]:
    """The "full" runs of a combo: ``full`` with the job's ``sync`` options, and ``full#<name>``
    for each of the job's ``variants`` (sync options) that apply to the method."""
    runs = [("full", job.get("sync"))]
    for name, sync in job.get("variants", {}).items():
        if "param_delay" in sync and not supports_delay(method):
            continue
        runs.append((f"full#{name}", sync))
    return runs


def run_job_rank(rank: int, job: dict) -> dict[str, dict]:
    """This rank's part of ``job`` (process group already initialised)."""
    results: dict[str, dict] = {}
    for method, inner in job["combos"]:
        out: dict[str, Any] = {}
        if "full" in job["ops"]:
            for name, sync in _full_runs(method, job):
                model, opt = build_dist(method, inner, job["seed"], job.get("model", "mlp"), job.get("bucket_bytes"),
                                        sync)
                train_dist(model, opt, rank, 0, job["steps"], job["seed"], job.get("observer", False))
                out[name] = snapshot_dist(model, opt)
        if "save" in job["ops"]:
            model, opt = build_dist(method, inner, job["seed"], sync=job.get("sync"))
            train_dist(model, opt, rank, 0, job["save_at"], job["seed"])
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()},
                       checkpoint_path(job["ckpt_dir"], method, inner, rank))
        if "resume" in job["ops"]:
            model, opt = build_dist(method, inner, job["seed"], sync=job.get("sync"))
            ckpt = torch.load(checkpoint_path(job["ckpt_dir"], method, inner, rank))
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optim"])
            train_dist(model, opt, rank, job["save_at"], job["steps"], job["seed"])
            out["resumed"] = snapshot_dist(model, opt)
        results[combo_key(method, inner)] = out
    return results


def rank_main(rank: int, world_size: int, init_file: str, out_dir: str, job: dict, timeout_s: float,
              run_job=None) -> None:
    """Entry point for ``torch.multiprocessing`` spawn: init gloo, run the job (``run_job(rank, job)``,
    default :func:`run_job_rank`), save results."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 cores, up to 4 ranks
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        results = (run_job or run_job_rank)(rank, job)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def spawn_ranks(world_size: int, job: dict, workdir: str | os.PathLike, timeout_s: float = 120.0,
                target=None) -> list[dict]:
    """Run ``job`` in ``world_size`` gloo processes; returns each rank's results.

    ``target`` (default :func:`rank_main`, same signature) must be importable by name.
    Raises ``TimeoutError`` (after killing the ranks) if they have not all finished within
    ``timeout_s``, and ``ProcessRaisedException`` if one of them failed.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    init_file = workdir / "gloo_filestore"
    if init_file.exists():
        init_file.unlink()
    for r in range(world_size):
        (workdir / f"rank{r}.pt").unlink(missing_ok=True)
    # Collectives inside the ranks time out a little before the test does.
    ctx = mp.start_processes(
        target or rank_main, args=(world_size, str(init_file), str(workdir), job, max(10.0, timeout_s - 15)),
        nprocs=world_size, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.05, deadline - time.monotonic()), grace_period=5):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(10)
            raise TimeoutError(f"{world_size} gloo ranks did not finish within {timeout_s}s")
    return [torch.load(workdir / f"rank{r}.pt") for r in range(world_size)]


# One 2-rank and one 4-rank gloo run per pytest session, shared by the test modules: ops
# ("full", "save") -- uninterrupted runs of every combination plus mid-period checkpoints.
# Extra "full" runs of every combo in the shared session run (tests/test_overlap_gloo.py): fully
# blocking syncs, the copying (non-zero-copy) path, and the delayed parameter sync (d = K_x - 1).
SESSION_VARIANTS = {"blocking": {"overlap": False}, "copy": {"zero_copy": False}, "delay": {"param_delay": "max"}}

_SESSION_RUNS: dict[int, Any] = {}


def session_gloo_run(world_size: int, workdir_factory, timeout_s: float) -> tuple[list[dict], str]:
    """``(per-rank results, checkpoint dir)`` of the session's ``world_size``-rank reference run.

    The run happens once per session (``workdir_factory()`` gives it a directory); a failure is
    cached too, so every test that needs it fails fast with the same error.
    """
    if world_size not in _SESSION_RUNS:
        try:
            workdir = Path(workdir_factory())
            ckpt_dir = workdir / "ckpt"
            ckpt_dir.mkdir()
            ranks = spawn_ranks(world_size, make_job(("full", "save"), ckpt_dir=ckpt_dir, variants=SESSION_VARIANTS),
                                workdir, timeout_s)
            _SESSION_RUNS[world_size] = (ranks, str(ckpt_dir))
        except Exception as exc:  # noqa: BLE001 - re-raised below, for every caller
            _SESSION_RUNS[world_size] = exc
    run = _SESSION_RUNS[world_size]
    if isinstance(run, Exception):
        raise RuntimeError(f"the {world_size}-rank gloo reference run failed: {run!r}") from run
    return run


def make_job(ops: tuple[str, ...], combos=COMBOS, steps: int = STEPS, save_at: int = SAVE_AT,
             ckpt_dir: str | os.PathLike | None = None, seed: int = SEED, **options: Any) -> dict:
    """``options``: ``model``, ``bucket_bytes``, ``observer`` (module docstring; "full" only);
    ``sync`` (MethodConfig ``overlap`` / ``param_delay``, build ``zero_copy``: every op) and
    ``variants`` (name -> sync: extra "full" runs, ``full#<name>``)."""
    unknown = set(options) - {"model", "bucket_bytes", "observer", "sync", "variants"}
    if unknown:
        raise ValueError(f"unknown job options {sorted(unknown)}")
    return {"ops": tuple(ops), "combos": [tuple(c) for c in combos], "steps": steps, "save_at": save_at,
            "ckpt_dir": None if ckpt_dir is None else str(ckpt_dir), "seed": seed, **options}


def stack_ranks(snapshots: list[dict]) -> dict[str, Any]:
    """Per-rank snapshots -> the simulator's layout (tensors stacked on dim 0, rank order).

    ``scalars`` and ``ledger`` are identical on every rank in a correct run; they are returned
    as per-rank lists (``scalars[name]``, ``ledgers``, ``ledger_summaries``) for the caller to check.
    """
    first = snapshots[0]
    return {
        "params": {n: torch.stack([s["params"][n] for s in snapshots]) for n in first["params"]},
        "states": {n: torch.stack([s["states"][n] for s in snapshots]) for n in first["states"]},
        "scalars": {n: [s["scalars"][n] for s in snapshots] for n in first["scalars"]},
        "global_steps": [s["global_step"] for s in snapshots],
        "ledgers": [s["ledger"] for s in snapshots],
        "ledger_summaries": [s["ledger_summary"] for s in snapshots],
    }
