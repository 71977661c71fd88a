"""GASLoC: gossip with a local outer step; reductions, mixing, slow workers, naive reference."""

import pytest
import torch

from desloc import ConfigError, InnerConfig, MethodConfig, SimulatedComm, build_method
from desloc.topology import TOPOLOGIES, matrix, mixing, spectral_gap

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

M, N = 4, 6


def grads(steps, m=M, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, N, generator=g, dtype=torch.float64) for _ in range(steps)]


def run(cfg, steps=12, m=M, inner="adamw", gs=None, lr=0.05):
    x = torch.linspace(-1, 1, N, dtype=torch.float64).repeat(m, 1)
    ic = InnerConfig(inner, lr=lr, momentum=0.0 if inner == "sgdm" else 0.9)
    opt = build_method(cfg, ic.build([x]), SimulatedComm(m), ic.state_roles())
    for g in (gs or grads(steps, m))[:steps]:
        x.grad = g.clone()
        opt.step()
    return x, opt


@pytest.mark.parametrize("kind", TOPOLOGIES)
@pytest.mark.parametrize("m", [2, 3, 4, 5, 8])
def test_every_mixing_matrix_is_doubly_stochastic_and_symmetric(kind, m):
    for r in range(6):
        w = matrix(mixing(kind, m, r, seed=7))
        ones = torch.ones(m, dtype=torch.float64)
        torch.testing.assert_close(w.sum(0), ones)
        torch.testing.assert_close(w.sum(1), ones)
        assert (w >= 0).all() and torch.equal(w, w.T)


def test_random_topologies_vary_by_round_and_agree_across_workers():
    rounds = [matrix(mixing("one-peer", 8, r, seed=1)) for r in range(5)]
    assert any(not torch.equal(rounds[0], w) for w in rounds[1:])  # time-varying
    assert torch.equal(matrix(mixing("one-peer", 8, 3, seed=1)), rounds[3])  # deterministic
    one = matrix(mixing("one-peer", 8, 0))
    assert ((one > 0).sum(1) == 2).all()  # exactly one peer each
    two = matrix(mixing("two-peer", 8, 0))
    assert ((two > 0).sum(1) == 3).all()  # exactly two peers each
    assert spectral_gap(matrix(mixing("complete", 8, 0))) == pytest.approx(1.0)


def test_one_pairwise_exchange_averages_the_pair_exactly():
    comm = SimulatedComm(2)
    x = torch.randn(2, 9, dtype=torch.float32)
    before = x.clone()
    comm.mix([x], ["params"], mixing("one-peer", 2, 0))
    expected = (before[0] + before[1]) / 2
    assert torch.equal(x[0], expected) and torch.equal(x[1], expected)
    assert comm.ledger.bytes_by_link == {"1->0": 36, "0->1": 36}
    assert comm.ledger.bytes_by_tag["params"] == 36  # per worker


def test_complete_graph_is_diloco():
    """The outer step is linear, so complete-graph gossip equals DiLoCo (to float rounding)."""
    gs = grads(12)
    x_g, _ = run(MethodConfig("gasloc", period_x=3, topology="complete"), gs=gs)
    x_d, _ = run(MethodConfig("diloco", period_x=3), gs=gs)
    torch.testing.assert_close(x_g, x_d, rtol=1e-12, atol=1e-13)


def test_no_peers_is_independent_local_training():
    gs = grads(12)
    x, opt = run(MethodConfig("gasloc", period_x=3, topology="none"), gs=gs)
    assert opt.comm.ledger.total_bytes == 0
    for w in range(M):  # each worker alone == a one-worker run on its own gradients
        alone, _ = run(MethodConfig("gasloc", period_x=3, topology="none"), m=1, gs=[g[w:w + 1] for g in gs])
        assert torch.equal(x[w], alone[0])
    # ... and with an identity outer step (lr 1, momentum 0) it is plain local Adam
    x_id, _ = run(MethodConfig("gasloc", period_x=3, topology="none", outer="sgd", outer_lr=1.0,
                               outer_momentum=0.0), gs=gs)
    x0 = torch.linspace(-1, 1, N, dtype=torch.float64).repeat(M, 1)
    local = torch.optim.AdamW([x0], lr=0.05, weight_decay=0.0)
    for g in gs:
        x0.grad = g.clone()
        local.step()
    torch.testing.assert_close(x_id, x0, rtol=1e-12, atol=1e-13)


