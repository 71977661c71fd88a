"""Degenerate settings that reduce to known methods (papers.md section 1, "Reductions").

| setting                                   | becomes                                   | check     |
|-------------------------------------------|-------------------------------------------|-----------|
| K_x = K_u = K_v = K                       | local-adam(K)                             | bitwise   |
| M = 1, or the same data on every worker   | the plain single-worker inner optimizer   | bitwise   |
| SGD momentum, K_x = K_u = 1               | DDP-SGDM (mean gradient, one step)        | 1e-12     |
| Adam, every K = 1                         | *not* DDP-Adam: E[g^2] != E[g]^2          | differs   |
| K_u = K_v = None (never)                  | keep-states                               | bitwise   |
"""

from __future__ import annotations

import pytest
import torch

from desloc.algorithms import DesLoc, MethodConfig, build_method
from desloc.comm import SimulatedComm
from desloc.optim import InnerConfig

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

N = 6
HP = {
    "adamw": dict(lr=0.03, beta1=0.9, beta2=0.99, weight_decay=0.1),
    "sgdm": dict(lr=0.03, momentum=0.9, weight_decay=0.05),
    "adopt": dict(lr=0.03, beta1=0.9, beta2=0.999, weight_decay=0.1),
}
# Periods that make every method sync something within the run (T = 12).
CFG = {
    "ddp": dict(),
    "local-adam": dict(period_x=3),
    "desloc": dict(period_x=2, period_u=3, period_v=4),
    "keep-states": dict(period_x=2),
    "reset-states": dict(period_x=3),
}


def make_problem(workers: int, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)  # drawn in float64, then cast: same data
    A = torch.eye(N, dtype=torch.float64) + 0.3 * torch.randn(workers, N, N, **f64)  # [M, N, N]
    b = torch.randn(workers, N, **f64)  # [M, N]
    x0 = torch.randn(N, **f64)  # [N]
    return A.to(dtype), b.to(dtype), x0.to(dtype)


def grad_fn(A, b):
    """g(m, x, t) = A_m^T (A_m x - b_m) + deterministic noise(m, t)."""

    def g(m, x, t):
        noise = 0.3 * torch.sin(torch.arange(N, dtype=x.dtype) + 1.7 * m + 0.8 * t)
        return A[m].T @ (A[m] @ x - b[m]) + noise

    return g


def run_method(method_or_opt, inner, workers, g, x0, steps, dtype=torch.float32, **cfg):
    """Run a method on the simulator; return (X [M, N], optimizer). ``g(m, x, t)`` per worker."""
    X = x0.to(dtype).repeat(workers, 1)  # [M, N]
    icfg = InnerConfig(inner, **HP[inner])
    comm = SimulatedComm(workers)
    if callable(method_or_opt):  # a custom constructor: (inner_opt, comm) -> optimizer
        opt = method_or_opt(icfg.build([X]), comm)
    else:
        opt = build_method(MethodConfig(method_or_opt, **cfg), icfg.build([X]), comm, icfg.state_roles())
    for t in range(steps):
        X.grad = torch.stack([g(m, X[m], t) for m in range(workers)])
        opt.step()
    return X, opt


def run_plain(inner, g, x0, steps, dtype=torch.float32):
    """The plain single-worker inner optimizer on worker 0's data, parameter shape [N]."""
    x = x0.to(dtype).clone()
    opt = InnerConfig(inner, **HP[inner]).build([x])
    for t in range(steps):
        x.grad = g(0, x, t)
        opt.step()
    return x, opt


# ------------------------------------------------------------------------------------------ (a)
@pytest.mark.parametrize("inner", sorted(HP))
def test_equal_periods_desloc_is_local_adam_bitwise(inner):
    A, b, x0 = make_problem(3, torch.float32)
    g = grad_fn(A, b)
    X_d, opt_d = run_method("desloc", inner, 3, g, x0, 12, period_x=3, period_u=3, period_v=3)
    X_l, opt_l = run_method("local-adam", inner, 3, g, x0, 12, period_x=3)
    assert torch.equal(X_d, X_l)
    for name, value in opt_d.inner.state[X_d].items():
        assert torch.equal(value, opt_l.inner.state[X_l][name]), name
    assert opt_d.comm.ledger.state_dict() == opt_l.comm.ledger.state_dict()
    # and it is a real reduction: the default desloc periods give something else
    X_other, _ = run_method("desloc", inner, 3, g, x0, 12, period_x=3)  # K_u = 9, K_v = 18
    assert not torch.equal(X_other, X_l)


