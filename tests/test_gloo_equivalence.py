"""The simulator and real gloo processes compute the same training run.

For every method (ddp, local-adam, desloc, keep-states, reset-states) x inner optimizer (adamw,
sgdm, adopt), ``tests/_dist_workload.py`` trains the same MLP on the same per-(worker, step)
batches once with ``SimulatedComm(M)`` and once in M gloo processes with ``TorchDistComm``.

* M = 2: final parameters and optimizer states are bitwise equal (a 2-term sum is the same in
  any order, and both engines divide the sum by M).
* M = 4: equal within the error bound for two summation orders of the run's 4-term means
  (gloo's ring sums in another order than ``sum(dim=0)``; ``_numerics.reorder_tolerance``, the
  workload's conditioning checked in ``tests/test_simulator.py``).
* The ledgers agree exactly (bytes and syncs per tag, collectives, gossip links), on every rank.
* Engine-independent ledgers (the definitions in ``desloc.comm.ledger``): the ledger summary is
  the same on the simulator and on every rank of 2 and 3 gloo processes, with the all-reduce
  split into many buckets, the logged metrics averaged through the same communicator, and
  one-peer gossip with odd M = 3 (one worker sits out each round).
* A model with a 0-dim parameter (whose Adam moments are 0-dim on a rank, like the ``step``
  counter) trains identically on both engines under every method.

All ranks of one M run every combination in one spawn; the run is shared with
``tests/test_resume.py`` through ``_dist_workload.session_gloo_run``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned ranks inherit sys.path
import _dist_workload as wl  # noqa: E402
from _numerics import assert_within, reorder_tolerance  # noqa: E402

JOIN_TIMEOUT_S = {2: 120.0, 4: 200.0}
pytestmark = [pytest.mark.timeout(280), pytest.mark.numerics]

COMBO_IDS = [wl.combo_key(m, i) for m, i in wl.COMBOS]
PARAM_BYTES = (4 * 8 + 8 + 8 * 1 + 1) * 4  # the MLP's parameters, fp32, one worker


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """``engines(M)`` -> (simulator results, per-rank gloo results) for all combinations."""
    sims: dict[int, dict] = {}

    def get(world_size: int):
        ranks, _ = wl.session_gloo_run(
            world_size, lambda: tmp_path_factory.mktemp(f"gloo{world_size}"), JOIN_TIMEOUT_S[world_size]
        )
        if world_size not in sims:
            sims[world_size] = wl.run_job_sim(world_size, wl.make_job(("full",)))
        return sims[world_size], ranks

    return get


def _pair(engines, world_size: int, key: str):
    sims, ranks = engines(world_size)
    return sims[key]["full"], wl.stack_ranks([r[key]["full"] for r in ranks])


def _assert_same(a: torch.Tensor, b: torch.Tensor, world_size: int, what: str) -> None:
    """Bitwise at M = 2 (a 2-term sum is order-free, /2 is exact, every other operation runs the
    same kernels on the same shapes with one thread); else within the summation-order bound."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    if world_size == 2:
        assert torch.equal(a, b), f"{what}: max |diff| {(a - b).abs().max().item():.3e} (expected bitwise equal)"
    else:
        assert_within(b, a, reorder_tolerance(a, world_size, wl.STEPS, wl.REORDER_GAIN), what)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("key", COMBO_IDS)
def test_params_and_states_match(engines, world_size, key):
    sim, real = _pair(engines, world_size, key)
    assert sorted(sim["params"]) == sorted(real["params"])
    for name in sim["params"]:
        _assert_same(sim["params"][name], real["params"][name], world_size, f"{key} M={world_size} param {name}")
    assert sorted(sim["states"]) == sorted(real["states"]), "the engines' optimizers hold different states"
    assert sim["states"], f"{key}: no optimizer states were compared"
    for name in sim["states"]:
        _assert_same(sim["states"][name], real["states"][name], world_size, f"{key} M={world_size} state {name}")
    # Scalar states (Adam/ADOPT's step) are identical on every rank and equal the simulator's.
    assert sorted(sim["scalars"]) == sorted(real["scalars"])
    for name, per_rank in real["scalars"].items():
        for rank, value in enumerate(per_rank):
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sim["scalars"][name])), (
                f"{key}: scalar state {name} on rank {rank} is {value}, simulator has {sim['scalars'][name]}"
            )
    assert real["global_steps"] == [wl.STEPS] * world_size and sim["global_step"] == wl.STEPS


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("key", COMBO_IDS)
def test_workers_are_not_trivially_equal(engines, world_size, key):
    """Guards the test above against vacuity: workers saw different data, so after the last
    step (13, mid-period for every local method) their parameters differ -- except under DDP,
    where they stay identical."""
    _, real = _pair(engines, world_size, key)
    w = real["params"]["0.weight"]
    identical = all(torch.equal(w[0], w[m]) for m in range(1, world_size))
    assert identical == key.startswith("ddp/"), f"{key}: workers identical={identical}"


