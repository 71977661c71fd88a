"""Every method against a naive float64 reference written from papers.md sections 1-3.

The reference keeps a Python list of M parameter vectors and a list of M state dicts, applies
hand-written AdamW / SGD-momentum / ADOPT update math (no ``torch.optim``) to each worker in
turn, and averages with ``sum(list) / M`` on the schedule of papers.md section 1::

    for t = 0 .. T-1:
        every worker: g = clip(grad f_m(x^m) + noise(m, t), rho); local OPT step
        if (t+1) % K_x == 0:  x^m <- mean_m x^m
        for each state j:  if (t+1) % K_j == 0:  s^{j,m} <- mean_m s^{j,m}
        reset-states only: if (t+1) % K_x == 0: every state tensor <- 0 (step counter kept)
    DDP: g = clip(mean_m g^m, rho) every step, then the same OPT step on every worker.

Workers see f_m(x) = 0.5 ||A_m x - b_m||^2 plus a deterministic per-(worker, step) noise, so
their gradients differ and every sync changes the trajectory. The library runs the same problem
in float64 in the simulator; both paths must agree to rtol 1e-10 after every step.
"""

from __future__ import annotations

import math

import pytest
import torch

from desloc.algorithms import MethodConfig, build_method
from desloc.comm import SimulatedComm
from desloc.optim import InnerConfig

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

M, N, T = 3, 5, 25
DT = torch.float64
RTOL, ATOL = 1e-10, 1e-12


# ------------------------------------------------------------------------------- the problem
def _problem():
    gen = torch.Generator().manual_seed(1234)
    A = torch.eye(N, dtype=DT) + 0.3 * torch.randn(M, N, N, generator=gen, dtype=DT)  # [M, N, N]
    b = torch.randn(M, N, generator=gen, dtype=DT)  # [M, N]
    x0 = torch.randn(N, generator=gen, dtype=DT)  # [N], the same start on every worker
    return A, b, x0


A_M, B_M, X0 = _problem()


def grad(m: int, x: torch.Tensor, t: int) -> torch.Tensor:
    """Analytic gradient of f_m at x plus deterministic noise for (worker m, step t)."""
    noise = 0.5 * torch.sin(torch.arange(N, dtype=DT) * 0.7 + 1.3 * (m + 1) + 0.9 * t)
    return A_M[m].T @ (A_M[m] @ x - B_M[m]) + noise


# -------------------------------------------------------------- hand-written inner optimizers
HP = {
    "adamw": dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1),
    "sgdm": dict(lr=0.05, momentum=0.9, weight_decay=0.05),
    "adopt": dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1),
}
STATES = {"adamw": ("exp_avg", "exp_avg_sq"), "sgdm": ("momentum_buffer",), "adopt": ("exp_avg", "exp_avg_sq")}


def adamw_step(x, g, s, hp):
    """AdamW, bias-corrected, decoupled decay; ``s['step']`` counts calls including this one."""
    s["step"] += 1
    t = s["step"]
    x = x * (1 - hp["lr"] * hp["weight_decay"])
    s["exp_avg"] = hp["beta1"] * s["exp_avg"] + (1 - hp["beta1"]) * g
    s["exp_avg_sq"] = hp["beta2"] * s["exp_avg_sq"] + (1 - hp["beta2"]) * g * g
    u_hat = s["exp_avg"] / (1 - hp["beta1"] ** t)
    v_hat = s["exp_avg_sq"] / (1 - hp["beta2"] ** t)
    return x - hp["lr"] * u_hat / (v_hat.sqrt() + hp["eps"])


def sgdm_step(x, g, s, hp):
    """Heavy ball with coupled L2 decay: buf <- mu buf + (g + wd x); x <- x - lr buf."""
    g = g + hp["weight_decay"] * x
    s["momentum_buffer"] = hp["momentum"] * s["momentum_buffer"] + g
    return x - hp["lr"] * s["momentum_buffer"]


