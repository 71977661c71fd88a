"""DiLoCo and DES-LOC + Nesterov: the outer step on the pseudo-gradient Delta = xbar - E_m[x^m]."""

import copy

import pytest
import torch

from desloc import ConfigError, InnerConfig, MethodConfig, SimulatedComm, build_method

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

M, N = 3, 5


def grads(steps, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(M, N, generator=g, dtype=dtype) for _ in range(steps)]


def run(cfg, inner="adamw", steps=12, x0=None, lr=0.05, gs=None):
    x = (torch.linspace(-1, 1, N, dtype=torch.float64).repeat(M, 1) if x0 is None else x0.clone())
    ic = InnerConfig(inner, lr=lr, momentum=0.0 if inner == "sgdm" else 0.9)
    opt = build_method(cfg, ic.build([x]), SimulatedComm(M), ic.state_roles())
    for g in (gs or grads(steps))[:steps]:
        x.grad = g.clone()
        opt.step()
    return x, opt


def test_outer_sgd_lr1_no_momentum_is_plain_averaging():
    """xbar - 1 * (xbar - E[x]) = E[x]: diloco reduces to keep-states (FAVG + local Adam states)."""
    x_d, _ = run(MethodConfig("diloco", period_x=4, outer="sgd", outer_lr=1.0, outer_momentum=0.0))
    x_k, _ = run(MethodConfig("keep-states", period_x=4))
    torch.testing.assert_close(x_d, x_k, rtol=1e-12, atol=1e-14)


def test_diloco_h1_inner_sgd_is_ddp_sgd():
    """H = 1, inner SGD, outer SGD(lr 1, momentum 0): x - lr * E[g], i.e. DDP-SGD."""
    x_d, _ = run(MethodConfig("diloco", period_x=1, outer="sgd", outer_lr=1.0, outer_momentum=0.0), inner="sgdm")
    x_ddp, _ = run(MethodConfig("ddp"), inner="sgdm")
    torch.testing.assert_close(x_d, x_ddp, rtol=1e-12, atol=1e-14)
    assert torch.equal(x_d[0].expand_as(x_d), x_d)


def naive_diloco(H, steps, inner_lr, outer_lr, mu, gs):
    """Python-list reference: M SGD workers (no momentum), Nesterov outer step every H steps."""
    xs = [torch.linspace(-1, 1, N, dtype=torch.float64) for _ in range(M)]
    xbar, buf = xs[0].clone(), None
    for t, g in enumerate(gs[:steps]):
        xs = [x - inner_lr * g[m] for m, x in enumerate(xs)]
        if (t + 1) % H == 0:
            delta = xbar - sum(xs) / M
            buf = delta.clone() if buf is None else mu * buf + delta  # torch SGD: first buf = grad
            xbar = xbar - outer_lr * (delta + mu * buf)  # Nesterov
            xs = [xbar.clone() for _ in range(M)]
    return torch.stack(xs)


def test_diloco_matches_naive_reference():
    gs = grads(20, seed=3)
    x, _ = run(MethodConfig("diloco", period_x=4, outer_lr=0.7, outer_momentum=0.9), inner="sgdm", steps=20, lr=0.1,
               gs=gs)
    ref = naive_diloco(4, 20, 0.1, 0.7, 0.9, gs)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-12)


def test_desloc_nesterov_changes_params_not_bytes():
    plain_x, plain = run(MethodConfig("desloc", period_x=2, period_u=4, period_v=8), steps=16)
    nest_x, nest = run(MethodConfig("desloc", period_x=2, period_u=4, period_v=8, outer="nesterov", outer_lr=0.7,
                                    outer_momentum=0.5), steps=16)  # at H = 2 the defaults are plain averaging
    assert nest.comm.ledger.bytes_by_tag == plain.comm.ledger.bytes_by_tag
    assert not torch.allclose(plain_x, nest_x)


@pytest.mark.parametrize("name", ["diloco", "desloc", "local-adam"])
def test_outer_state_survives_resume_bitwise(name):
    cfg = MethodConfig(name, period_x=3, outer="nesterov", outer_momentum=0.9)  # a momentum state to save
    gs = grads(14, seed=5)
    straight, _ = run(cfg, steps=14, gs=gs)
    x, opt = run(cfg, steps=7, gs=gs)  # mid-round: 7 % 3 != 0
    state = copy.deepcopy(opt.state_dict())
    assert state["desloc"]["extra"]["outer"]["state"], "outer momentum must be saved"
    x2 = x.detach().clone()
    ic = InnerConfig("adamw", lr=0.05)
    fresh = build_method(cfg, ic.build([x2]), SimulatedComm(M), ic.state_roles())
    fresh.load_state_dict(state)
    for g in gs[7:14]:
        x2.grad = g.clone()
        fresh.step()
    assert torch.equal(x2, straight)


def test_outer_errors():
    with pytest.raises(ConfigError, match="ddp has no parameter sync"):
        MethodConfig("ddp", outer="nesterov")
    with pytest.raises(ConfigError, match="outer must be"):
        MethodConfig("diloco", outer="adam")
    with pytest.raises(ConfigError, match="outer_lr"):
        MethodConfig("diloco", outer_lr=0.0)
    x0 = torch.randn(M, N, dtype=torch.float64)  # workers differ: no common anchor
    with pytest.raises(ConfigError, match="same parameters"):
        run(MethodConfig("diloco", period_x=2), x0=x0)


def test_default_outer_momentum_follows_the_round_length():
    from desloc.algorithms.outer import default_outer_momentum

    assert [default_outer_momentum(h) for h in (8, 50, 100, 500, 5000)] == [0.0, 0.0, 0.5, 0.9, 0.9]
    assert MethodConfig("diloco", period_x=8).outer_momentum == 0.0
    assert MethodConfig("diloco", period_x=500).outer_momentum == 0.9
    assert MethodConfig("diloco", period_x=8, outer_momentum=0.9).outer_momentum == 0.9


def test_default_outer_lr_moves_with_the_momentum():
    """lr = 1 - mu/3: plain averaging (lr 1, mu 0) for H <= 50, DiLoCo's (0.7, 0.9) from H = 500."""
    from desloc.algorithms.outer import default_outer_lr

    assert [default_outer_lr(h) for h in (4, 8, 50, 64, 100, 500, 5000)] == [1.0, 1.0, 1.0, 0.927083, 0.833333, 0.7, 0.7]
    assert MethodConfig("diloco", period_x=8).outer_lr == 1.0
    assert MethodConfig("diloco", period_x=500).outer_lr == 0.7
    assert MethodConfig("diloco", period_x=500, outer_lr=0.5).outer_lr == 0.5


def test_default_outer_step_at_short_rounds_is_plain_averaging():
    """At H <= 50 the default diloco is keep-states (averaging x, states local) up to float rounding:
    xbar - 1 * (xbar - E[x]) rounds, so not bitwise."""
    gs = grads(12, seed=7)
    x_d, _ = run(MethodConfig("diloco", period_x=4), gs=gs, steps=12)
    x_k, _ = run(MethodConfig("keep-states", period_x=4), gs=gs, steps=12)
    torch.testing.assert_close(x_d, x_k, rtol=1e-12, atol=1e-12)
