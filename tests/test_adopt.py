"""ADOPT against a scalar reference of papers.md section 3, written with Python floats:

    step 0:    v <- g^2                                  (no parameter update, no decay)
    step t>=1: n = g / max(sqrt(v), eps)                 (v from the previous step)
               n = clamp(n, -t^0.25, t^0.25)
               u <- beta1 u + (1 - beta1) n
               x <- x (1 - lr wd) - lr u                 (decoupled weight decay)
               v <- beta2 v + (1 - beta2) g^2
"""

from __future__ import annotations

import math

import pytest
import torch

from desloc.optim import ADOPT, InnerConfig
from desloc.optim.adopt import adopt_update

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default


def adopt_scalar(x, grads, lr, beta1, beta2, eps, wd):
    """Trajectory [(x, u, v)] after each call, and the steps at which the clamp was active."""
    u = v = 0.0
    traj, clamped = [], []
    for t, g in enumerate(grads):
        if t == 0:
            v = g * g
        else:
            n = g / max(math.sqrt(v), eps)
            bound = t**0.25
            if abs(n) > bound:
                clamped.append(t)
                n = math.copysign(bound, n)
            u = beta1 * u + (1 - beta1) * n
            x = x * (1 - lr * wd) - lr * u
            v = beta2 * v + (1 - beta2) * g * g
        traj.append((x, u, v))
    return traj, clamped


# Three coordinates, each its own scalar problem:
#   0: a tiny first gradient, then large ones -> the clamp is active at t = 1 (bound 1), and
#      with beta2 = 0.9999 at every later step (bounds t^0.25), as v catches up only slowly;
#   1: a zero first gradient -> v = 0 and the eps floor sets the scale at t = 1;
#   2: an ordinary noisy sequence (clamped at t = 2 only).
GRADS = [
    [0.01, 10.0, -3.0, 0.5, 2.0, -1.0, 0.25, 4.0, -0.5, 1.0],
    [0.0, 1e-7, -2e-7, 5e-8, 0.0, 3e-7, -1e-7, 2e-7, 1e-7, -4e-7],
    [0.3, -0.2, 0.5, 0.1, -0.4, 0.35, -0.15, 0.2, 0.05, -0.3],
]
X0 = [0.5, -1.0, 2.0]