# ------------------------------------------------------------------------------------------ (b)
def _assert_rows_equal_plain(X, opt, x, plain, inner):
    for m in range(X.shape[0]):
        assert torch.equal(X[m], x), m
        for name, value in opt.inner.state[X].items():
            ref = plain.state[x][name]
            assert torch.equal(value[m] if value.shape == X.shape else value, ref), (inner, name, m)


# reset-states is not plain OPT even at M = 1 (it zeroes the states): see the test after next.
@pytest.mark.parametrize("inner", sorted(HP))
@pytest.mark.parametrize("method", ["ddp", "local-adam", "desloc", "keep-states"])
def test_one_worker_is_plain_inner_optimizer_bitwise(method, inner):
    A, b, x0 = make_problem(1, torch.float32)
    g = grad_fn(A, b)
    X, opt = run_method(method, inner, 1, g, x0, 12, **CFG[method])
    x, plain = run_plain(inner, g, x0, 12)
    _assert_rows_equal_plain(X, opt, x, plain, inner)
    assert opt.comm.ledger.total_bytes > 0  # the syncs did run (averaging one worker is exact)


# M = 2 and 4 only: (a + a) / 2 and (((a + a) + a) + a) / 4 are exact in binary floating point;
# for M = 3, fl(fl(3a) / 3) can differ from a in the last bit, so "identical data" is exact
# only for power-of-two M.
@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("inner", sorted(HP))
@pytest.mark.parametrize("method", ["ddp", "local-adam", "desloc", "keep-states"])
def test_identical_data_on_every_worker_is_plain_inner_optimizer_bitwise(method, inner, workers):
    A, b, x0 = make_problem(1, torch.float32)
    g_one = grad_fn(A, b)
    g_same = lambda m, x, t: g_one(0, x, t)  # every worker sees worker 0's data
    X, opt = run_method(method, inner, workers, g_same, x0, 12, **CFG[method])
    x, plain = run_plain(inner, g_one, x0, 12)
    _assert_rows_equal_plain(X, opt, x, plain, inner)


@pytest.mark.parametrize("inner", sorted(HP))
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_reset_states_with_identical_workers_is_plain_optimizer_with_resets(workers, inner):
    """Reset-states is not plain OPT even for M = 1 (it zeroes states); it is plain OPT whose
    states are zeroed every K_x steps, step counter kept."""
    A, b, x0 = make_problem(1, torch.float32)
    g_one = grad_fn(A, b)
    X, opt = run_method("reset-states", inner, workers, lambda m, x, t: g_one(0, x, t), x0, 12, period_x=3)
    x = x0.clone()
    plain = InnerConfig(inner, **HP[inner]).build([x])
    for t in range(12):
        x.grad = g_one(0, x, t)
        plain.step()
        if (t + 1) % 3 == 0:
            for value in plain.state[x].values():
                if value.shape == x.shape:  # exp_avg, exp_avg_sq, momentum_buffer; not step
                    value.zero_()
    _assert_rows_equal_plain(X, opt, x, plain, inner)


