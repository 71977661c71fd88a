"""Every method must use what the collective returns (the torchft trick).

``DoublingComm`` is a simulator whose all-reduce writes 2 x mean. Nothing real does that, which is
the point: after a sync each synced tensor must be exactly 2 x the mean of its post-local-step
values. An algorithm that averaged a copy and dropped it, averaged by itself, or overwrote the
result afterwards would leave 1 x mean (or the un-averaged values) and fail.

Each step is checked against a shadow: a deep copy of the inner optimizer (parameters and state)
taken just before the step and stepped once on the same gradient, i.e. the purely local step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from desloc.algorithms import MethodConfig, build_method
from desloc.comm import SimulatedComm
from desloc.optim import InnerConfig

M, N = 3, 5


class DoublingComm(SimulatedComm):
    """all_reduce_mean that leaves 2 x the mean, and remembers what it was given."""

    def __init__(self, world_size: int):
        super().__init__(world_size)
        self.calls: list[dict[str, list[torch.Tensor]]] = []

    def all_reduce_mean(self, tensors, tags):
        received: dict[str, list[torch.Tensor]] = {}
        for t, tag in zip(tensors, tags):
            received.setdefault(tag, []).append(t.detach().clone())
        self.calls.append(received)
        super().all_reduce_mean(tensors, tags)
        for t in tensors:
            t.mul_(2)

    def all_reduce_mean_flat(self, buffers, tags, hidden_steps=None):
        """The zero-copy path: one flat [M, numel] buffer per tag (here one parameter, so the
        buffer has the parameter's shape)."""
        received: dict[str, list[torch.Tensor]] = {}
        for t, tag in zip(buffers, tags):
            received.setdefault(tag, []).append(t.detach().clone())
        self.calls.append(received)
        handles = super().all_reduce_mean_flat(buffers, tags, hidden_steps)
        for t in buffers:
            t.mul_(2)
        return handles


def doubled_mean(t: torch.Tensor) -> torch.Tensor:
    return (2 * t.sum(0, keepdim=True) / t.shape[0]).expand_as(t)


def grads(t: int) -> torch.Tensor:
    """[M, N] deterministic gradients, different on every worker and step."""
    i = torch.arange(M * N, dtype=torch.float32).reshape(M, N)
    return torch.sin(0.37 * i + 1.1 * t) + 0.2 * (torch.arange(M).reshape(M, 1) + 1)


def shadow_local_step(inner: torch.optim.Optimizer, grad: torch.Tensor):
    """The local step alone: (params, state) of a deep copy of ``inner`` stepped on ``grad``."""
    shadow = copy.deepcopy(inner)
    (p,) = shadow.param_groups[0]["params"]
    p.grad = grad.clone()
    shadow.step()
    return p.detach(), shadow.state[p]


def build(method, inner, **periods):
    X = torch.linspace(-1, 1, N).repeat(M, 1).contiguous()  # [M, N], identical start
    icfg = InnerConfig(inner, lr=0.1, weight_decay=0.01)
    comm = DoublingComm(M)
    opt = build_method(MethodConfig(method, **periods), icfg.build([X]), comm, icfg.state_roles())
    return X, opt, comm


CASES = {
    "local-adam": dict(period_x=2),
    "desloc": dict(period_x=2, period_u=3, period_v=5),
    "keep-states": dict(period_x=2),
    "reset-states": dict(period_x=3),
}


@pytest.mark.parametrize("inner", ["adamw", "sgdm", "adopt"])
@pytest.mark.parametrize("method", sorted(CASES))
def test_local_methods_use_the_all_reduce_result(method, inner):
    periods = CASES[method]
    X, opt, comm = build(method, inner, **periods)
    roles = InnerConfig(inner).state_roles()
    seen = set()
    for t in range(1, 11):
        g = grads(t)
        want_x, want_state = shadow_local_step(opt.inner, g)
        n_calls = len(comm.calls)
        X.grad = g.clone()
        opt.step()
        tags = set(opt.schedule.due(t))  # the one schedule (checked by hand in test_schedule.py)
        seen |= tags
        if not tags:
            assert len(comm.calls) == n_calls, f"step {t}: nothing is due, yet a collective ran"
        else:
            received = comm.calls[-1]
            assert set(received) == tags, f"step {t}"
            for name in tags:  # what was sent is the post-local-step value ...
                local = want_x if name == "params" else want_state[name]
                torch.testing.assert_close(received[name][0], local, msg=lambda s: f"step {t} sent {name}: {s}")
        # ... and what is kept is the collective's result (2 x mean), or the local value.
        state = opt.inner.state[X]
        for name, live, local in [("params", X, want_x)] + [(n, state[n], want_state[n]) for n in roles]:
            if name in tags:
                expected = doubled_mean(local)
            elif method == "reset-states" and "params" in tags:
                expected = torch.zeros_like(local)
            else:
                expected = local
            torch.testing.assert_close(live, expected, msg=lambda s: f"step {t}, {name}: {s}")
    assert "params" in seen and (method not in ("local-adam", "desloc") or seen >= set(roles) | {"params"})


@pytest.mark.parametrize("inner", ["adamw", "sgdm"])
def test_ddp_steps_on_the_all_reduced_gradient(inner):
    X, opt, comm = build("ddp", inner)
    for t in range(1, 5):
        g = grads(t)
        want_x, want_state = shadow_local_step(opt.inner, doubled_mean(g).contiguous())
        X.grad = g.clone()
        opt.step()
        assert set(comm.calls[-1]) == {"grads"}
        torch.testing.assert_close(comm.calls[-1]["grads"][0], g)  # sent the local gradients
        torch.testing.assert_close(X.grad, doubled_mean(g))  # the gradient the step used
        torch.testing.assert_close(X, want_x, msg=lambda s: f"step {t}: {s}")
        for name, value in want_state.items():
            torch.testing.assert_close(opt.inner.state[X][name], value, msg=lambda s: f"step {t} {name}: {s}")
    assert len(comm.calls) == 4
    assert torch.equal(X[0], X[1]) and torch.equal(X[1], X[2])


def test_doubling_comm_is_distinguishable_from_mean():
    """Sanity of the fake itself: with the honest simulator the same run ends elsewhere."""
    X2, opt2, _ = build("desloc", "adamw", **CASES["desloc"])
    X1 = X2.clone()
    icfg = InnerConfig("adamw", lr=0.1, weight_decay=0.01)
    opt1 = build_method(MethodConfig("desloc", **CASES["desloc"]), icfg.build([X1]), SimulatedComm(M),
                        icfg.state_roles())
    for t in range(1, 5):
        X1.grad, X2.grad = grads(t), grads(t)
        opt1.step()
        opt2.step()
    assert (X1 - X2).abs().max() > 0.1
