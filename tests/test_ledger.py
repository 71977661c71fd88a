"""Communication volume is a tested number: measured ledger bytes == the docstring formulas.

Per worker, in bytes, over T steps with P parameters of ``b`` bytes each (papers.md section 1):

    DDP           T * P * b                                   tag "grads"
    DES-LOC       (T/K_x + sum_j T/K_j) * P * b               tags "params", then state names
    local-adam    3 T/K * P * b   (Adam: params, exp_avg, exp_avg_sq)
    keep/reset    T/K_x * P * b   (params only)

The model is tiny (nn.Linear(4, 2): P = 10) so that the paper's T = 1536 run takes a second.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from desloc.algorithms import MethodConfig, build_method
from desloc.comm import SimulatedComm
from desloc.optim import InnerConfig
from desloc.sim import StackedReplicas

M = 2
P = 4 * 2 + 2  # nn.Linear(4, 2): weight 8 + bias 2


def run(method, inner="adamw", steps=30, dtype=torch.float32, **periods):
    torch.manual_seed(0)
    reps = StackedReplicas(nn.Linear(4, 2).to(dtype), M)
    icfg = InnerConfig(inner)
    opt = build_method(MethodConfig(method, **periods), icfg.build(reps.parameters()), SimulatedComm(M),
                       icfg.state_roles())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in reps.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("inner", ["adamw", "adopt"])
def test_desloc_bytes_match_formula_per_state(inner):
    T, kx, ku, kv = 30, 2, 3, 5  # T is a multiple of every period
    opt = run("desloc", inner, steps=T, period_x=kx, period_u=ku, period_v=kv)
    ledger = opt.comm.ledger
    assert ledger.total_bytes == (T // kx + T // ku + T // kv) * P * 4 == (15 + 10 + 6) * 40
    assert dict(ledger.bytes_by_tag) == {
        "params": T // kx * P * 4,
        "exp_avg": T // ku * P * 4,
        "exp_avg_sq": T // kv * P * 4,
    }
    # one sync per tag per call, however many tensors (weight and bias) or flat buffers carry it
    assert dict(ledger.syncs_by_tag) == {"params": 15, "exp_avg": 10, "exp_avg_sq": 6}
    # steps with anything to sync: multiples of 2, 3 or 5 in 1..30 = 30 - phi(30) = 22; everything
    # due at one step goes out in one collective
    assert ledger.collectives == 22
    assert opt.expected_bytes(T) == ledger.total_bytes


def test_element_size_counts():
    opt = run("desloc", steps=6, dtype=torch.float64, period_x=2, period_u=3, period_v=6)
    assert opt.comm.ledger.total_bytes == (3 + 2 + 1) * P * 8


def test_paper_headline_ratios():
    """(K_x, K_u, K_v) = (256, 768, 1536) over T = 1536 steps sends 6 + 2 + 1 = 9 model-sized
    tensors where DDP sends 1536: 1536 / 9 = 170.67x. Local Adam at K = 256 sends 3 * 6 = 18: 2x."""
    T = 1536
    desloc = run("desloc", steps=T, period_x=256, period_u=768, period_v=1536)
    local = run("local-adam", steps=T, period_x=256)
    summary = desloc.comm_summary()
    assert summary["bytes_sent"] == 9 * P * 4
    assert summary["bytes_by_state"] == {"params": 6 * P * 4, "exp_avg": 2 * P * 4, "exp_avg_sq": 1 * P * 4}
    assert summary["ddp_equivalent_bytes"] == T * P * 4
    assert summary["ratio_vs_ddp"] == T / 9
    assert round(summary["ratio_vs_ddp"], 2) == 170.67
    assert local.comm.ledger.total_bytes == 18 * P * 4
    assert local.comm.ledger.total_bytes / desloc.comm.ledger.total_bytes == 2.0
    assert local.comm_summary()["ratio_vs_ddp"] == T / 18


def test_desloc_default_periods_are_3x_and_6x():
    opt = run("desloc", steps=24, period_x=4)  # K_u = 12, K_v = 24 by default
    assert dict(opt.comm.ledger.bytes_by_tag) == {"params": 6 * P * 4, "exp_avg": 2 * P * 4, "exp_avg_sq": P * 4}


def test_ddp_sends_one_gradient_per_step():
    opt = run("ddp", steps=7)
    assert dict(opt.comm.ledger.bytes_by_tag) == {"grads": 7 * P * 4}
    assert opt.comm.ledger.collectives == 7
    assert opt.comm_summary()["ratio_vs_ddp"] == 1.0


@pytest.mark.parametrize("method,bytes_by_tag", [
    ("local-adam", {"params": 5 * P * 4, "exp_avg": 5 * P * 4, "exp_avg_sq": 5 * P * 4}),
    ("keep-states", {"params": 5 * P * 4}),
    ("reset-states", {"params": 5 * P * 4}),
])
def test_baseline_bytes(method, bytes_by_tag):
    opt = run(method, steps=15, period_x=3)
    assert dict(opt.comm.ledger.bytes_by_tag) == bytes_by_tag


def test_sgdm_desloc_syncs_only_the_momentum_buffer():
    T = 12
    opt = run("desloc", "sgdm", steps=T, period_x=2, period_u=3, period_v=4)  # K_v has no state
    assert opt.discover_states() == ["momentum_buffer"]
    assert dict(opt.comm.ledger.bytes_by_tag) == {"params": T // 2 * P * 4, "momentum_buffer": T // 3 * P * 4}
    assert opt.expected_bytes(T) == opt.comm.ledger.total_bytes


def test_ledger_survives_state_dict_round_trip():
    opt = run("desloc", steps=6, period_x=2, period_u=3, period_v=6)
    saved = opt.state_dict()
    before = opt.comm.ledger.state_dict()
    opt.comm.ledger.load_state_dict({"bytes_by_tag": {}, "syncs_by_tag": {}, "collectives": 0})
    opt.load_state_dict(saved)
    assert opt.comm.ledger.state_dict() == before
    assert opt.global_step == 6


def test_observer_traffic_is_kept_apart():
    """The logged metrics' averaging (ProcessWorkers) is neither a collective nor method bytes."""
    comm = SimulatedComm(M)
    comm.all_reduce_mean([torch.zeros(M, 3, dtype=torch.float64)], ["metrics"])
    comm.all_reduce_mean([torch.zeros(M, 5)], ["params"])
    ledger = comm.ledger
    assert ledger.collectives == 1 and ledger.total_bytes == 20
    assert ledger.bytes_by_tag == {"params": 20} and dict(ledger.syncs_by_tag) == {"params": 1}
    assert dict(ledger.observer_bytes_by_tag) == {"metrics": 24}
    assert "metrics" not in str(ledger.summary())