# ------------------------------------------------------------------------------------------ (c)
def test_sgdm_with_kx_ku_1_is_ddp_sgdm():
    """Why not bitwise: DES-LOC computes mean_m(mu buf + g_m) and mean_m(x - lr buf_m) after the
    local steps, DDP computes mu buf + mean_m(g_m) and x - lr buf. Equal in exact arithmetic (the
    SGDM step is affine in (g, buf) and x, buf are identical across workers before each step),
    but the additions happen in a different order, so the last bit can differ. float64 with
    rtol 1e-12 over 30 steps leaves no room for a real difference."""
    M = 3
    A, b, x0 = make_problem(M, torch.float64)
    g = grad_fn(A, b)
    X_ddp, opt_ddp = run_method("ddp", "sgdm", M, g, x0, 30, dtype=torch.float64)
    X_dl, opt_dl = run_method("desloc", "sgdm", M, g, x0, 30, dtype=torch.float64,
                              period_x=1, period_u=1, period_v=1)
    buf_ddp = opt_ddp.inner.state[X_ddp]["momentum_buffer"]
    buf_dl = opt_dl.inner.state[X_dl]["momentum_buffer"]
    torch.testing.assert_close(X_dl, X_ddp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(buf_dl, buf_ddp, rtol=1e-12, atol=1e-14)
    assert (X_ddp - x0).abs().max() > 0.1  # it moved

    # Not syncing the momentum (keep-states, K_x = 1) happens to give the same *parameters*
    # (x is affine in the buffers and averaged every step) but each worker's buffer is its own:
    X_keep, opt_keep = run_method("keep-states", "sgdm", M, g, x0, 30, dtype=torch.float64, period_x=1)
    torch.testing.assert_close(X_keep, X_ddp, rtol=1e-12, atol=1e-14)
    buf_keep = opt_keep.inner.state[X_keep]["momentum_buffer"]
    assert (buf_keep - buf_ddp).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ (d)
def test_adam_with_all_periods_1_is_not_ddp_adam():
    """Averaging the second moment averages g^2 over workers; DDP-Adam squares the averaged
    gradient. E_m[g^2] = E_m[g]^2 + Var_m[g], so with heterogeneous worker gradients the
    per-worker v is larger, Adam's steps are smaller, and the trajectories separate."""
    M = 3
    A, b, x0 = make_problem(M, torch.float64)
    g = grad_fn(A, b)
    one = dict(period_x=1, period_u=1, period_v=1)
    b2 = HP["adamw"]["beta2"]

    # One step: v is exactly (1 - beta2) E[g^2] vs (1 - beta2) E[g]^2.
    X_d, opt_d = run_method("desloc", "adamw", M, g, x0, 1, dtype=torch.float64, **one)
    X_p, opt_p = run_method("ddp", "adamw", M, g, x0, 1, dtype=torch.float64)
    G = torch.stack([g(m, x0, 0) for m in range(M)])  # [M, N] the first gradients
    v_d = opt_d.inner.state[X_d]["exp_avg_sq"]
    v_p = opt_p.inner.state[X_p]["exp_avg_sq"]
    torch.testing.assert_close(v_d, ((1 - b2) * (G * G).mean(0)).expand(M, N), rtol=1e-12, atol=0)
    torch.testing.assert_close(v_p, ((1 - b2) * G.mean(0) ** 2).expand(M, N), rtol=1e-12, atol=0)
    assert ((v_d - v_p) / v_p).abs().max() > 0.1
    # the first moment is linear in g, so it does agree
    torch.testing.assert_close(opt_d.inner.state[X_d]["exp_avg"], opt_p.inner.state[X_p]["exp_avg"],
                               rtol=1e-12, atol=1e-15)

    # Twenty steps: a measurable difference in the parameters.
    X_d, _ = run_method("desloc", "adamw", M, g, x0, 20, dtype=torch.float64, **one)
    X_p, _ = run_method("ddp", "adamw", M, g, x0, 20, dtype=torch.float64)
    assert torch.equal(X_d[0], X_d[1]) and torch.equal(X_p[0], X_p[1])  # both in lockstep
    rel = (X_d[0] - X_p[0]).norm() / (X_p[0] - x0).norm()
    assert rel > 1e-2, rel


# ------------------------------------------------------------------------------------------ (e)
@pytest.mark.parametrize("inner", ["adamw", "adopt"])
def test_never_synced_states_is_keep_states_bitwise(inner):
    A, b, x0 = make_problem(3, torch.float32)
    g = grad_fn(A, b)
    never = lambda opt, comm: DesLoc(opt, comm, 2, {"exp_avg": None, "exp_avg_sq": None})
    X_n, opt_n = run_method(never, inner, 3, g, x0, 12)
    X_k, opt_k = run_method("keep-states", inner, 3, g, x0, 12, period_x=2)
    assert torch.equal(X_n, X_k)
    for name, value in opt_n.inner.state[X_n].items():
        assert torch.equal(value, opt_k.inner.state[X_k][name]), name
    assert set(opt_k.comm.ledger.bytes_by_tag) == {"params"}
    assert opt_n.comm.ledger.state_dict() == opt_k.comm.ledger.state_dict()
    # states did drift apart across workers (they were never averaged)
    u = opt_k.inner.state[X_k]["exp_avg"]
    assert not torch.equal(u[0], u[1])


def test_method_config_none_periods_mean_paper_defaults_for_desloc():
    """MethodConfig("desloc") fills K_u = 3 K_x, K_v = 6 K_x when they are None; "never" is
    spelled keep-states (or DesLoc(..., state_periods={...: None}) directly)."""
    cfg = MethodConfig("desloc", period_x=4)
    assert (cfg.period_u, cfg.period_v) == (12, 24)
