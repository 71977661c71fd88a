"""One scalar trajectory per method, traced by hand. Every number below is a short dyadic
fraction, so float64 (and float32) represent every intermediate exactly and the asserts are ==.

Common setup: M = 2 workers, one scalar parameter x (stored as [2, 1]), x = 0 on both workers.
Constant gradients: worker 0 always sees g0 = 1, worker 1 always sees g1 = 3.
Inner optimizer: torch SGD, lr = 0.5, momentum mu = 0.5, no weight decay:

    buf <- mu buf + g        (torch stores buf = g on the first step: the same with buf = 0)
    x   <- x - lr buf

Syncs happen after the local step of step t (1-based) when t % K == 0.
Rows: t | buf0 buf1 | x0 x1 (after the step and after any sync), "->" marks a sync.
"""

from __future__ import annotations

import pytest
import torch

from desloc.algorithms import MethodConfig, build_method
from desloc.comm import SimulatedComm
from desloc.optim import InnerConfig

G = torch.tensor([[1.0], [3.0]], dtype=torch.float64)  # [M=2, 1] constant per-worker gradients


def trace(method, **periods):
    x = torch.zeros(2, 1, dtype=torch.float64)
    icfg = InnerConfig("sgdm", lr=0.5, momentum=0.5)
    opt = build_method(MethodConfig(method, **periods), icfg.build([x]), SimulatedComm(2), icfg.state_roles())
    rows = []
    for _ in range(6):
        x.grad = G.clone()
        opt.step()
        buf = opt.inner.state[x]["momentum_buffer"]
        rows.append((buf[0, 0].item(), buf[1, 0].item(), x[0, 0].item(), x[1, 0].item()))
    return rows, opt


def check(rows, expected):
    for t, (got, want) in enumerate(zip(rows, expected), start=1):
        assert got == want, f"step {t}: (buf0, buf1, x0, x1) = {got}, traced by hand {want}"


def test_ddp():
    # The gradient is averaged first: g = (1 + 3) / 2 = 2 on both workers, every step.
    # t | buf       | x
    # 1 | 2         | 0 - 0.5*2 = -1
    # 2 | 1 + 2 = 3 | -1 - 1.5 = -2.5
    # 3 | 1.5 + 2 = 3.5   | -2.5 - 1.75 = -4.25
    # 4 | 1.75 + 2 = 3.75 | -4.25 - 1.875 = -6.125
    # 5 | 3.875           | -6.125 - 1.9375 = -8.0625
    # 6 | 3.9375          | -8.0625 - 1.96875 = -10.03125
    rows, opt = trace("ddp")
    check(rows, [
        (2.0, 2.0, -1.0, -1.0),
        (3.0, 3.0, -2.5, -2.5),
        (3.5, 3.5, -4.25, -4.25),
        (3.75, 3.75, -6.125, -6.125),
        (3.875, 3.875, -8.0625, -8.0625),
        (3.9375, 3.9375, -10.03125, -10.03125),
    ])
    assert opt.comm.ledger.bytes_by_tag == {"grads": 6 * 8}  # one float64 gradient per step


def test_keep_states():
    # K_x = 2, momentum never synced: buf0 = 1, 1.5, 1.75, ...; buf1 = 3, 4.5, 5.25, ...
    # t | buf0     buf1    | x0                          x1
    # 1 | 1        3       | -0.5                        -1.5
    # 2 | 1.5      4.5     | -0.5-0.75 = -1.25           -1.5-2.25 = -3.75     -> x = -2.5
    # 3 | 1.75     5.25    | -2.5-0.875 = -3.375         -2.5-2.625 = -5.125
    # 4 | 1.875    5.625   | -3.375-0.9375 = -4.3125     -5.125-2.8125 = -7.9375 -> x = -6.125
    # 5 | 1.9375   5.8125  | -6.125-0.96875 = -7.09375   -6.125-2.90625 = -9.03125
    # 6 | 1.96875  5.90625 | -7.09375-0.984375 = -8.078125  -9.03125-2.953125 = -11.984375
    #                                                                           -> x = -10.03125
    rows, opt = trace("keep-states", period_x=2)
    check(rows, [
        (1.0, 3.0, -0.5, -1.5),
        (1.5, 4.5, -2.5, -2.5),
        (1.75, 5.25, -3.375, -5.125),
        (1.875, 5.625, -6.125, -6.125),
        (1.9375, 5.8125, -7.09375, -9.03125),
        (1.96875, 5.90625, -10.03125, -10.03125),
    ])
    assert opt.comm.ledger.bytes_by_tag == {"params": 3 * 8}