def adopt_step(x, g, s, hp):
    """ADOPT, papers.md section 3; ``s['step']`` counts earlier calls."""
    k = s["step"]
    s["step"] += 1
    if k == 0:
        s["exp_avg_sq"] = g * g
        return x
    n = g / s["exp_avg_sq"].sqrt().clamp(min=hp["eps"])
    n = n.clamp(-(k**0.25), k**0.25)
    s["exp_avg"] = hp["beta1"] * s["exp_avg"] + (1 - hp["beta1"]) * n
    x = x * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] * s["exp_avg"]
    s["exp_avg_sq"] = hp["beta2"] * s["exp_avg_sq"] + (1 - hp["beta2"]) * g * g
    return x


STEP_FN = {"adamw": adamw_step, "sgdm": sgdm_step, "adopt": adopt_step}


def mean(tensors):
    return sum(tensors) / len(tensors)


def run_reference(inner, method, period_x, periods, clip_rho, steps=T, offset=1):
    """Yield (xs, states, n_clipped) after every step. ``periods`` maps state name -> K or None.

    ``offset`` = 1 is the papers' schedule ``(t+1) % K == 0``; other values exist only to show
    the comparison can tell schedules apart.
    """
    hp = HP[inner]
    xs = [X0.clone() for _ in range(M)]
    states = [{"step": 0, **{name: torch.zeros(N, dtype=DT) for name in STATES[inner]}} for _ in range(M)]
    n_clipped = 0
    for t in range(steps):
        gs = [grad(m, xs[m], t) for m in range(M)]
        if method == "ddp":
            gs = [mean(gs)] * M
        if clip_rho is not None:
            n_clipped += sum(int((g.abs() > clip_rho).sum()) for g in gs)
            gs = [g.clamp(-clip_rho, clip_rho) for g in gs]
        xs = [STEP_FN[inner](xs[m], gs[m], states[m], hp) for m in range(M)]
        if method != "ddp":
            if (t + offset) % period_x == 0:
                xs = [mean(xs)] * M
            for name, k in periods.items():
                if k is not None and (t + offset) % k == 0:
                    avg = mean([s[name] for s in states])
                    for s in states:
                        s[name] = avg
            if method == "reset-states" and (t + offset) % period_x == 0:
                for s in states:
                    for name in STATES[inner]:
                        s[name] = torch.zeros(N, dtype=DT)
        yield xs, states, n_clipped


# ----------------------------------------------------------------------- the library's run
# method -> (K_x, K_u, K_v) given to MethodConfig; u / v map to state names by InnerConfig roles.
METHOD_PERIODS = {
    "ddp": (1, None, None),
    "local-adam": (3, 3, 3),
    "desloc": (2, 3, 5),
    "keep-states": (2, None, None),
    "reset-states": (3, None, None),
}


def reference_periods(inner, method):
    _, ku, kv = METHOD_PERIODS[method]
    if method in ("keep-states", "reset-states"):
        ku = kv = None
    roles = InnerConfig(inner).state_roles()  # e.g. {"exp_avg": "u", "exp_avg_sq": "v"}
    return {name: (ku if role == "u" else kv) for name, role in roles.items()}


