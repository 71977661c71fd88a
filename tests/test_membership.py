"""Workers that join and leave in the simulator (``--events``, :mod:`desloc.membership`).

* Parsing and validation name the problem; torchrun and gasloc are refused.
* Joining workers start from the live average (parameters; states by ``--join-states``), the
  next sync averages over every live worker, and the ledger and clock count the live workers.
* ``desloc train --events`` end to end: tokens and ``workers_final`` follow the events; a run
  stopped before or after an event resumes bitwise equal to the uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from desloc import build_method
from desloc.comm import SimulatedComm
from desloc.errors import ConfigError
from desloc.membership import (Event, averaged_states, live_workers, parse_events, resize_clock_state,
                               resize_optimizer_state, resize_tree, row_mean, worker_steps)
from desloc.sim import StackedReplicas
from desloc.train import TrainConfig

from _runs import assert_same, desloc, final_state, stop_and_resume  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_workload as wl  # noqa: E402


# ------------------------------------------------------------------------------------ events
def test_parse_and_count():
    ev = parse_events("6:add=2, 9:drop=1")
    assert ev == (Event(6, "add", 2), Event(9, "drop", 1))
    assert [live_workers(2, ev, t) for t in (0, 5, 6, 8, 9, 11)] == [2, 2, 4, 4, 3, 3]
    assert worker_steps(2, ev, 12) == 6 * 2 + 3 * 4 + 3 * 3
    assert worker_steps(2, ev, 4) == 8 and worker_steps(2, (), 5) == 10


@pytest.mark.parametrize("spec, match", [
    ("6:grow=2", "cannot read"), ("0:add=1", "step >= 1"), ("6:add=0", "count >= 1"),
    ("9:add=1,6:add=1", "increasing step order"), ("6:add=1,6:drop=1", "one event per step"),
    ("20:add=1", "would never happen"), ("6:drop=2", "no worker would be left"),
])
def test_bad_events_are_refused(spec, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(workers=2, steps=12, events=spec)


def test_events_need_the_simulator_and_an_all_reduce_method():
    from desloc.algorithms import MethodConfig

    with pytest.raises(ConfigError, match="simulator"):
        TrainConfig(workers=2, steps=12, events="6:add=1", backend="gloo")
    with pytest.raises(ConfigError, match="gasloc"):
        TrainConfig(workers=2, steps=12, events="6:add=1", method=MethodConfig("gasloc", period_x=4))
    with pytest.raises(ConfigError, match="join_states"):
        TrainConfig(workers=2, steps=12, join_states="copy")


# ------------------------------------------------------------------------------ resizing
def _trained(method="local-adam", m=2, steps=4):
    replicas, opt = wl.build_sim(method, "adamw", m)
    wl.train_sim(replicas, opt, 0, steps)
    return replicas, opt


def _rebuilt(replicas, opt, new, policy, checkpoint_means=None, method="local-adam"):
    old = replicas.world_size
    r2, o2 = wl.build_sim(method, "adamw", new)
    r2.load_state_dict(resize_tree(replicas.state_dict(), old, new))
    o2.load_state_dict(resize_optimizer_state(copy.deepcopy(opt.state_dict()), old, new, policy, checkpoint_means))
    return r2, o2


@pytest.mark.parametrize("policy", ["average", "zeros", "checkpoint"])
def test_joining_workers_start_from_the_live_average(policy):
    replicas, opt = _trained(steps=4)  # K = 3: synced at 3, apart again after step 4
    saved_sd = copy.deepcopy(opt.state_dict())  # "the last checkpoint"
    saved = saved_sd["inner"]["state"]
    wl.train_sim(replicas, opt, 4, 5)
    r2, o2 = _rebuilt(replicas, opt, 4, policy, averaged_states(saved_sd) if policy == "checkpoint" else None)
    for name, p in r2.named_parameters():  # parameters: always the average of the live workers
        old = replicas.stacked[name]
        assert torch.equal(p[:2], old) and torch.allclose(p[2], old.mean(0)) and torch.equal(p[2], p[3])
    for i, (p_old, p_new) in enumerate(zip(opt.params, o2.params)):
        for name in ("exp_avg", "exp_avg_sq"):
            old, new = opt.inner.state[p_old][name], o2.inner.state[p_new][name]
            assert torch.equal(new[:2], old)
            want = {"average": old.mean(0), "zeros": torch.zeros_like(old[0]),
                    "checkpoint": saved[i][name].mean(0)}[policy]
            assert torch.allclose(new[2], want) and torch.equal(new[3], new[2])
        assert torch.equal(o2.inner.state[p_new]["step"], opt.inner.state[p_old]["step"])  # shared counter
    assert o2.comm.ledger.world_size == 4 and o2.global_step == opt.global_step


def test_the_next_sync_averages_over_every_live_worker_and_the_ledger_counts_them():
    replicas, opt = _trained(steps=4)
    r2, o2 = _rebuilt(replicas, opt, 3, "zeros")  # zeros: the joiner's states differ from the others'
    sent = o2.comm.ledger.sent_by_tag["exp_avg"]
    before = {}

    class Spy(SimulatedComm):
        def all_reduce_mean_flat(self, buffers, tags, hidden_steps=None):
            for b, tag in zip(buffers, tags):
                before[tag] = b.clone()
            return super().all_reduce_mean_flat(buffers, tags, hidden_steps)

    spy = Spy(3)
    spy.ledger = o2.comm.ledger
    o2.comm = spy
    wl.train_sim(r2, o2, 4, 6)  # step 6: K = 3, a full sync of 3 workers
    state = [o2.inner.state[p]["exp_avg"] for p in o2.params]
    for s in state:
        assert all(torch.equal(s[0], s[m]) for m in range(3))
    buf = o2._flat["exp_avg"].buffers[0]
    assert torch.allclose(buf[0], before["exp_avg"].mean(0))  # the mean over all 3 live rows
    payload = sum(p[0].numel() for p in o2.params) * 4
    assert o2.comm.ledger.sent_by_tag["exp_avg"] - sent == 3 * payload  # 3 live workers sent it


def test_dropping_keeps_the_first_workers():
    replicas, opt = _trained(m=3, steps=2)
    r2, o2 = _rebuilt(replicas, opt, 2, "average")
    for name, p in r2.named_parameters():
        assert torch.equal(p, replicas.stacked[name][:2])
    clock = resize_clock_state({"time": [1.0, 2.0, 3.0], "compute": [1, 1, 1], "pending": [[], [1, 5.0], []]}, 3, 2)
    assert clock["time"] == [1.0, 2.0] and clock["pending"] == [[], [1, 5.0]]
    grown = resize_clock_state(clock, 2, 4)
    assert grown["time"] == [1.0, 2.0, 2.0, 2.0] and grown["compute"][2:] == [0.0, 0.0]


# ------------------------------------------------------- joiners of an outer optimizer (issue 18, 2)
def _outer_sim(method, m):
    """``method`` on the MLP with outer momentum 0.9 (so the outer state holds a momentum buffer)."""
    cfg = dataclasses.replace(wl.method_config(method, m), outer_momentum=0.9)
    replicas = StackedReplicas(wl.make_model(wl.SEED, "mlp"), m)
    icfg = wl.inner_config("adamw")
    return replicas, build_method(cfg, icfg.build(replicas.parameters()), SimulatedComm(m), icfg.state_roles())


@pytest.mark.parametrize("method, old, new", [("diloco", 3, 4), ("desloc+nesterov", 3, 4), ("desloc+nesterov", 5, 6),
                                              ("diloco", 5, 7), ("diloco", 3, 2), ("desloc+nesterov", 5, 3)])
def test_replicated_outer_state_is_copied_to_joiners(method, old, new):
    """The outer anchor and momentum are the same on every worker: a joiner gets that row bitwise
    (a float mean of 3 or 5 equal rows is not it, and the next outer step refused the joiner),
    the live workers keep theirs, and after the next sync every worker holds the same parameters."""
    replicas, opt = _outer_sim(method, old)
    wl.train_sim(replicas, opt, 0, 5)  # K_x = 3 (diloco) or 2 (desloc): outer steps taken, mid-round now
    r2, o2 = _outer_sim(method, new)
    r2.load_state_dict(resize_tree(replicas.state_dict(), old, new))
    o2.load_state_dict(resize_optimizer_state(copy.deepcopy(opt.state_dict()), old, new, "average"))
    for a_old, a_new in zip(opt.anchor, o2.anchor):
        assert all(torch.equal(a_old[m], a_old[0]) for m in range(old))  # replicated before the event
        assert all(torch.equal(a_new[m], a_old[0]) for m in range(new))
        mu_old, mu_new = (o.outer.optimizer.state[a]["momentum_buffer"] for o, a in ((opt, a_old), (o2, a_new)))
        assert mu_old.abs().sum() > 0 and all(torch.equal(mu_new[m], mu_old[0]) for m in range(new))
    wl.train_sim(r2, o2, 5, 6)  # the next outer step (step 6 for both periods) accepts every worker
    for p in r2.parameters():
        assert all(torch.equal(p[m], p[0]) for m in range(new))


def test_row_mean_copies_equal_rows_and_averages_others():
    row = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for m in (2, 3, 5, 6, 7):
        assert torch.equal(row_mean(row.expand(m, 1000)), row)
    assert not torch.equal(row.expand(3, 1000).mean(0), row)  # why: ~14% of these means are not the row
    rows = torch.tensor([[1.0, 2.0], [2.0, 4.0], [6.0, 0.0]], dtype=torch.bfloat16)
    assert row_mean(rows).dtype == torch.bfloat16 and row_mean(rows).tolist() == [3.0, 2.0]


# ------------------------------------------------------------------------------- end to end
SMALL = ["--workers", "2", "--steps", "12", "--batch-size", "2", "--seq-len", "32", "--kx", "3",
         "--eval-every", "6", "--eval-batches", "1", "--log-every", "2", "--ckpt-every", "4",
         "--tokenizer", "byte", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2",
         "--set", "block_size=32", "--events", "5:add=2,8:drop=1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("events") / "run"
    proc = desloc(["train", *SMALL, "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_train_with_events_records_the_live_workers(straight):
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["workers_final"] == 3
    assert summary["tokens"] == (5 * 2 + 3 * 4 + 4 * 3) * 2 * 32
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["workers"] for r in rows] == [2, 2, 4, 4, 3, 3]  # logged at 2, 4, .., 12; events after 5 and 8


@pytest.mark.parametrize("stop_after", [4, 6])  # a checkpoint before the first event / between the two
def test_resume_across_events_is_bitwise(straight, tmp_path, env, stop_after):
    out = tmp_path / "resumed"
    stop_and_resume(SMALL, env, out, stop_after=stop_after)
    assert_same(final_state(straight, workers=3), final_state(out, workers=3))


TINY = ["--steps", "12", "--batch-size", "2", "--seq-len", "16", "--kx", "3", "--eval-every", "12",
        "--eval-batches", "1", "--log-every", "4", "--ckpt-every", "4", "--tokenizer", "byte", "--set", "n_layer=1",
        "--set", "n_embd=16", "--set", "n_head=2", "--set", "block_size=16"]


@pytest.mark.parametrize("method, workers, events, final", [
    ("diloco", 3, "4:add=1", 4),  # the issue's `desloc train --method diloco --workers 3 --events 4:add=1 --kx 3`
    ("desloc+nesterov", 5, "4:add=1,8:drop=3", 3),
    ("diloco", 5, "4:drop=2,8:add=3", 6),
])
def test_a_run_with_an_outer_optimizer_takes_joiners(method, workers, events, final, tmp_path, token_cache):
    """Issue 18 item 2 end to end: the next outer step used to refuse a joiner of M = 3 or 5 workers."""
    from desloc.cli import main

    outer = ["--method", "desloc", "--outer", "nesterov"] if method == "desloc+nesterov" else ["--method", method]
    out = tmp_path / "run"
    assert main(["train", *outer, "--outer-momentum", "0.9", "--workers", str(workers), "--events", events, *TINY,
                 "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["workers_final"] == final