def naive_gasloc(gs, topology, H, lr, eta, mu, steps, local_steps=None, seed=0):
    """Python lists, inner SGD (no momentum), Nesterov outer step per worker, explicit gossip."""
    xs = [torch.linspace(-1, 1, N, dtype=torch.float64) for _ in range(M)]
    xbar = [x.clone() for x in xs]
    bufs = [None] * M
    hs = local_steps or [H] * M
    for t in range(steps):
        for i in range(M):
            if t % H < hs[i]:
                xs[i] = xs[i] - lr * gs[t][i]
        if (t + 1) % H == 0:
            for i in range(M):
                delta = xbar[i] - xs[i]
                bufs[i] = delta.clone() if bufs[i] is None else mu * bufs[i] + delta
                xbar[i] = xbar[i] - eta * (delta + mu * bufs[i])
            w = matrix(mixing(topology, M, (t + 1) // H - 1, seed))
            xbar = [sum(w[i, j] * xbar[j] for j in range(M)) for i in range(M)]
            xs = [b.clone() for b in xbar]
    return torch.stack(xs)


@pytest.mark.parametrize("topology", ["one-peer", "two-peer", "ring"])
@pytest.mark.parametrize("local_steps", [None, [3, 3, 1, 2]])
def test_matches_naive_reference(topology, local_steps):
    gs = grads(15, seed=4)
    cfg = MethodConfig("gasloc", period_x=3, topology=topology, local_steps=local_steps, gossip_seed=2,
                       outer_lr=0.7, outer_momentum=0.9)
    x, _ = run(cfg, steps=15, inner="sgdm", gs=gs, lr=0.1)
    ref = naive_gasloc(gs, topology, 3, 0.1, 0.7, 0.9, 15, local_steps, seed=2)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-12)


def test_slow_worker_is_idle_after_its_local_steps():
    gs = grads(2)
    cfg = MethodConfig("gasloc", period_x=4, local_steps=[4, 4, 4, 1])
    x, opt = run(cfg, steps=1, gs=gs)
    after_one = x.clone()
    state = {k: v.clone() for k, v in opt.inner.state[x].items()}
    x.grad = gs[1].clone()
    opt.step()  # position 1 of the round: worker 3 sits out
    assert torch.equal(x[3], after_one[3]) and not torch.equal(x[0], after_one[0])
    assert torch.equal(opt.inner.state[x]["exp_avg"][3], state["exp_avg"][3])


def test_bad_gasloc_config():
    with pytest.raises(ConfigError, match="unknown topology"):
        MethodConfig("gasloc", topology="star")
    with pytest.raises(ConfigError, match=r"local_steps \(H_i\)"):
        MethodConfig("gasloc", period_x=4, local_steps=[4, 5])
    with pytest.raises(ConfigError, match="needs 4 integers"):
        run(MethodConfig("gasloc", period_x=3, local_steps=[3, 3]))


def test_summary_reports_bytes_per_link_and_worker():
    _, opt = run(MethodConfig("gasloc", period_x=3, topology="two-peer"), steps=6)
    summary = opt.comm_summary()
    per_link = N * 8  # float64, one tensor per round
    assert set(summary["bytes_by_worker"]) == set(range(M))
    assert all(b == 2 * 2 * per_link for b in summary["bytes_by_worker"].values())  # 2 rounds x 2 peers
    assert sum(summary["bytes_by_link"].values()) == M * summary["bytes_sent"]


def test_state_names_are_required_and_checked():
    """GASLoC keeps an idle worker's inner states by name (a 0-dim parameter's moments cannot be
    told from a scalar counter by shape): the names are required and checked at the first step."""
    from desloc.algorithms import GasLoc

    def make(**kw):
        x = torch.zeros(M, N, dtype=torch.float64)
        opt = GasLoc(torch.optim.AdamW([x], lr=0.1), SimulatedComm(M), 3, **kw)
        x.grad = torch.ones_like(x)
        return opt

    with pytest.raises(ConfigError, match="GasLoc needs state_names"):
        make()
    with pytest.raises(ConfigError, match=r"state_names names \['momentum'\]"):
        make(state_names=["exp_avg", "exp_avg_sq", "momentum"]).step()
    with pytest.raises(ConfigError, match=r"\['exp_avg_sq'\] are not declared; add them to state_names"):
        make(state_names=["exp_avg"]).step()
    make(state_names=["exp_avg", "exp_avg_sq"]).step()


def test_a_step_where_every_worker_waits_is_logged(tmp_path, token_cache, no_plots, capsys):
    """Every H_i < H: in the last steps of a round no worker computes, so the step has no training
    loss (null in metrics.jsonl). Logging and the progress line used to crash formatting it."""
    import json

    from _cli_helpers import TINY, without
    from desloc.cli import main

    out = tmp_path / "run"
    argv = ["train", *without(TINY, "--kx", "--log-every"), "--method", "gasloc", "--kx", "4", "--local-steps", "2,2",
            "--log-every", "1", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["train_loss"] is None] == [3, 4]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
