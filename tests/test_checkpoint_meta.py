"""A checkpoint only loads into a run with the same method settings and engine."""

import pytest
import torch

from desloc import CheckpointMismatchError, DesLoc, SimulatedComm
from desloc.comm.base import Communicator
from desloc.comm.ledger import CommLedger


def _opt(comm, p, period_x=2, **kw):
    return DesLoc(torch.optim.AdamW([p], lr=0.1), comm, period_x,
                  {"exp_avg": 4, "exp_avg_sq": 8}, **kw)


def _trained_state(**kw):
    p = torch.ones(2, 3)
    opt = _opt(SimulatedComm(2), p, **kw)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    return opt.state_dict()


def test_changed_period_is_rejected_naming_the_field():
    state = _trained_state(period_x=2)
    opt = _opt(SimulatedComm(2), torch.ones(2, 3), period_x=4)
    with pytest.raises(CheckpointMismatchError, match=r"period_x: checkpoint 2 vs run 4"):
        opt.load_state_dict(state)


def test_changed_clip_is_rejected():
    state = _trained_state()
    opt = _opt(SimulatedComm(2), torch.ones(2, 3), clip_rho=1.0)
    with pytest.raises(CheckpointMismatchError, match="clip_rho"):
        opt.load_state_dict(state)


class _FlatComm(Communicator):
    """Stands in for a one-worker-per-process engine of world size 2 (no collectives run)."""

    def __init__(self):
        self.world_size, self.ledger = 2, CommLedger()

    @property
    def stacked(self):
        return False

    def worker_numel(self, tensor):
        return tensor.numel()

    def all_reduce_mean(self, tensors, tags):
        raise AssertionError("not used")


def test_simulator_checkpoint_rejected_by_process_engine():
    state = _trained_state()
    opt = _opt(_FlatComm(), torch.ones(3))
    with pytest.raises(CheckpointMismatchError, match="simulator"):
        opt.load_state_dict(state)


def test_same_settings_load():
    state = _trained_state()
    opt = _opt(SimulatedComm(2), torch.ones(2, 3))
    opt.load_state_dict(state)
    assert opt.global_step == 3
