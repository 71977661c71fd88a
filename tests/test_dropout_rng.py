"""Randomness is part of the run: dropout masks are a pure function of (seed, worker, step).

With ``--set dropout=0.1``:

* a run stopped at step 7 and resumed equals the uninterrupted run bit for bit, although
  checkpoints hold no RNG state;
* ``torchrun --nproc_per_node 2`` equals the simulator bit for bit (rank m draws worker m's masks);
* two workers given the same batch still draw different masks (their seeds differ), on both
  engines, and the draws leave the global RNG as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from desloc.model import GPT, GPTConfig
from desloc.records import RunDir

from _runs import assert_same, desloc, final_state, stop_and_resume  # noqa: E402
from desloc.workers import ProcessWorkers, SimWorkers, worker_seed

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

SMALL = ["--workers", "2", "--steps", "12", "--batch-size", "2", "--seq-len", "32", "--kx", "4",
         "--eval-every", "6", "--eval-batches", "2", "--log-every", "2", "--ckpt-every", "5",
         "--tokenizer", "byte", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2",
         "--set", "block_size=32", "--set", "dropout=0.1"]


def rows(run):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in RunDir(run).read_metrics()]


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = desloc(["train", *SMALL, "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    return out


def test_dropout_changes_the_run(sim_run, tmp_path, env):
    """Guards the tests below against vacuity: the dropout run is not the dropout-free run."""
    out = tmp_path / "nodrop"
    args = [a for a in SMALL]
    args[args.index("dropout=0.1")] = "dropout=0.0"
    proc = desloc(["train", *args, "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    assert [r["train_loss"] for r in rows(out)] != [r["train_loss"] for r in rows(sim_run)]


def test_resume_with_dropout_is_bitwise(sim_run, tmp_path, env):
    out = tmp_path / "resumed"
    stop_and_resume(SMALL, env, out, stop_after=7)  # 7: mid-period (K_x=4)
    assert rows(out) == rows(sim_run)
    assert_same(final_state(sim_run), final_state(out))


def test_torchrun_with_dropout_matches_simulator_bitwise(sim_run, tmp_path, env):
    out = tmp_path / "gloo"
    proc = desloc(["train", *SMALL, "--out", str(out)], env, torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sim, real = rows(sim_run), rows(out)
    assert len(sim) == len(real)
    for a, b in zip(sim, real):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"], (a, b)
        assert a["bytes_by_state"] == b["bytes_by_state"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert_same(final_state(sim_run), final_state(out))


# ------------------------------------------------------------- same data, different masks
def _model() -> GPT:
    torch.manual_seed(0)  # as desloc train: the same initialisation on every worker
    return GPT(GPTConfig.from_preset("tiny", n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=64,
                                     dropout=0.1))


def _batch():
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 64, (2, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _grads(named_params):
    return {n: p.grad.detach().clone() for n, p in named_params}


def test_worker_seeds_are_distinct_and_stateless():
    seeds = {worker_seed(0, m, t) for m in range(4) for t in range(50)}
    assert len(seeds) == 200
    assert worker_seed(3, 1, 7) == worker_seed(3, 1, 7) != worker_seed(4, 1, 7)
    assert all(0 <= s < 2**63 for s in seeds)


def test_simulated_workers_with_the_same_batch_draw_different_masks():
    workers = SimWorkers(_model(), 2)
    rng_before = torch.get_rng_state()
    batch = _batch()
    workers.forward_backward([batch, batch], "cpu", False, seed=0, step=3)
    assert torch.equal(torch.get_rng_state(), rng_before), "forward_backward moved the global RNG"
    grads = {n: p.grad for n, p in workers.replicas.named_parameters()}
    assert any(not torch.equal(g[0], g[1]) for g in grads.values()), "both workers drew the same masks"
    first = {n: g.clone() for n, g in grads.items()}
    workers.forward_backward([batch, batch], "cpu", False, seed=0, step=3)  # the same (seed, worker, step)
    assert all(torch.equal(first[n], p.grad) for n, p in workers.replicas.named_parameters())

    eval_workers = SimWorkers(_model(), 2)  # control: without dropout the two workers agree
    eval_workers.replicas.eval()
    eval_workers.forward_backward([batch, batch], "cpu", False, seed=0, step=3)
    assert all(torch.equal(p.grad[0], p.grad[1]) for _, p in eval_workers.replicas.named_parameters())


def _rank(rank, init_file, out_dir):
    import torch.distributed as dist

    from desloc.comm.torch_dist import TorchDistComm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = _model()
        workers = ProcessWorkers(model, TorchDistComm())
        workers.forward_backward([_batch()], "cpu", False, seed=0, step=3)
        torch.save(_grads(model.named_parameters()), os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_processes_with_the_same_batch_draw_different_masks_equal_to_the_simulator():
    """Every rank seeds its model identically (as desloc train does); the masks still differ
    per rank, and rank m's gradient is the simulator's worker m's, bit for bit."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_rank, args=(os.path.join(d, "init"), d), nprocs=2, join=True, start_method="spawn")
        ranks = [torch.load(Path(d) / f"{r}.pt") for r in range(2)]
    assert any(not torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0]), "both ranks drew the same masks"
    workers = SimWorkers(_model(), 2)
    batch = _batch()
    workers.forward_backward([batch, batch], "cpu", False, seed=0, step=3)
    sim = {n: p.grad for n, p in workers.replicas.named_parameters()}
    for m in range(2):
        for n, g in ranks[m].items():
            assert torch.equal(sim[n][m], g), f"rank {m} {n} differs from simulated worker {m}"
