"""MT-DAO against scalar references of papers.md section 4, written with Python floats, and its
reductions to ADOPT / AdamW:

    ADOPT flavour, t = calls so far:
        t = 0:  v <- g^2                                           (no update)
        t >= 1: n = clamp(g / max(sqrt(v), eps), -t^0.25, t^0.25)
                u^j <- b_j u^j + (1 - b_j) n
                x <- x (1 - lr wd) - lr ((1 - sum w) n + sum_j w_j u^j)
                v <- beta2 v + (1 - beta2) g^2
    Adam flavour, tau = t + 1:
        u^j <- b_j u^j + (1 - b_j) g;  v <- beta2 v + (1 - beta2) g^2
        x <- x (1 - lr wd)
             - lr ((1 - sum w) g + sum_j w_j u^j / (1 - b_j^tau)) / (sqrt(v / (1 - beta2^tau)) + eps)
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from _numerics import assert_within, gamma
from desloc.errors import ConfigError
from desloc.optim import ADOPT
from desloc.optim.mtdao import MTDAO, mtdao_adam_update, mtdao_adopt_update, state_roles

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

F64 = torch.float64


def mtdao_scalar(x, grads, lr, betas, omegas, beta2, eps, wd, flavour):
    """Trajectory [(x, [u^j], v)] after each call, with plain Python floats."""
    us, v = [0.0] * len(betas), 0.0
    rest = 1.0 - sum(omegas)
    traj = []
    for t, g in enumerate(grads):
        if flavour == "adopt":
            if t == 0:
                v = g * g
            else:
                n = g / max(math.sqrt(v), eps)
                n = max(-(t**0.25), min(t**0.25, n))
                us = [b * u + (1 - b) * n for u, b in zip(us, betas)]
                x = x * (1 - lr * wd) - lr * (rest * n + sum(w * u for w, u in zip(omegas, us)))
                v = beta2 * v + (1 - beta2) * g * g
        else:
            tau = t + 1
            us = [b * u + (1 - b) * g for u, b in zip(us, betas)]
            v = beta2 * v + (1 - beta2) * g * g
            num = rest * g + sum(w * u / (1 - b**tau) for w, u, b in zip(omegas, us, betas))
            x = x * (1 - lr * wd) - lr * num / (math.sqrt(v / (1 - beta2**tau)) + eps)
        traj.append((x, list(us), v))
    return traj


# Three coordinates: a tiny first gradient then large ones (the ADOPT clamp is active), a zero
# first gradient (v = 0: the eps floor sets the scale at t = 1), an ordinary noisy sequence.
GRADS = [
    [0.01, 10.0, -3.0, 0.5, 2.0, -1.0, 0.25, 4.0, -0.5, 1.0],
    [0.0, 1e-7, -2e-7, 5e-8, 0.0, 3e-7, -1e-7, 2e-7, 1e-7, -4e-7],
    [0.3, -0.2, 0.5, 0.1, -0.4, 0.35, -0.15, 0.2, 0.05, -0.3],
]
X0 = [0.5, -1.0, 2.0]


def _grad(t, rows=GRADS):
    return torch.tensor([r[t] for r in rows], dtype=F64)


@pytest.mark.parametrize("flavour", ["adopt", "adam"])
@pytest.mark.parametrize("betas,omegas,wd", [
    ((0.9, 0.99), (0.45, 0.45), 0.0),
    ((0.5, 0.9, 0.999), (0.2, 0.3, 0.4), 0.3),
])
def test_matches_scalar_reference(flavour, betas, omegas, wd):
    lr, beta2, eps = 0.1, 0.99, 1e-6
    x = torch.tensor(X0, dtype=F64)
    opt = MTDAO([x], lr=lr, betas=betas, omegas=omegas, beta2=beta2, eps=eps, weight_decay=wd,
                flavour=flavour)
    refs = [mtdao_scalar(X0[i], GRADS[i], lr, betas, omegas, beta2, eps, wd, flavour) for i in range(3)]
    for t in range(len(GRADS[0])):
        x.grad = _grad(t)
        opt.step()
        state = opt.state[x]
        for i, ref in enumerate(refs):
            rx, rus, rv = ref[t]
            assert x[i].item() == pytest.approx(rx, rel=1e-12, abs=1e-15), (t, i)
            for j, ru in enumerate(rus):
                assert state[f"exp_avg_{j}"][i].item() == pytest.approx(ru, rel=1e-12, abs=1e-15), (t, i, j)
            assert state["exp_avg_sq"][i].item() == pytest.approx(rv, rel=1e-12, abs=1e-30), (t, i)
        assert int(state["step"].item()) == t + 1


def test_adopt_flavour_by_hand():
    """Two calls, N = 2, numbers chosen to be exact in binary.
    t = 0: g = 2 -> v = 4, x stays 0, momenta stay 0.
    t = 1: g = 1 -> n = 1 / sqrt(4) = 0.5 (bound 1, unclamped)
           u0 = 0.5 * 0 + 0.5 * 0.5 = 0.25;  u1 = 0.75 * 0 + 0.25 * 0.5 = 0.125
           x  = 0 - 0.5 * ((1 - 0.75) * 0.5 + 0.5 * 0.25 + 0.25 * 0.125) = -0.5 * 0.28125 = -0.140625
           v  = 0.5 * 4 + 0.5 * 1 = 2.5
    """
    x = torch.zeros(1, dtype=F64)
    opt = MTDAO([x], lr=0.5, betas=(0.5, 0.75), omegas=(0.5, 0.25), beta2=0.5)
    x.grad = torch.tensor([2.0], dtype=F64)
    opt.step()
    assert x.item() == 0.0 and opt.state[x]["exp_avg_sq"].item() == 4.0
    x.grad = torch.tensor([1.0], dtype=F64)
    opt.step()
    s = opt.state[x]
    assert (x.item(), s["exp_avg_0"].item(), s["exp_avg_1"].item(), s["exp_avg_sq"].item()) == (
        -0.140625, 0.25, 0.125, 2.5)


def test_adam_flavour_by_hand():
    """One call, N = 2, tau = 1, g = 2:
       u0 = 0.5 * 2 = 1 -> u0 / (1 - 0.5) = 2;  u1 = 0.25 * 2 = 0.5 -> u1 / (1 - 0.75) = 2
       v  = 0.25 * 4 = 1 -> sqrt(v / (1 - 0.75)) = 2
       x  = 1 - 0.5 * ((1 - 0.75) * 2 + 0.5 * 2 + 0.25 * 2) / (2 + eps) = 1 - 0.5 * 2 / 2 = 0.5 (eps -> 0)
    """
    x = torch.ones(1, dtype=F64)
    opt = MTDAO([x], lr=0.5, betas=(0.5, 0.75), omegas=(0.5, 0.25), beta2=0.75, eps=1e-300,
                flavour="adam")
    x.grad = torch.tensor([2.0], dtype=F64)
    opt.step()
    s = opt.state[x]
    got = (x.item(), s["exp_avg_0"].item(), s["exp_avg_1"].item(), s["exp_avg_sq"].item())
    assert got == (0.5, 1.0, 0.5, 1.0)


def _run(opt, x, grads):
    for g in grads:
        x.grad = g.clone()
        opt.step()


def _random_grads(steps, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # heavy-tailed so the ADOPT clamp is active sometimes
    return [torch.randn(shape, generator=gen, dtype=F64) * torch.rand(shape, generator=gen, dtype=F64).pow(-2)
            for _ in range(steps)]


def test_zero_omegas_give_the_unmixed_adopt_step():
    """sum omega = 0: x <- x - lr n with n the clamped normalized gradient (v tracked by hand)."""
    grads = _random_grads(12, (50,))
    x = torch.randn(50, dtype=F64)
    x_ref, v = x.clone(), grads[0] * grads[0]
    opt = MTDAO([x], lr=0.01, betas=(0.9, 0.99), omegas=(0.0, 0.0))
    _run(opt, x, grads[:1])
    for t, g in enumerate(grads[1:], start=1):
        n = (g / v.sqrt().clamp(min=1e-6)).clamp(-(t**0.25), t**0.25)
        x_ref = x_ref - 0.01 * n
        v = 0.9999 * v + (1 - 0.9999) * g * g
        _run(opt, x, [g])
        torch.testing.assert_close(x, x_ref, rtol=1e-14, atol=1e-16)


def test_zero_omegas_give_the_unmixed_adam_step():
    """sum omega = 0: x <- x - lr g / (sqrt(v / (1 - beta2^tau)) + eps)  (RMSprop, bias-corrected)."""
    grads = _random_grads(12, (50,))
    x = torch.randn(50, dtype=F64)
    x_ref, v = x.clone(), torch.zeros(50, dtype=F64)
    opt = MTDAO([x], lr=0.01, betas=(0.9, 0.99), omegas=(0.0, 0.0), flavour="adam")
    for tau, g in enumerate(grads, start=1):
        v = 0.999 * v + (1 - 0.999) * g * g
        x_ref = x_ref - 0.01 * g / ((v / (1 - 0.999**tau)).sqrt() + 1e-8)
        _run(opt, x, [g])
        torch.testing.assert_close(x, x_ref, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_one_momentum_full_weight_is_adopt_bitwise(wd):
    grads = _random_grads(30, (64,))
    x0 = torch.randn(64, dtype=F64)
    a, b = x0.clone(), x0.clone()
    ref = ADOPT([a], lr=0.01, betas=(0.9, 0.9999), eps=1e-6, weight_decay=wd)
    opt = MTDAO([b], lr=0.01, betas=(0.9,), omegas=(1.0,), beta2=0.9999, eps=1e-6, weight_decay=wd)
    for g in grads:
        _run(ref, a, [g])
        _run(opt, b, [g])
        assert torch.equal(a, b)
        assert torch.equal(ref.state[a]["exp_avg"], opt.state[b]["exp_avg_0"])
        assert torch.equal(ref.state[a]["exp_avg_sq"], opt.state[b]["exp_avg_sq"])


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_one_momentum_full_weight_is_adamw(wd):
    grads = _random_grads(30, (64,))
    x0 = torch.randn(64, dtype=F64)
    a, b = x0.clone(), x0.clone()
    lr, (b1, b2) = 0.01, (0.9, 0.999)
    ref = torch.optim.AdamW([a], lr=lr, betas=(b1, b2), eps=1e-8, weight_decay=wd, foreach=False)
    opt = MTDAO([b], lr=lr, betas=(b1,), omegas=(1.0,), weight_decay=wd, flavour="adam")
    # Not bitwise: both evaluate Adam's formula in float64 with the operations in another order
    # (and torch picks kernels per CPU). The gradients are given (x does not feed back into them),
    # so nothing amplifies a difference and each step adds at most: to x, ~4 roundings at
    # magnitude max|x| and ~12 in the update, |update| <= lr ((1 - b1) / sqrt(1 - b2) + wd max|x|)
    # (Kingma & Ba's bound on |m_hat| / sqrt(v_hat)); to m, ~3 at magnitude max|g|; to v, ~3
    # relative (every term >= 0).
    gmax, xmax, tol_x = 0.0, x0.abs().max().item(), 0.0
    for t, g in enumerate(grads, start=1):
        _run(ref, a, [g])
        _run(opt, b, [g])
        gmax, xmax = max(gmax, g.abs().max().item()), max(xmax, a.abs().max().item())
        tol_x += gamma(4, F64) * xmax + gamma(12, F64) * lr * ((1 - b1) / math.sqrt(1 - b2) + wd * xmax)
        assert_within(b, a, tol_x, f"step {t} x")
        assert_within(opt.state[b]["exp_avg_0"], ref.state[a]["exp_avg"], t * gamma(3, F64) * 2 * gmax, f"step {t} m")
        v = ref.state[a]["exp_avg_sq"]
        assert_within(opt.state[b]["exp_avg_sq"], v, gamma(3 * t, F64) * v, f"step {t} v")


@pytest.mark.parametrize("flavour", ["adopt", "adam"])
def test_equal_betas_split_weight_equals_one_momentum(flavour):
    """Two momenta with the same beta are the same EMA: weights (w1, w2) act as one weight w1 + w2."""
    grads = _random_grads(15, (40,))
    x0 = torch.randn(40, dtype=F64)
    a, b = x0.clone(), x0.clone()
    one = MTDAO([a], lr=0.01, betas=(0.95,), omegas=(0.75,), flavour=flavour)
    two = MTDAO([b], lr=0.01, betas=(0.95, 0.95), omegas=(0.25, 0.5), flavour=flavour)
    _run(one, a, grads)
    _run(two, b, grads)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("flavour", ["adopt", "adam"])
def test_stacked_workers_equal_separate_optimizers_bitwise(flavour):
    """One optimizer over a [M, n] tensor == M optimizers over the rows (elementwise update)."""
    m, n = 4, 37
    grads = _random_grads(10, (m, n))
    x0 = torch.randn(m, n, dtype=F64)
    kw = dict(lr=0.01, betas=(0.9, 0.99, 0.999), omegas=(0.3, 0.3, 0.3), weight_decay=0.1, flavour=flavour)
    stacked = x0.clone()
    rows = [x0[i].clone() for i in range(m)]
    opt = MTDAO([stacked], **kw)
    opts = [MTDAO([r], **kw) for r in rows]
    for g in grads:
        _run(opt, stacked, [g])
        for i in range(m):
            _run(opts[i], rows[i], [g[i]])
    assert torch.equal(stacked, torch.stack(rows))
    for name in state_roles(3):
        per_worker = torch.stack([o.state[r][name] for o, r in zip(opts, rows)])
        assert torch.equal(opt.state[stacked][name], per_worker)


@pytest.mark.parametrize("flavour", ["adopt", "adam"])
def test_state_names_after_one_step(flavour):
    x = torch.zeros(3, 5)
    opt = MTDAO([x], betas=(0.9, 0.99, 0.999), omegas=(0.2, 0.3, 0.4), flavour=flavour)
    x.grad = torch.ones(3, 5)
    opt.step()
    state = opt.state[x]
    assert set(state) == {"exp_avg_0", "exp_avg_1", "exp_avg_2", "exp_avg_sq", "step"}
    for name in state_roles(3):
        assert state[name].shape == x.shape and state[name].dtype == x.dtype
    assert state["step"].dim() == 0 and state["step"].item() == 1.0
    assert state_roles(3) == {"exp_avg_0": "u0", "exp_avg_1": "u1", "exp_avg_2": "u2", "exp_avg_sq": "v"}
    # the sync engine discovers tensors with the parameter's shape: exactly the role-mapped ones
    assert {k for k, v in state.items() if v.shape == x.shape} == set(state_roles(3))


def test_defaults():
    x = torch.zeros(2)
    g = MTDAO([x]).param_groups[0]
    assert (g["betas"], g["omegas"], g["beta2"], g["eps"], g["flavour"]) == (
        (0.9, 0.99), (0.45, 0.45), 0.9999, 1e-6, "adopt")
    g = MTDAO([x], flavour="adam").param_groups[0]
    assert (g["beta2"], g["eps"]) == (0.999, 1e-8)
    # half-lives the docstring cites: fast 6.6 steps, slow 69 steps
    assert [round(math.log(0.5) / math.log(b), 1) for b in g["betas"]] == [6.6, 69.0]


@pytest.mark.parametrize("kwargs,field", [
    (dict(betas=()), "betas"),
    (dict(betas=(0.9, 1.0), omegas=(0.1, 0.1)), "betas[1]"),
    (dict(betas=(-0.1,), omegas=(0.5,)), "betas[0]"),
    (dict(betas=(0.9, 0.99), omegas=(0.5,)), "omegas"),
    (dict(omegas=(0.5, -0.1)), "omegas[1]"),
    (dict(omegas=(0.6, 0.5)), "omegas must sum"),
    (dict(omegas=(float("nan"), 0.1)), "omegas[0]"),
    (dict(beta2=1.0), "beta2"),
    (dict(lr=-1.0), "lr"),
    (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(flavour="sgd"), "flavour"),
])
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match="MTDAO " + re.escape(field)):
        MTDAO([torch.zeros(2)], **kwargs)


def test_invalid_group_override_is_rejected_and_sum_tolerance():
    with pytest.raises(ConfigError, match="omegas"):
        MTDAO([{"params": [torch.zeros(2)], "omegas": (0.9,)}])
    MTDAO([torch.zeros(2)], betas=(0.5, 0.9, 0.99), omegas=(0.7, 0.2, 0.1))  # sums to 1 up to rounding


@pytest.mark.parametrize("flavour", ["adopt", "adam"])
@pytest.mark.parametrize("split", [1, 4])
def test_state_dict_round_trip_continues_identically(flavour, split):
    grads = _random_grads(10, (3, 8))
    kw = dict(lr=0.01, betas=(0.9, 0.99), omegas=(0.4, 0.5), weight_decay=0.05, flavour=flavour)
    x0 = torch.randn(3, 8, dtype=F64)
    a = x0.clone()
    opt_a = MTDAO([a], **kw)
    _run(opt_a, a, grads[:split])
    saved_x, saved = a.clone(), copy.deepcopy(opt_a.state_dict())
    _run(opt_a, a, grads[split:])

    b = saved_x.clone()
    opt_b = MTDAO([b], **kw)
    opt_b.load_state_dict(saved)
    _run(opt_b, b, grads[split:])
    assert torch.equal(a, b)
    for name in (*state_roles(2), "step"):
        assert torch.equal(opt_a.state[a][name], opt_b.state[b][name])


def test_update_functions_are_the_class_math():
    p, g, u0, u1, v = (torch.tensor([x]) for x in (1.0, 3.0, 0.0, 0.0, 4.0))
    # t = 16: n = 3 / 2 = 1.5 < 2; u0 = 0.75, u1 = 0.375; x = 1 - 0.5 (0.5 * 1.5 + 0.25 * 0.75 + 0.25 * 0.375)
    mtdao_adopt_update(p, g, [u0, u1], v, step=16, lr=0.5, betas=(0.5, 0.75), omegas=(0.25, 0.25),
                       beta2=0.5, eps=1e-6, weight_decay=0.0)
    assert (p.item(), u0.item(), u1.item(), v.item()) == (1 - 0.5 * 1.03125, 0.75, 0.375, 6.5)
    p, g, u0, v = (torch.tensor([x], dtype=F64) for x in (1.0, 2.0, 0.0, 0.0))
    # tau = 1, omega = 0: x = 1 - 0.5 * 2 / (sqrt(0.25 * 4 / 0.25) + eps)
    mtdao_adam_update(p, g, [u0], v, step=0, lr=0.5, betas=(0.5,), omegas=(0.0,), beta2=0.75,
                      eps=1e-300, weight_decay=0.0)
    assert (p.item(), u0.item(), v.item()) == (0.5, 1.0, 1.0)


def test_params_without_grad_are_skipped_and_closure_loss_returned():
    a = torch.tensor([1.0], requires_grad=True)
    c = torch.tensor([1.0])
    opt = MTDAO([a, c])

    def closure():
        opt.zero_grad()
        loss = (a * a).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 1.0
    assert c not in opt.state and opt.state[a]["exp_avg_sq"].item() == 4.0