def test_gossip_bytes_per_worker_are_exact_for_odd_m():
    """M = 3, one-peer: one pair exchanges, one worker sits out: 2/3 of a tensor per worker."""
    from desloc.topology import mixing

    comm = SimulatedComm(3)
    x = torch.randn(3, 5)
    comm.mix([x], ["params"], mixing("one-peer", 3, 0))
    assert comm.ledger.bytes_by_tag["params"] == 2 * 20 / 3 == comm.ledger.total_bytes
    assert sum(comm.ledger.bytes_by_link.values()) == 40 and len(comm.ledger.bytes_by_link) == 2
    comm.mix([x], ["params"], mixing("one-peer", 3, 1))
    assert comm.ledger.bytes_by_tag["params"] == 80 / 3
    comm.mix([x], ["params"], mixing("one-peer", 3, 2))
    assert comm.ledger.bytes_by_tag["params"] == 40 and isinstance(comm.ledger.bytes_by_tag["params"], int)
    assert comm.ledger.collectives == 3


def test_ledger_reads_the_previous_checkpoint_format():
    ledger = SimulatedComm(2).ledger
    ledger.load_state_dict({"bytes_by_tag": {"params": 40, "metrics": 16}, "syncs_by_tag": {"params": 2, "metrics": 1},
                            "collectives": 3})
    assert ledger.bytes_by_tag == {"params": 40} and ledger.total_bytes == 40
    assert dict(ledger.observer_bytes_by_tag) == {"metrics": 16} and dict(ledger.syncs_by_tag) == {"params": 2}
    again = SimulatedComm(2).ledger
    again.load_state_dict(ledger.state_dict())
    assert again.state_dict() == ledger.state_dict()