@pytest.mark.parametrize("wd", [0.0, 0.3])
@pytest.mark.parametrize("betas", [(0.9, 0.9999), (0.5, 0.9)])
def test_adopt_matches_scalar_reference(betas, wd):
    lr, eps = 0.1, 1e-6
    x = torch.tensor(X0, dtype=torch.float64)
    opt = ADOPT([x], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    refs = [adopt_scalar(X0[i], GRADS[i], lr, *betas, eps, wd) for i in range(3)]
    for t in range(len(GRADS[0])):
        x.grad = torch.tensor([GRADS[i][t] for i in range(3)], dtype=torch.float64)
        opt.step()
        state = opt.state[x]
        for i, (ref, _) in enumerate(refs):
            rx, ru, rv = ref[t]
            assert x[i].item() == pytest.approx(rx, rel=1e-12, abs=1e-15), (t, i)
            assert state["exp_avg"][i].item() == pytest.approx(ru, rel=1e-12, abs=1e-15), (t, i)
            assert state["exp_avg_sq"][i].item() == pytest.approx(rv, rel=1e-12, abs=1e-30), (t, i)
        assert int(state["step"].item()) == t + 1
    # the cases the grads were built for did happen
    assert 1 in refs[0][1] and 2 in refs[0][1] + refs[2][1]  # clamp hit at bound 1 and 2^0.25
    assert len(refs[2][1]) < 9  # ... and not hit at other steps
    assert refs[1][0][0][2] == 0.0 and 1 not in refs[1][1]  # coordinate 1: eps floor, unclamped


def test_step_zero_only_records_the_second_moment():
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    opt = ADOPT([x], lr=0.5, weight_decay=0.5)  # decay must not apply at step 0 either
    x.grad = torch.tensor([2.0, -3.0, 0.5], dtype=torch.float64)
    opt.step()
    assert torch.equal(x, torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    assert torch.equal(opt.state[x]["exp_avg"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(opt.state[x]["exp_avg_sq"], torch.tensor([4.0, 9.0, 0.25], dtype=torch.float64))
    assert int(opt.state[x]["step"].item()) == 1


def test_first_update_uses_the_previous_v_and_bound_1():
    """t = 1 by hand: v = 4 from step 0, g = 1 -> n = 1/2; g = 100 -> n = 50, clamped to 1."""
    x = torch.tensor([0.0, 0.0], dtype=torch.float64)
    opt = ADOPT([x], lr=0.5, betas=(0.5, 0.75))
    x.grad = torch.tensor([2.0, 2.0], dtype=torch.float64)
    opt.step()
    x.grad = torch.tensor([1.0, 100.0], dtype=torch.float64)
    opt.step()
    # u = 0.5 * 0 + 0.5 * n = (0.25, 0.5);  x = -0.5 u = (-0.125, -0.25)
    # v = 0.75 * 4 + 0.25 * g^2 = (3.25, 2503)
    assert x.tolist() == [-0.125, -0.25]
    assert opt.state[x]["exp_avg"].tolist() == [0.25, 0.5]
    assert opt.state[x]["exp_avg_sq"].tolist() == [3.25, 2503.0]


def test_weight_decay_is_decoupled():
    """Zero gradients: u stays 0 and x only decays, x_t = x_0 (1 - lr wd)^(t - 1) after t calls.
    Coupled L2 (g + wd x) would instead feed wd x / eps through the clamp and move x by ~lr."""
    x = torch.tensor([1.0, -4.0], dtype=torch.float64)
    opt = ADOPT([x], lr=0.1, weight_decay=0.5)
    for _ in range(5):
        x.grad = torch.zeros(2, dtype=torch.float64)
        opt.step()
    expected = torch.tensor([1.0, -4.0], dtype=torch.float64) * (1 - 0.1 * 0.5) ** 4
    torch.testing.assert_close(x, expected, rtol=1e-14, atol=0)
    assert torch.equal(opt.state[x]["exp_avg"], torch.zeros(2, dtype=torch.float64))


def test_adopt_update_function_is_the_class_math():
    p, g = torch.tensor([1.0]), torch.tensor([3.0])
    u, v = torch.zeros(1), torch.tensor([4.0])
    adopt_update(p, g, u, v, step=16, lr=0.5, beta1=0.5, beta2=0.5, eps=1e-6, weight_decay=0.0)
    # n = 3 / 2 = 1.5 < 16^0.25 = 2 (unclamped); u = 0.75; p = 1 - 0.375; v = 2 + 4.5
    assert (p.item(), u.item(), v.item()) == (0.625, 0.75, 6.5)


def test_params_without_grad_are_skipped_and_groups_keep_their_lr():
    a = torch.tensor([1.0])
    b = torch.tensor([1.0])
    c = torch.tensor([1.0])
    opt = ADOPT([{"params": [a], "lr": 0.5}, {"params": [b, c], "lr": 0.25}], betas=(0.0, 0.5))
    for _ in range(2):
        a.grad = torch.tensor([1.0])
        b.grad = torch.tensor([1.0])  # c.grad stays None
        opt.step()
    # t = 1: n = 1 / 1 = 1, u = n (beta1 = 0), x -= lr
    assert (a.item(), b.item(), c.item()) == (0.5, 0.75, 1.0)
    assert c not in opt.state


def test_closure_is_called_and_its_loss_returned():
    x = torch.tensor([1.0], requires_grad=True)
    opt = ADOPT([x])

    def closure():
        opt.zero_grad()
        loss = (x * x).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 1.0
    assert opt.state[x]["exp_avg_sq"].item() == 4.0  # g = 2x = 2


def test_defaults_follow_the_papers():
    opt = ADOPT([torch.zeros(1)])
    assert opt.defaults["betas"] == (0.9, 0.9999)
    assert opt.defaults["eps"] == 1e-6
    cfg = InnerConfig("adopt")
    assert (cfg.beta2, cfg.eps) == (0.9999, 1e-6)
    built = cfg.build([torch.zeros(1)])
    assert isinstance(built, ADOPT) and built.defaults["betas"] == (0.9, 0.9999)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1e-3), "lr must be >= 0"),
    (dict(betas=(1.0, 0.9)), r"betas\[0\] must be in \[0, 1\)"),
    (dict(betas=(-0.1, 0.9)), r"betas\[0\]"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\)"),
    (dict(betas=(0.9, 1.5)), r"betas\[1\]"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=-1e-8), "eps must be > 0"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ADOPT([torch.zeros(1)], **kwargs)
