"""Sharded replica groups vs unsharded workers, in one set of 4 gloo processes (tests/test_sharded.py).

For each (method, inner) of a job, every process runs:

1. **sharded**: the 4 processes form a (replicate=2, shard=2) mesh; worker r is the FSDP2 replica
   group {2r, 2r+1}; the method's optimizer runs on :class:`desloc.comm.mesh.MeshComm`. Worker r's
   batch at step t is split by rows over its two shards.
2. **unsharded**: processes 0 and 1 are two whole workers (a 2-process subgroup,
   :class:`~desloc.comm.torch_dist.TorchDistComm`), worker r training on the whole batch.

Same model initialisation, same batches per worker. With ``job["whole"]`` each combination also
runs sharded with every shard computing on the *whole* batch (``sharded-whole``): FSDP's gradient
average of N equal gradients is then exact, and the run must equal the unsharded one bit for bit --
which checks the orchestration (what is averaged over which group, when) with no tolerance. Each process saves a snapshot: full tensors
of its worker's parameters and optimizer states (``DTensor.full_tensor()`` for the sharded run),
the ledger (a replica group's, and this process's), and the scalars (Adam's step).
"""

from __future__ import annotations

from typing import Any

import torch

from desloc import build_method
from desloc.model import GPT, GPTConfig

import _dist_workload
from _dist_workload import STATE_NAMES, inner_config, method_config

SEED = 4321
VOCAB, CONTEXT, BATCH = 48, 16, 4
STEPS = 11  # ends mid-period of every method (K = 3; desloc 2, 3, 5): the workers differ at the end
SHARDS = 2


def make_gpt() -> GPT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=CONTEXT, vocab_size=VOCAB))


def make_batch(worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker ``worker``'s batch at ``step`` (non-IID: each worker draws from its own token range)."""
    g = torch.Generator().manual_seed((SEED * 1_000_003 + worker) * 1_000_003 + step)
    lo = 8 * worker
    tokens = torch.randint(lo, lo + VOCAB // 2, (BATCH, CONTEXT + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _snapshot(model, opt, full) -> dict[str, Any]:
    params = dict(model.named_parameters())
    states, scalars = {}, {}
    for name, p in params.items():
        for key, value in opt.inner.state[p].items():
            if key in STATE_NAMES:
                states[f"{name}.{key}"] = full(value).detach().clone()
            else:
                scalars[f"{name}.{key}"] = full(value).detach().clone() if torch.is_tensor(value) else value
    out = {"params": {n: full(p).detach().clone() for n, p in params.items()}, "states": states,
           "scalars": scalars, "global_step": opt.global_step, "ledger": opt.comm.ledger.summary()}
    if hasattr(opt.comm, "process_ledger"):
        out["process_ledger"] = opt.comm.process_ledger.summary()
    return out


def _build(model, method: str, inner: str, comm):
    icfg = inner_config(inner)
    return build_method(method_config(method, 2), icfg.build(list(model.parameters())), comm, icfg.state_roles())


def run_sharded(method: str, inner: str, whole: bool = False) -> dict[str, Any]:
    from desloc.comm.fsdp import init_mesh, shard_model
    from desloc.comm.mesh import MeshComm

    rmesh = init_mesh(SHARDS)
    model = shard_model(make_gpt(), rmesh)
    opt = _build(model, method, inner, MeshComm(rmesh))
    rows = BATCH // SHARDS
    part = slice(None) if whole else slice(rmesh.shard * rows, (rmesh.shard + 1) * rows)
    for step in range(STEPS):
        x, y = make_batch(rmesh.replica, step)
        model.zero_grad(set_to_none=True)
        _, loss = model(x[part], y[part])
        loss.backward()
        opt.step()

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t  # collective in the replica group

    snap = _snapshot(model, opt, full)
    snap.update(replica=rmesh.replica, shard=rmesh.shard)
    return snap


def run_unsharded(method: str, inner: str, group, rank: int) -> dict[str, Any]:
    from desloc.comm.torch_dist import TorchDistComm

    model = make_gpt()
    opt = _build(model, method, inner, TorchDistComm(group))
    for step in range(STEPS):
        x, y = make_batch(rank, step)
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
    snap = _snapshot(model, opt, lambda t: t)
    snap.update(replica=rank)
    return snap


def run_job(rank: int, job: dict) -> dict[str, Any]:
    import torch.distributed as dist

    pair = dist.new_group([0, 1])  # every process takes part in creating it
    results: dict[str, Any] = {}
    for method, inner in job["combos"]:
        key = f"{method}/{inner}"
        results[f"{key}/sharded"] = run_sharded(method, inner)
        if job.get("whole"):
            results[f"{key}/sharded-whole"] = run_sharded(method, inner, whole=True)
        if rank < 2:
            results[f"{key}/unsharded"] = run_unsharded(method, inner, pair, rank)
        dist.barrier()
    return results


def rank_main(rank: int, world_size: int, init_file: str, out_dir: str, job: dict, timeout_s: float) -> None:
    """The spawn target: :func:`_dist_workload.rank_main` running :func:`run_job`."""
    _dist_workload.rank_main(rank, world_size, init_file, out_dir, job, timeout_s, run_job=run_job)