def test_local_adam():
    # K = 3: parameters and momentum averaged after steps 3 and 6.
    # t | buf0                 buf1                  | x0                        x1
    # 1 | 1                    3                     | -0.5                      -1.5
    # 2 | 1.5                  4.5                   | -1.25                     -3.75
    # 3 | 1.75                 5.25  -> buf = 3.5    | -1.25-0.875 = -2.125      -3.75-2.625 = -6.375
    #                                                                           -> x = -4.25
    # 4 | 1.75+1 = 2.75        1.75+3 = 4.75         | -4.25-1.375 = -5.625      -4.25-2.375 = -6.625
    # 5 | 1.375+1 = 2.375      2.375+3 = 5.375       | -5.625-1.1875 = -6.8125   -6.625-2.6875 = -9.3125
    # 6 | 1.1875+1 = 2.1875    2.6875+3 = 5.6875     | -6.8125-1.09375 = -7.90625  -9.3125-2.84375 = -12.15625
    #     -> buf = 7.875/2 = 3.9375                                  -> x = -20.0625/2 = -10.03125
    rows, opt = trace("local-adam", period_x=3)
    check(rows, [
        (1.0, 3.0, -0.5, -1.5),
        (1.5, 4.5, -1.25, -3.75),
        (3.5, 3.5, -4.25, -4.25),
        (2.75, 4.75, -5.625, -6.625),
        (2.375, 5.375, -6.8125, -9.3125),
        (3.9375, 3.9375, -10.03125, -10.03125),
    ])
    assert opt.comm.ledger.bytes_by_tag == {"params": 2 * 8, "momentum_buffer": 2 * 8}


def test_desloc():
    # K_x = 2, K_u = 3 (momentum), so the two syncs interleave: x after 2, 4, 6; buf after 3, 6.
    # t | buf0                 buf1                  | x0                        x1
    # 1 | 1                    3                     | -0.5                      -1.5
    # 2 | 1.5                  4.5                   | -1.25                     -3.75   -> x = -2.5
    # 3 | 1.75                 5.25  -> buf = 3.5    | -2.5-0.875 = -3.375       -2.5-2.625 = -5.125
    # 4 | 1.75+1 = 2.75        1.75+3 = 4.75         | -3.375-1.375 = -4.75      -5.125-2.375 = -7.5
    #                                                                           -> x = -6.125
    # 5 | 1.375+1 = 2.375      2.375+3 = 5.375       | -6.125-1.1875 = -7.3125   -6.125-2.6875 = -8.8125
    # 6 | 1.1875+1 = 2.1875    2.6875+3 = 5.6875     | -7.3125-1.09375 = -8.40625  -8.8125-2.84375 = -11.65625
    #     -> buf = 3.9375                                            -> x = -20.0625/2 = -10.03125
    rows, opt = trace("desloc", period_x=2, period_u=3)
    check(rows, [
        (1.0, 3.0, -0.5, -1.5),
        (1.5, 4.5, -2.5, -2.5),
        (3.5, 3.5, -3.375, -5.125),
        (2.75, 4.75, -6.125, -6.125),
        (2.375, 5.375, -7.3125, -8.8125),
        (3.9375, 3.9375, -10.03125, -10.03125),
    ])
    assert opt.comm.ledger.bytes_by_tag == {"params": 3 * 8, "momentum_buffer": 2 * 8}


def test_reset_states():
    # K_x = 2; at each parameter sync the momentum is zeroed, so it restarts from g:
    # t | buf0   buf1           | x0                  x1
    # 1 | 1      3              | -0.5                -1.5
    # 2 | 1.5    4.5  -> 0, 0   | -1.25               -3.75           -> x = -2.5
    # 3 | 1      3              | -2.5-0.5 = -3       -2.5-1.5 = -4
    # 4 | 1.5    4.5  -> 0, 0   | -3-0.75 = -3.75     -4-2.25 = -6.25  -> x = -5
    # 5 | 1      3              | -5.5                -6.5
    # 6 | 1.5    4.5  -> 0, 0   | -6.25               -8.75            -> x = -7.5
    rows, opt = trace("reset-states", period_x=2)
    check(rows, [
        (1.0, 3.0, -0.5, -1.5),
        (0.0, 0.0, -2.5, -2.5),
        (1.0, 3.0, -3.0, -4.0),
        (0.0, 0.0, -5.0, -5.0),
        (1.0, 3.0, -5.5, -6.5),
        (0.0, 0.0, -7.5, -7.5),
    ])
    assert opt.comm.ledger.bytes_by_tag == {"params": 3 * 8}  # zeroing costs no communication


@pytest.mark.parametrize("method,periods", [("local-adam", dict(period_x=3)),
                                            ("desloc", dict(period_x=2, period_u=3))])
def test_trace_is_float32_exact_too(method, periods):
    """The same dyadic numbers in float32: the traces do not rely on float64 headroom."""
    rows64, _ = trace(method, **periods)
    x = torch.zeros(2, 1)
    icfg = InnerConfig("sgdm", lr=0.5, momentum=0.5)
    opt = build_method(MethodConfig(method, **periods), icfg.build([x]), SimulatedComm(2), icfg.state_roles())
    for t in range(6):
        x.grad = G.float()
        opt.step()
        assert x[:, 0].tolist() == [rows64[t][2], rows64[t][3]]
