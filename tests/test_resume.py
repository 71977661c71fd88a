"""Checkpoint / resume is exact, on both engines, for every method x inner optimizer.

A run interrupted at step ``SAVE_AT`` = 7 (a multiple of none of the periods 2, 3, 5: mid-period
for every method, with states that differ across workers) saves model + optimizer
``state_dict`` with ``torch.save``; a *fresh* process builds new objects, loads them and continues
to ``STEPS`` = 13. Final parameters, optimizer states, global step and ledger must be bitwise
equal to the uninterrupted run.

* simulator, M = 3: the fresh process is a ``multiprocessing`` spawn child;
* gloo, 2 processes: every rank saves and loads its own shard; the resumed ranks are a new
  spawn (new process group).

Also: a checkpoint refuses to load into a run with a different number of workers or a
different method (``CheckpointMismatchError``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned ranks inherit sys.path
import _dist_workload as wl  # noqa: E402
from desloc.errors import CheckpointMismatchError  # noqa: E402

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

SIM_WORKERS = 3
GLOO_WORKERS = 2
JOIN_TIMEOUT_S = 120.0
COMBO_IDS = [wl.combo_key(m, i) for m, i in wl.COMBOS]


def test_checkpoint_step_is_mid_period():
    periods = {*wl.DESLOC_PERIODS, wl.LOCAL_PERIOD}
    assert all(wl.SAVE_AT % k != 0 for k in periods), (wl.SAVE_AT, periods)
    assert wl.SAVE_AT < wl.STEPS and all(wl.STEPS - wl.SAVE_AT >= k for k in periods)  # syncs after resume


# -------------------------------------------------------------------------------- simulator
@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory):
    """Uninterrupted and resumed (in a fresh process) simulator runs of every combination."""
    workdir = tmp_path_factory.mktemp("sim_resume")
    ckpt_dir = workdir / "ckpt"
    ckpt_dir.mkdir()
    full = wl.run_job_sim(SIM_WORKERS, wl.make_job(("full", "save"), ckpt_dir=ckpt_dir))
    resumed = wl.run_sim_in_fresh_process(
        SIM_WORKERS, wl.make_job(("resume",), ckpt_dir=ckpt_dir), workdir, timeout_s=JOIN_TIMEOUT_S
    )
    return full, resumed, ckpt_dir


def _assert_bitwise(full: dict, resumed: dict, what: str) -> None:
    assert resumed["global_step"] == full["global_step"] == wl.STEPS, what
    for part in ("params", "states"):
        assert sorted(full[part]) == sorted(resumed[part]), f"{what}: {part} names differ"
        for name, ref in full[part].items():
            got = resumed[part][name]
            assert torch.equal(ref, got), (
                f"{what}: {part} {name} differs after resume, max |diff| {(ref - got).abs().max().item():.3e}"
            )
    assert sorted(full["scalars"]) == sorted(resumed["scalars"])
    for name, ref in full["scalars"].items():
        assert torch.equal(torch.as_tensor(ref), torch.as_tensor(resumed["scalars"][name])), f"{what}: {name}"
    assert resumed["ledger"] == full["ledger"], f"{what}: ledger differs after resume"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("key", COMBO_IDS)
def test_simulator_resume_is_bitwise(sim_runs, key):
    full, resumed, _ = sim_runs
    _assert_bitwise(full[key]["full"], resumed[key]["resumed"], f"sim M={SIM_WORKERS} {key}")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("key", COMBO_IDS)
def test_resume_without_optimizer_state_differs(sim_runs, key):
    """Control: the bitwise check is sensitive to the optimizer state -- loading only the
    model and continuing with a fresh optimizer ends elsewhere."""
    full, _, ckpt_dir = sim_runs
    method, inner = key.split("/")
    replicas, opt = wl.build_sim(method, inner, SIM_WORKERS)
    ckpt = torch.load(wl.checkpoint_path(ckpt_dir, method, inner, "sim"))
    assert ckpt["optim"]["desloc"]["global_step"] == wl.SAVE_AT
    replicas.load_state_dict(ckpt["model"])
    wl.train_sim(replicas, opt, wl.SAVE_AT, wl.STEPS)
    ref = full[key]["full"]["params"]
    got = wl.snapshot_sim(replicas, opt)["params"]
    assert not all(torch.equal(ref[n], got[n]) for n in ref), f"{key}: optimizer state had no effect"


# ------------------------------------------------------------------------------------- gloo
@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    """Per-rank uninterrupted results, and per-rank results resumed by a new set of processes."""
    ranks_full, ckpt_dir = wl.session_gloo_run(
        GLOO_WORKERS, lambda: tmp_path_factory.mktemp(f"gloo{GLOO_WORKERS}"), JOIN_TIMEOUT_S
    )
    ranks_resumed = wl.spawn_ranks(
        GLOO_WORKERS, wl.make_job(("resume",), ckpt_dir=ckpt_dir),
        tmp_path_factory.mktemp("gloo_resume"), JOIN_TIMEOUT_S,
    )
    return ranks_full, ranks_resumed, ckpt_dir


@pytest.mark.timeout(280)
@pytest.mark.parametrize("key", COMBO_IDS)
def test_gloo_resume_is_bitwise(gloo_runs, key):
    ranks_full, ranks_resumed, ckpt_dir = gloo_runs
    method, inner = key.split("/")
    for rank in range(GLOO_WORKERS):
        # Each rank wrote its own shard, recording its world size and the interruption step.
        meta = torch.load(wl.checkpoint_path(ckpt_dir, method, inner, rank))["optim"]["desloc"]
        algorithm = method.split("@")[0].split("+")[0]  # "gasloc@ring" -> gasloc, "desloc+nesterov" -> desloc
        assert (meta["world_size"], meta["global_step"], meta["algorithm"]) == (GLOO_WORKERS, wl.SAVE_AT, algorithm)
        _assert_bitwise(ranks_full[rank][key]["full"], ranks_resumed[rank][key]["resumed"],
                        f"gloo rank {rank}/{GLOO_WORKERS} {key}")


# ------------------------------------------------------------------------------ mismatches
def _checkpoint(method: str, inner: str, world_size: int) -> dict:
    replicas, opt = wl.build_sim(method, inner, world_size)
    wl.train_sim(replicas, opt, 0, 2)
    return opt.state_dict()


@pytest.mark.parametrize("method", wl.METHODS)
@pytest.mark.parametrize("saved_m,loaded_m", [(2, 3), (3, 2), (4, 1)])
def test_different_world_size_raises(method, saved_m, loaded_m):
    state = _checkpoint(method, "adamw", saved_m)
    _, opt = wl.build_sim(method, "adamw", loaded_m)
    with pytest.raises(CheckpointMismatchError) as info:
        opt.load_state_dict(state)
    msg = str(info.value)
    assert f"world_size={saved_m}" in msg and f"world_size={loaded_m}" in msg, msg
    assert opt.global_step == 0 and not opt.inner.state, "a refused checkpoint must leave the optimizer untouched"


@pytest.mark.timeout(280)
def test_gloo_shard_into_simulator_with_other_world_size_raises(gloo_runs):
    """A rank's shard written by 2 gloo processes names world size 2: a 3-worker run refuses it."""
    _, _, ckpt_dir = gloo_runs
    state = torch.load(wl.checkpoint_path(ckpt_dir, "desloc", "adamw", 0))["optim"]
    _, opt = wl.build_sim("desloc", "adamw", 3)
    with pytest.raises(CheckpointMismatchError, match=r"world_size=2.*world_size=3"):
        opt.load_state_dict(state)


@pytest.mark.parametrize("saved", wl.METHODS)
def test_different_method_raises(saved):
    state = _checkpoint(saved, "adamw", 2)
    for loaded in wl.METHODS:
        if loaded == saved:
            continue
        _, opt = wl.build_sim(loaded, "adamw", 2)
        with pytest.raises(CheckpointMismatchError) as info:
            opt.load_state_dict(state)
        msg = str(info.value)
        assert repr(saved) in msg and repr(loaded) in msg, msg
        assert opt.global_step == 0 and not opt.inner.state
