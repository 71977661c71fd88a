"""The contract every registered method honours (runs over the whole registry)."""

import copy

import pytest
import torch

from desloc import METHODS, InnerConfig, MethodConfig, SimulatedComm, build_method

M = 2
SHAPES = [(3, 4), (5,), (2, 2, 2)]


def _span(t):
    """The bytes of memory ``t`` covers: [first, end)."""
    first = t.data_ptr()
    last = first + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) * t.element_size()
    return first, last + t.element_size()


class RecordingComm(SimulatedComm):
    """Records the memory of every tensor (or flat buffer) that crosses the interface, per call."""

    def __init__(self, m):
        super().__init__(m)
        self.calls = []

    def all_reduce_mean(self, tensors, tags):
        self.calls.append([_span(t) for t in tensors])
        super().all_reduce_mean(tensors, tags)

    def all_reduce_mean_flat(self, buffers, tags, hidden_steps=None):
        self.calls.append([_span(t) for t in buffers])
        return super().all_reduce_mean_flat(buffers, tags, hidden_steps)

    def mix(self, tensors, tags, neighbours):
        self.calls.append([_span(t) for t in tensors])
        super().mix(tensors, tags, neighbours)


def sent(call, t):
    """How many of one call's tensors hold ``t`` (exactly: it, or a flat buffer it is a view of)."""
    a, b = _span(t)
    return sum(1 for lo, hi in call if lo <= a and b <= hi)


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
        assert sent(synced, t) == 1


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


def _halving(step):
    return 0.5 ** step


@pytest.mark.parametrize("name", sorted(METHODS))
def test_scheduler_follows_after_load_state_dict(name):
    """The wrapper's param_groups are the inner optimizer's, before and after load_state_dict
    (which replaces the inner's group dicts): a scheduler built on the wrapper -- before the
    load, as ``desloc train --resume`` does, or after it -- sets the inner lr."""
    params, opt = build(name)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _halving)
    for _ in range(3):
        steps(params, opt, 1)
        sched.step()
    sd, sched_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())

    fresh_params, fresh = build(name)
    for a, b in zip(fresh.params, params):
        a.copy_(b)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh, _halving)  # built before the load
    hook_calls = []
    fresh.register_step_pre_hook(lambda o, args, kwargs: hook_calls.append(o))
    fresh.load_state_dict(sd)
    fresh_sched.load_state_dict(sched_sd)
    assert fresh.param_groups is fresh.inner.param_groups and fresh.state is fresh.inner.state
    assert fresh.inner.param_groups[0]["lr"] == 0.01 * 0.5 ** 3
    steps(fresh_params, fresh, 1)
    fresh_sched.step()
    assert fresh.inner.param_groups[0]["lr"] == 0.01 * 0.5 ** 4
    assert hook_calls == [fresh]  # step hooks registered on the wrapper run

    # a scheduler created after the load resumes from the checkpoint's initial_lr and epoch
    later = torch.optim.lr_scheduler.LambdaLR(fresh, _halving, last_epoch=fresh_sched.last_epoch)
    assert fresh.inner.param_groups[0]["lr"] == 0.01 * 0.5 ** 5  # its initial step
    steps(fresh_params, fresh, 1)
    later.step()
    assert fresh.inner.param_groups[0]["lr"] == 0.01 * 0.5 ** 6


def _synced_target(name, opt, extra):
    if name == "gasloc":
        return opt.anchor[-1]  # gossips its outer copies
    return extra.grad if name == "ddp" else extra


@pytest.mark.parametrize("name", sorted(METHODS))
def test_add_param_group_is_stepped_synced_and_saved(name):
    """add_param_group on the wrapper adds to the inner optimizer: the new parameter is stepped,
    synced with the others (DES-LOC's and GASLoC's outer anchors grow with it) and saved."""
    comm = RecordingComm(M)
    params, opt = build(name, comm)
    steps(params, opt, 1)
    extra = torch.randn(1, 3).repeat(M, 1)  # identical on every worker, like the model's
    opt.add_param_group({"params": [extra], "lr": 0.02})
    assert len(opt.inner.param_groups) == 2 and opt.param_groups is opt.inner.param_groups
    assert opt.inner.param_groups[1]["params"][0] is extra and opt.inner.param_groups[1]["lr"] == 0.02
    assert opt.inner.param_groups[1]["weight_decay"] == opt.inner.defaults["weight_decay"]

    before = extra.clone()
    steps(params + [extra], opt, 2)  # step 3: mid-period for every method but ddp
    assert not torch.equal(extra, before), "the inner optimizer did not step the new parameter"
    assert extra in opt.inner.state
    if name != "ddp":
        assert not torch.equal(extra[0], extra[1])  # local steps on different gradients
    steps(params + [extra], opt, 1)  # step 4: a parameter sync for every method
    assert sent(comm.calls[-1], _synced_target(name, opt, extra)) == 1, "the new parameter was not synced"
    assert torch.equal(extra[0], extra[1]), "the workers disagree on the new parameter after a sync"

    # a fresh wrapper with the same group added loads the checkpoint and continues identically
    sd = copy.deepcopy(opt.state_dict())
    fresh_params, fresh = build(name)
    fresh_extra = extra.clone()
    fresh.add_param_group({"params": [fresh_extra], "lr": 0.02})
    for a, b in zip(fresh_params, params):
        a.copy_(b)
    fresh.load_state_dict(sd)
    steps(params + [extra], opt, 3, seed=5)
    steps(fresh_params + [fresh_extra], fresh, 3, seed=5)
    for a, b in zip(params + [extra], fresh_params + [fresh_extra]):
        assert torch.equal(a, b)
