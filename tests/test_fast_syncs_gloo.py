"""Streamed, delayed and compressed syncs on real gloo processes equal the simulator (issue 20).

Three parameter tensors (``test_fast_syncs.SHAPES``), AdamW, fixed per-(worker, step) gradients,
13 steps with ``total_steps = 13``, then ``finish_syncs``; the same run once on
:class:`~desloc.SimulatedComm` and once in M gloo processes with ``TorchDistComm`` (one spawn per M
for every configuration, ``tests/_dist_workload.spawn_ranks``).

* Compressed syncs (every tag compressed, fragments 2, param_delay 1, state_delay 1; diloco; DDP):
  parameters, states and the ledger summary bitwise equal at M = 2 *and* M = 3 -- every worker
  decodes the same all-gathered payloads and sums the rows in rank order, on both engines
  (rows encode independently: the simulator's [M, n] encode equals each rank's [n] encode).
* Uncompressed fragments + delays (all-reduces): bitwise at M = 2 (a 2-term sum is order-free);
  at M = 3 gloo's ring sums in another order, so within ``_numerics.reorder_tolerance`` (13
  rounds of 3-term means, amplified at most 10-fold, as tests/test_gloo_equivalence.py's
  workload), with the ledger still exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned ranks inherit sys.path
import _dist_workload as wl  # noqa: E402
import test_fast_syncs as fs  # noqa: E402
from _numerics import assert_within, reorder_tolerance  # noqa: E402

from desloc import InnerConfig, MethodConfig, build_method  # noqa: E402

pytestmark = [pytest.mark.timeout(150), pytest.mark.numerics]

STEPS = 13
COMPRESSED = {
    "desloc int8 F2 pd1 sd1": dict(name="desloc", period_x=4, period_u=6, period_v=8, fragments=2, param_delay=1,
                                   state_delay=1, compression="int8"),
    "desloc mixed F3 pd2 sd1": dict(name="desloc", period_x=6, period_u=4, period_v=8, fragments=3, param_delay=2,
                                    state_delay=1, compression="params=int4,exp_avg=fp8,exp_avg_sq=int8"),
    "desloc topk F2": dict(name="desloc", period_x=4, period_u=4, period_v=8, fragments=2, compression="topk:0.1"),
    "diloco int8 F2 pd1": dict(name="diloco", period_x=4, fragments=2, param_delay=1, compression="int8"),
    "ddp int8": dict(name="ddp", period_x=1, compression="int8"),
}
UNCOMPRESSED = {
    "desloc F2 pd1 sd1": dict(name="desloc", period_x=4, period_u=6, period_v=8, fragments=2, param_delay=1,
                              state_delay=1),
    "diloco F2 pd1 alpha": dict(name="diloco", period_x=4, fragments=2, param_delay=1, fragment_alpha=0.3),
}
CONFIGS = {**COMPRESSED, **UNCOMPRESSED}
JOIN_TIMEOUT_S = 120.0


def _snapshot(params, opt) -> dict:
    snap = fs.snapshot(params, opt)
    snap["global_step"] = opt.global_step
    return snap


def run_rank(rank: int, job: dict) -> dict:
    """This rank's part: every configuration, one worker's tensors (row ``rank`` of the
    simulator's)."""
    from desloc.comm.torch_dist import TorchDistComm

    out = {}
    for key, kw in job["configs"].items():
        comm = TorchDistComm()
        params = [p[0].clone() for p in fs.make_params(1)]
        icfg = InnerConfig("adamw", lr=0.01, weight_decay=0.01)
        opt = build_method(MethodConfig(**kw), icfg.build(params), comm, icfg.state_roles(), total_steps=job["steps"])
        for t in range(job["steps"]):
            for p, g in zip(params, fs.grads_at(t, comm.world_size)):
                p.grad = g[rank].clone()
            opt.step()
        opt.finish_syncs()
        out[key] = _snapshot(params, opt)
    return out


def rank_target(rank, world_size, init_file, out_dir, job, timeout_s):
    wl.rank_main(rank, world_size, init_file, out_dir, job, timeout_s, run_job=run_rank)


def run_sim(world: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every rank: the same kernels' reductions
    try:
        out = {}
        for key, kw in CONFIGS.items():
            params, opt = fs.build(world=world, total_steps=STEPS, **kw)
            fs.train(params, opt, 0, STEPS)
            opt.finish_syncs()
            out[key] = _snapshot(params, opt)
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    cache: dict[int, tuple[dict, list[dict]]] = {}

    def get(world: int):
        if world not in cache:
            job = {"configs": CONFIGS, "steps": STEPS}
            ranks = wl.spawn_ranks(world, job, tmp_path_factory.mktemp(f"fast{world}"), JOIN_TIMEOUT_S,
                                   target=rank_target)
            cache[world] = (run_sim(world), ranks)
        return cache[world]

    return get


def _compare(sim: dict, ranks: list[dict], world: int, key: str, bitwise: bool) -> None:
    assert [r["global_step"] for r in ranks] == [STEPS] * world
    real_params = [torch.stack([r["params"][i] for r in ranks]) for i in range(len(sim["params"]))]
    pairs = [(f"param {i}", a, b) for i, (a, b) in enumerate(zip(sim["params"], real_params))]
    assert sorted(sim["states"]) == sorted(ranks[0]["states"])
    for n, sim_value in sim["states"].items():
        if sim_value.dim() == 0:  # a counter (Adam's step): the same scalar on every rank
            for rank, r in enumerate(ranks):
                assert torch.equal(r["states"][n], sim_value), f"{key}: {n} on rank {rank}"
            continue
        pairs.append((f"state {n}", sim_value, torch.stack([r["states"][n] for r in ranks])))
    assert len(pairs) > len(sim["params"]), f"{key}: no states compared"
    for what, a, b in pairs:
        assert a.shape == b.shape and a.dtype == b.dtype, f"{key} {what}: {a.shape} vs {b.shape}"
        if bitwise:
            assert torch.equal(a, b), f"{key} M={world} {what}: max |diff| {(a - b).double().abs().max().item():.3e}"
        else:
            assert_within(b, a, reorder_tolerance(a, world, STEPS, 10.0), f"{key} M={world} {what}")
    for rank, r in enumerate(ranks):
        assert r["summary"] == sim["summary"], f"{key} M={world}: rank {rank}'s ledger summary differs"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("key", list(COMPRESSED))
def test_compressed_syncs_are_bitwise_the_simulator(engines, world, key):
    sim, ranks = engines(world)
    _compare(sim[key], [r[key] for r in ranks], world, key, bitwise=True)
    # not vacuous: the workers' own (unsynced) progress differs somewhere mid-run; every worker
    # ends on the same final parameters (the flush / DDP)
    for p in sim[key]["params"]:
        assert fs.workers_equal(p), f"{key}: workers differ after finish_syncs"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("key", list(UNCOMPRESSED))
def test_uncompressed_fragments_match_the_simulator(engines, world, key):
    """Bitwise at M = 2; within the summation-order bound at M = 3 (gloo's ring order)."""
    sim, ranks = engines(world)
    _compare(sim[key], [r[key] for r in ranks], world, key, bitwise=world == 2)