def run_library(inner, method, clip_rho, steps=T):
    """Yield (X, optimizer) after every step; X is the stacked [M, N] float64 parameter."""
    kx, ku, kv = METHOD_PERIODS[method]
    X = X0.repeat(M, 1)  # [M, N]
    icfg = InnerConfig(inner, **HP[inner])
    opt = build_method(MethodConfig(method, kx, ku, kv, clip_rho=clip_rho), icfg.build([X]),
                       SimulatedComm(M), icfg.state_roles())
    for t in range(steps):
        X.grad = torch.stack([grad(m, X[m], t) for m in range(M)])  # [M, N]
        opt.step()
        yield X, opt


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("clip_rho", [None, 0.4])
@pytest.mark.parametrize("method", sorted(METHOD_PERIODS))
@pytest.mark.parametrize("inner", sorted(HP))
def test_method_matches_naive_reference(inner, method, clip_rho):
    ref = run_reference(inner, method, METHOD_PERIODS[method][0], reference_periods(inner, method), clip_rho)
    lib = run_library(inner, method, clip_rho)
    n_clipped = 0
    for t, ((xs, states, n_clipped), (X, opt)) in enumerate(zip(ref, lib)):
        for m in range(M):
            torch.testing.assert_close(X[m], xs[m], rtol=RTOL, atol=ATOL,
                                       msg=lambda s: f"x, step {t}, worker {m}: {s}")
            for name in STATES[inner]:
                got = opt.inner.state[X][name][m]
                torch.testing.assert_close(got, states[m][name], rtol=RTOL, atol=ATOL,
                                           msg=lambda s: f"{name}, step {t}, worker {m}: {s}")
    assert t == T - 1
    # Workers must not have been in lockstep (then syncs would be invisible), except under DDP.
    spread = (X - X[0]).abs().max().item()
    if method == "ddp":
        assert spread == 0.0
    elif METHOD_PERIODS[method][0] > 1 and T % METHOD_PERIODS[method][0] != 0:
        assert spread > 1e-3, spread
    if clip_rho is not None:
        assert n_clipped > 0  # clipping was active, so a missing clip would be caught


def _final(inner, method, periods, offset=1, period_x=None):
    *_, (xs, _, _) = run_reference(inner, method, period_x or METHOD_PERIODS[method][0], periods, None,
                                   offset=offset)
    return torch.stack(xs)


def test_reference_tells_schedules_apart():
    """The 1e-10 comparison has power: plausible wrong schedules move the result by >> 1e-10."""
    inner = "adamw"
    right = _final(inner, "desloc", {"exp_avg": 3, "exp_avg_sq": 5})
    *_, (X, _) = run_library(inner, "desloc", None)
    torch.testing.assert_close(X, right, rtol=RTOL, atol=ATOL)
    wrong = {
        "swapped K_u, K_v": _final(inner, "desloc", {"exp_avg": 5, "exp_avg_sq": 3}),
        "sync before the step (t % K)": _final(inner, "desloc", {"exp_avg": 3, "exp_avg_sq": 5}, offset=0),
        "states never synced": _final(inner, "desloc", {"exp_avg": None, "exp_avg_sq": None}),
        "second moment never synced": _final(inner, "desloc", {"exp_avg": 3, "exp_avg_sq": None}),
    }
    for label, x in wrong.items():
        assert (x - right).abs().max().item() > 1e-6, label


def test_reset_states_keeps_the_step_counter():
    """After a reset AdamW's bias correction continues from the global step, not from 1."""
    *_, (X, opt) = run_library("adamw", "reset-states", None, steps=4)  # reset after step 3
    assert int(opt.inner.state[X]["step"].item()) == 4
    # the reference with a restarted counter (step <- 0 at reset) disagrees, so the main test
    # above really checks the "counter kept" reading
    hp = HP["adamw"]
    xs = [X0.clone() for _ in range(M)]
    states = [{"step": 0, "exp_avg": torch.zeros(N, dtype=DT), "exp_avg_sq": torch.zeros(N, dtype=DT)}
              for _ in range(M)]
    for t in range(4):
        xs = [adamw_step(xs[m], grad(m, xs[m], t), states[m], hp) for m in range(M)]
        if (t + 1) % 3 == 0:
            xs = [mean(xs)] * M
            for s in states:
                s.update(step=0, exp_avg=torch.zeros(N, dtype=DT), exp_avg_sq=torch.zeros(N, dtype=DT))
    assert (torch.stack(xs) - X).abs().max().item() > 1e-6
    assert math.isfinite(X.abs().max().item())