def _expected_bytes(method: str, inner: str, steps: int, world_size: int = 2) -> dict[str, int]:
    """Payload bytes per tag for one worker, from the periods (every state is model-sized)."""
    state_names = ["momentum_buffer"] if inner == "sgdm" else ["exp_avg", "exp_avg_sq"]
    method = method.replace("+nesterov", "")  # the outer step sends nothing extra
    rounds = steps // wl.LOCAL_PERIOD
    if method.startswith("gasloc@"):  # peers per round: the topology's degree
        topology = method.split("@")[1]
        degree = {"none": 0, "complete": 1, "one-peer": 1, "slow": 1,
                  "two-peer": min(2, world_size - 1), "ring": min(2, world_size - 1)}[topology]
        return {"params": rounds * degree * PARAM_BYTES} if degree else {}
    if method == "diloco":
        return {"params": rounds * PARAM_BYTES}
    if method == "mtdao":
        periods = {"params": wl.LOCAL_PERIOD, "exp_avg_0": 2, "exp_avg_1": 5, "exp_avg_sq": 4}
        return {tag: steps // k * PARAM_BYTES for tag, k in periods.items()}
    if method == "ddp":
        return {"grads": steps * PARAM_BYTES}
    if method in ("keep-states", "reset-states"):
        return {"params": steps // wl.LOCAL_PERIOD * PARAM_BYTES}
    if method == "local-adam":
        periods = dict(params=wl.LOCAL_PERIOD, **{s: wl.LOCAL_PERIOD for s in state_names})
    else:
        kx, ku, kv = wl.DESLOC_PERIODS
        roles = {"exp_avg": ku, "exp_avg_sq": kv, "momentum_buffer": ku}
        periods = dict(params=kx, **{s: roles[s] for s in state_names})
    return {tag: steps // k * PARAM_BYTES for tag, k in periods.items()}


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("key", COMBO_IDS)
def test_ledgers_match(engines, world_size, key):
    sim, real = _pair(engines, world_size, key)
    for rank, ledger in enumerate(real["ledgers"]):
        assert ledger["bytes_by_tag"] == sim["ledger"]["bytes_by_tag"], f"{key}: rank {rank} bytes per tag"
        assert ledger["syncs_by_tag"] == sim["ledger"]["syncs_by_tag"], f"{key}: rank {rank} syncs per tag"
        assert ledger["collectives"] == sim["ledger"]["collectives"], f"{key}: rank {rank} collectives"
    method, inner = key.split("/")
    assert sim["ledger"]["bytes_by_tag"] == _expected_bytes(method, inner, wl.STEPS, world_size)
    if method.startswith("gasloc@") and "complete" not in method and "none" not in method:
        # gossip is point to point; every rank knows the round's W, so it logs every link, as the
        # simulator does
        assert sim["ledger"]["bytes_by_link"], key
        for rank, ledger in enumerate(real["ledgers"]):
            assert ledger["bytes_by_link"] == sim["ledger"]["bytes_by_link"], f"{key}: rank {rank} links"
    for rank, summary in enumerate(real["ledger_summaries"]):
        assert summary == sim["ledger_summary"], f"{key}: rank {rank} ledger summary"


# ------------------------------------------------------------------ ledgers defined per run
LEDGER_COMBOS = (
    ("desloc", "adamw"), ("ddp", "sgdm"), ("local-adam", "adopt"), ("mtdao", "mtdao"), ("diloco", "adamw"),
    ("gasloc@one-peer", "adamw"), ("gasloc@ring", "sgdm"), ("gasloc@two-peer", "adamw"),
    ("gasloc@slow", "adamw"), ("gasloc@complete", "adamw"),
)
SMALL_BUCKET = 64  # bytes: every parameter sync of the MLP (196 bytes per tensor kind) is several buckets
_EXTRA_RUNS: dict = {}


def _extra_run(tmp_path_factory, name: str, world_size: int, **options):
    """(simulator results, per-rank gloo results) of a job over LEDGER_COMBOS with ``options``."""
    key = (name, world_size)
    if key not in _EXTRA_RUNS:
        job = wl.make_job(("full",), combos=LEDGER_COMBOS, **options)
        try:
            ranks = wl.spawn_ranks(world_size, job, tmp_path_factory.mktemp(f"{name}{world_size}"),
                                   JOIN_TIMEOUT_S.get(world_size, 160.0))
            _EXTRA_RUNS[key] = (wl.run_job_sim(world_size, job), ranks)
        except Exception as exc:  # noqa: BLE001 - cached, re-raised for every test that needs it
            _EXTRA_RUNS[key] = exc
    run = _EXTRA_RUNS[key]
    if isinstance(run, Exception):
        raise RuntimeError(f"the {world_size}-rank {name} run failed: {run!r}") from run
    return run


@pytest.mark.parametrize("world_size", [2, 3])
def test_ledger_summary_is_engine_independent(tmp_path_factory, world_size):
    """Same summary on the simulator and on every rank, although the gloo ranks split every
    all-reduce into buckets and also average their logged metrics through the communicator."""
    sims, ranks = _extra_run(tmp_path_factory, "ledger", world_size, bucket_bytes=SMALL_BUCKET, observer=True)
    for method, inner in LEDGER_COMBOS:
        key = wl.combo_key(method, inner)
        sim = sims[key]["full"]["ledger_summary"]
        for rank, result in enumerate(ranks):
            full = result[key]["full"]
            assert full["ledger_summary"] == sim, f"{key} M={world_size}: rank {rank} summary differs"
            assert full["ledger"]["observer_bytes_by_tag"]["metrics"] == wl.STEPS * 2 * 8  # it did run
        if method == "desloc":  # one collective per step with anything due: 2, 3, 5 | t in 1..13
            assert sim["collectives"] == sum(1 for t in range(1, wl.STEPS + 1) if t % 2 == 0 or t % 3 == 0 or t % 5 == 0)
    # the gloo ranks really did split the calls into buckets
    desloc_rank0 = ranks[0]["desloc/adamw"]["full"]
    assert desloc_rank0["buckets_reduced"] > 2 * desloc_rank0["ledger"]["collectives"]


def test_odd_one_peer_gossip_bytes_are_exact_means(tmp_path_factory):
    """M = 3, one-peer: each round one pair exchanges and one worker sits out, so the mean
    bytes per worker is 2/3 of a model per round: given exactly, never floored."""
    sims, ranks = _extra_run(tmp_path_factory, "ledger", 3, bucket_bytes=SMALL_BUCKET, observer=True)
    summary = sims["gasloc@one-peer/adamw"]["full"]["ledger_summary"]
    rounds = wl.STEPS // wl.LOCAL_PERIOD
    assert sum(summary["bytes_by_link"].values()) == rounds * 2 * PARAM_BYTES
    assert summary["bytes_by_tag"]["params"] == rounds * 2 * PARAM_BYTES / 3 == summary["total_bytes"]
    assert sum(summary["bytes_by_worker"].values()) == rounds * 2 * PARAM_BYTES
    assert all(r["gasloc@one-peer/adamw"]["full"]["ledger_summary"] == summary for r in ranks)


@pytest.mark.parametrize("world_size", [2, 3])
def test_scalar_parameter_trains_identically_on_both_engines(tmp_path_factory, world_size):
    """A 0-dim parameter's Adam moments are 0-dim on a rank, like the ``step`` counter: the
    methods find the states they sync (and GASLoC the states an idle worker keeps) by name.
    Bitwise at M = 2, within the summation-order bound at M = 3."""
    sims, ranks = _extra_run(tmp_path_factory, "scalar", world_size, model="scalar")
    for method, inner in LEDGER_COMBOS:
        key = wl.combo_key(method, inner)
        sim, real = sims[key]["full"], wl.stack_ranks([r[key]["full"] for r in ranks])
        assert "scale" in sim["params"] and sim["params"]["scale"].shape == (world_size,)
        for part in ("params", "states"):
            assert sorted(sim[part]) == sorted(real[part]), f"{key}: {part}"
            for name in sim[part]:
                _assert_same(sim[part][name], real[part][name], world_size, f"{key} M={world_size} {part} {name}")
        assert any(n.startswith("scale.") for n in sim["states"]), f"{key}: the scalar's states were compared"
        assert sorted(sim["scalars"]) == sorted(real["scalars"])
        for name, per_rank in real["scalars"].items():
            assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(sim["scalars"][name])) for v in per_rank), name
        for rank, summary in enumerate(real["ledger_summaries"]):
            assert summary == sim["ledger_summary"], f"{key}: rank {rank}"
        assert not torch.equal(sim["params"]["scale"], torch.full_like(sim["params"]["scale"], 1.25)), key
