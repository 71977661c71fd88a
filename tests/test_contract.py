"""The contract every registered method honours (runs over the whole registry)."""

import copy

import pytest
import torch

from desloc import METHODS, InnerConfig, MethodConfig, SimulatedComm, build_method

M = 2
SHAPES = [(3, 4), (5,), (2, 2, 2)]


class RecordingComm(SimulatedComm):
    """Records the identity of every tensor that crosses the interface, per call."""

    def __init__(self, m):
        super().__init__(m)
        self.calls = []

    def all_reduce_mean(self, tensors, tags):
        self.calls.append([id(t) for t in tensors])
        super().all_reduce_mean(tensors, tags)

    def mix(self, tensors, tags, neighbours):
        self.calls.append([id(t) for t in tensors])
        super().mix(tensors, tags, neighbours)


def build(name, comm=None, dtype=torch.float32):
    params = [torch.randn(1, *s, dtype=dtype).repeat(M, *([1] * len(s))) for s in SHAPES]
    inner_name = "mtdao" if name == "mtdao" else "adamw"
    ic = InnerConfig(inner_name, lr=0.01)
    cfg = MethodConfig(name, period_x=2, topology="one-peer") if name == "gasloc" else MethodConfig(name, period_x=2)
    opt = build_method(cfg, ic.build(params), comm or SimulatedComm(M), ic.state_roles())
    return params, opt


def steps(params, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_parameter_is_communicated_exactly_once_per_sync(name):
    comm = RecordingComm(M)
    params, opt = build(name, comm)
    steps(params, opt, 2)  # step 2 is a parameter sync for every method
    synced = comm.calls[-1]
    assert len(synced) == len(set(synced)), "a tensor sent twice in one sync"
    targets = opt.anchor if name == "gasloc" else params  # gasloc gossips its outer copies
    if name == "ddp":
        targets = [p.grad for p in params]
    for t in targets:
        assert synced.count(id(t)) == 1


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape_preserved(name, dtype):
    params, opt = build(name, dtype=dtype)
    before = [(p.dtype, p.shape) for p in params]
    steps(params, opt, 4)
    assert [(p.dtype, p.shape) for p in params] == before
    for p in params:
        for v in opt.inner.state[p].values():
            if torch.is_tensor(v) and v.shape == p.shape:
                assert v.dtype == dtype


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_dict_round_trip_mid_period(name):
    params, opt = build(name)
    steps(params, opt, 3)  # mid-period
    sd = copy.deepcopy(opt.state_dict())
    params2 = [p.detach().clone() for p in params]
    _, fresh = build(name)
    fresh_params = fresh.params
    for a, b in zip(fresh_params, params2):
        a.copy_(b)
    fresh.load_state_dict(sd)
    assert fresh.global_step == 3
    steps(params, opt, 3, seed=9)
    steps(fresh_params, fresh, 3, seed=9)
    for a, b in zip(params, fresh_params):
        assert torch.equal(a, b)
    assert fresh.comm.ledger.state_dict() == opt.comm.ledger.state_dict()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_lr_scheduler_and_zero_grad(name):
    params, opt = build(name)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    steps(params, opt, 1)
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.005)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
