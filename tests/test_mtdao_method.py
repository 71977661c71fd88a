"""The mtdao method: MT-DAO inner optimizer under the DES-LOC engine, each momentum on its K_j."""

import pytest
import torch

from desloc import ConfigError, InnerConfig, MethodConfig, SimulatedComm, build_method

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

M, N = 3, 5


def run(cfg, ic, steps=24):
    x = torch.linspace(-1, 1, N, dtype=torch.float64).repeat(M, 1)
    opt = build_method(cfg, ic.build([x]), SimulatedComm(M), ic.state_roles())
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x.grad = torch.randn(M, N, generator=g, dtype=torch.float64)
        opt.step()
    return x, opt


def test_periods_are_honoured_and_measured():
    ic = InnerConfig("mtdao", lr=0.01, mt_betas=(0.9, 0.99, 0.999), mt_omegas=(0.3, 0.3, 0.3))
    _, opt = run(MethodConfig("mtdao", period_x=2, momentum_periods=[3, 4, None], period_v=8), ic)
    per_tensor = N * 8  # float64
    assert dict(opt.comm.ledger.bytes_by_tag) == {
        "params": 24 // 2 * per_tensor, "exp_avg_0": 24 // 3 * per_tensor,
        "exp_avg_1": 24 // 4 * per_tensor, "exp_avg_sq": 24 // 8 * per_tensor}


def test_one_momentum_full_weight_is_desloc_adopt():
    """N = 1, omega = 1: MT-DAO is ADOPT, so mtdao == desloc(adopt) with K_0 = K_u, bitwise."""
    mt = InnerConfig("mtdao", lr=0.01, mt_betas=(0.9,), mt_omegas=(1.0,))
    x_mt, _ = run(MethodConfig("mtdao", period_x=2, period_u=3, period_v=4), mt)
    x_ad, _ = run(MethodConfig("desloc", period_x=2, period_u=3, period_v=4), InnerConfig("adopt", lr=0.01))
    assert torch.equal(x_mt, x_ad)


def test_zero_omega_ignores_momenta():
    """sum(omega) = 0: the step is the normalised gradient alone, so momentum periods do not matter."""
    ic = InnerConfig("mtdao", lr=0.01, mt_omegas=(0.0, 0.0))
    a, _ = run(MethodConfig("mtdao", period_x=2, momentum_periods=[1, 1]), ic)
    b, _ = run(MethodConfig("mtdao", period_x=2, momentum_periods=[None, None]), ic)
    assert torch.equal(a, b)


def test_mtdao_needs_its_inner_optimizer():
    with pytest.raises(ConfigError, match="needs the MT-DAO inner optimizer"):
        run(MethodConfig("mtdao", period_x=2), InnerConfig("adamw"))
    with pytest.raises(ConfigError, match="momentum_periods"):
        run(MethodConfig("mtdao", period_x=2, momentum_periods=[2]), InnerConfig("mtdao"))
    with pytest.raises(ConfigError):
        InnerConfig("mtdao", mt_omegas=(0.8, 0.8))
