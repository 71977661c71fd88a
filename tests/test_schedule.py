"""The sync schedule against the rules of shared/papers.md, written out by hand.

Every engine call is checked against ``opt.schedule`` elsewhere (``test_fake_comm.py``,
``test_ledger.py``); here the schedule itself is checked against an independent oracle.
"""

import pytest
import torch

from desloc import MethodConfig, SimulatedComm, build_method
from desloc.algorithms.schedule import SyncSchedule
from desloc.optim import InnerConfig

CASES = {
    "ddp": dict(period_x=3),
    "local-adam": dict(period_x=2),
    "desloc": dict(period_x=2, period_u=3, period_v=5),
    "keep-states": dict(period_x=2),
    "reset-states": dict(period_x=3),
    "diloco": dict(period_x=4),
    "gasloc": dict(period_x=3),
}


def oracle(method, periods, roles, t):
    """Tags sent at step t (1-based) by papers.md sections 1, 2 and 5."""
    if method == "ddp":
        return {"grads"}  # the gradient, every step
    kx = periods["period_x"]
    tags = {"params"} if t % kx == 0 else set()
    k = {"local-adam": {"u": kx, "v": kx},
         "desloc": {"u": periods.get("period_u"), "v": periods.get("period_v")}}.get(method, {})
    return tags | {name for name, role in roles.items() if k.get(str(role)) and t % k[str(role)] == 0}


@pytest.mark.parametrize("inner", ["adamw", "sgdm", "adopt"])
@pytest.mark.parametrize("method", sorted(CASES))
def test_schedule_follows_the_papers(method, inner):
    icfg = InnerConfig(inner, lr=0.1)
    roles = icfg.state_roles()
    opt = build_method(MethodConfig(method, **CASES[method]), icfg.build([torch.zeros(2, 3)]), SimulatedComm(2), roles)
    for t in range(1, 61):
        assert set(opt.schedule.due(t)) == oracle(method, CASES[method], roles, t), f"{method} step {t}"
        for tag in opt.schedule.tags:
            assert opt.schedule.count(tag, t) == sum(tag in opt.schedule.due(s) for s in range(1, t + 1))


def test_due_keeps_send_order_and_never_sends_none():
    s = SyncSchedule({"params": 2, "exp_avg": 3, "exp_avg_sq": None})
    assert s.due(6) == ["params", "exp_avg"] and s.due(1) == [] and s.tags == ["params", "exp_avg"]
    assert s.count("exp_avg_sq", 100) == 0 and s.count("params", 7) == 3
