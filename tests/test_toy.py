"""`desloc toy`: the JSON contract, the records, and the qualitative result it documents."""

import json
import subprocess
import sys

import pytest

from desloc.toy import ToyConfig, rosenbrock, rosenbrock_grad, run_method, worker_objectives, worker_shifts


def test_rosenbrock_gradient_matches_autograd():
    import torch

    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    f = ((1 - x[:, 0]) ** 2 + 100 * (x[:, 1] - x[:, 0] ** 2) ** 2).sum()
    (g,) = torch.autograd.grad(f, x)
    assert torch.allclose(rosenbrock_grad(x.detach()), g)


def test_cli_json_contract(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "desloc", "toy", "--json", "--workers", "8", "--steps", "96",
         "--kx", "16", "--ku", "16", "--kv", "48", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    record = json.loads(proc.stdout)
    methods = record["methods"]
    assert set(methods) == {"ddp", "local-adam", "desloc", "keep-states", "reset-states"}
    for res in methods.values():
        assert isinstance(res["final_distance"], float)
        assert isinstance(res["bytes_sent"], int)
        assert isinstance(res["ratio_vs_ddp"], float)
    # 96 steps of a 2-float (8-byte... float64 -> 16-byte) model: DDP sends 96 * 16 bytes.
    assert methods["ddp"]["bytes_sent"] == 96 * 16
    assert methods["ddp"]["ratio_vs_ddp"] == 1.0
    # desloc (16, 16, 48): 6 + 6 + 2 model-sized tensors of 16 bytes.
    assert methods["desloc"]["bytes_sent"] == (6 + 6 + 2) * 16
    assert methods["local-adam"]["ratio_vs_ddp"] == pytest.approx(96 / 18)
    for name in ("config.json", "toy.json", "toy.png"):
        assert (out / name).stat().st_size > 0


def test_default_toy_reproduces_convergence_and_reset_stall():
    """The README's claim at the CLI defaults (M = 256, sigma = 1.5, lr = 0.05):
    desloc and local-adam converge near (1, 1); reset-states stalls far from it."""
    cfg = ToyConfig()
    final = {m: run_method(cfg, m)["final_distance"] for m in ("desloc", "local-adam", "reset-states")}
    assert final["desloc"] < 0.05 and final["local-adam"] < 0.05
    assert final["reset-states"] > 0.2


@pytest.mark.parametrize("spec,bytes_per_round", [
    ("diloco", 16), ("desloc+nesterov", None), ("gasloc@one-peer", 16), ("gasloc@two-peer", 32),
    ("mtdao", 4 * 16),  # params, two momenta and v, all every K_x for mtdao
])
def test_new_methods_run_in_the_toy(spec, bytes_per_round):
    cfg = ToyConfig(workers=8, steps=64, period_x=16, period_u=16, period_v=32, methods=(spec,))
    res = run_method(cfg, spec)
    assert res["final_distance"] < 10 and res["bytes_sent"] > 0
    if bytes_per_round is not None:
        assert res["bytes_sent"] == 4 * bytes_per_round  # 4 rounds of 16 steps, 2 float64 = 16 bytes


def test_toy_rejects_bad_method_spec():
    from desloc.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown method 'gossip'"):
        ToyConfig(methods=("gossip@ring",))


# ---------------------------------------------------------------- heterogeneous workers (issue 22, claim 2)
def test_heterogeneity_zero_is_the_iid_toy_bit_for_bit():
    """H = 0 runs exactly the documented i.i.d. loop, g = grad f(x) + sigma xi, step for step."""
    import torch

    from desloc.algorithms import build_method
    from desloc.comm import SimulatedComm

    cfg = ToyConfig(workers=6, steps=48, period_x=8, period_u=8, period_v=24, heterogeneity=0.0)
    for name in ("local-adam", "keep-states", "desloc"):
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.tensor(cfg.start, dtype=torch.float64).repeat(cfg.workers, 1)
        inner = cfg.inner_config(name)
        opt = build_method(cfg.method_config(name), inner.build([x]), SimulatedComm(cfg.workers), inner.state_roles())
        expected = []
        for _ in range(cfg.steps):
            x.grad = rosenbrock_grad(x) + cfg.sigma * torch.randn(x.shape, generator=gen, dtype=torch.float64)
            opt.step()
            expected.append(float((x.mean(0) - torch.tensor([1.0, 1.0], dtype=torch.float64)).norm()))
        got = run_method(cfg, name)
        assert got["distance"] == expected, name
        assert got["final_point"] == [float(v) for v in x.mean(0)], name
    assert ToyConfig().heterogeneity == 0.0


@pytest.mark.parametrize("workers", [2, 7, 256])
@pytest.mark.parametrize("h", [0.3, 10.0])
def test_mean_worker_objective_is_the_rosenbrock(workers, h):
    """The proof in the module doc, numerically: sum_m a_m = 0, so mean_m f_m(x) = f(x) at any x."""
    import torch

    shifts = worker_shifts(workers, h)
    assert shifts.shape == (workers, 2)
    assert torch.allclose(shifts.norm(dim=1), torch.full((workers,), h, dtype=torch.float64))  # |a_m| = H
    assert shifts.sum(0).abs().max() < 1e-12 * h * workers
    if workers % 2 == 0:  # paired as d_{m + M/2} = -d_m: the sum is exactly zero
        assert torch.equal(shifts[workers // 2 :], -shifts[: workers // 2])
    for point in ((1.0, 1.0), (-1.5, 2.5), (0.3, -0.7), (2.0, 4.0)):
        x = torch.tensor(point, dtype=torch.float64).repeat(workers, 1)
        mean = worker_objectives(x, shifts).mean()
        common = rosenbrock(x[:1])[0]
        assert abs(float(mean - common)) < 1e-10 * (1 + abs(float(common))), (point, float(mean), float(common))
    assert float(rosenbrock(torch.tensor([[1.0, 1.0]], dtype=torch.float64))[0]) == 0.0


def test_worker_gradients_differ_for_positive_heterogeneity():
    """The run's per-worker gradient is the gradient of f_m; workers at one point get different ones
    for H > 0 and identical ones for H = 0."""
    import torch

    workers = 8
    x = torch.tensor([0.5, -0.2], dtype=torch.float64).repeat(workers, 1).requires_grad_(True)
    for h in (0.0, 1.0):
        shifts = worker_shifts(workers, h)
        (g,) = torch.autograd.grad(worker_objectives(x, shifts).sum(), x)
        assert torch.allclose(g, rosenbrock_grad(x.detach()) + shifts)
        if h == 0:
            assert torch.equal(g, g[:1].expand_as(g))
        else:
            assert (g[1:] - g[0]).norm(dim=1).min() > 0.1  # every worker's gradient differs from worker 0's
    # in a run without noise, started at the optimum, 8 steps past the last sync: DDP averages the
    # gradients every step, so the zero-sum shifts cancel and it stays at (1, 1) (to rounding); local
    # workers follow their own gradients and spread apart, so their mean leaves (1, 1) too
    base = ToyConfig(workers=8, steps=72, period_x=16, period_u=16, period_v=32, sigma=0.0, start=(1.0, 1.0))
    het = ToyConfig(**{**base.__dict__, "heterogeneity": 1.0})
    assert max(run_method(het, "ddp")["distance"]) < 1e-12
    assert run_method(base, "local-adam")["worker_spread"] == 0.0
    assert run_method(base, "local-adam")["final_distance"] == 0.0
    res = run_method(het, "local-adam")
    assert res["worker_spread"] > 0.01 and res["final_distance"] > 1e-3


@pytest.mark.parametrize("value,fragment", [
    (-1.0, "toy heterogeneity (--heterogeneity) must be >= 0, got -1"),
    (float("nan"), "toy heterogeneity (--heterogeneity) must be a finite number"),
    (float("inf"), "toy heterogeneity (--heterogeneity) must be a finite number"),
    ("0.3", "toy heterogeneity (--heterogeneity) must be a number"),
])
def test_heterogeneity_must_be_finite_and_non_negative(value, fragment):
    from desloc.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        ToyConfig(heterogeneity=value)
    assert fragment in str(info.value) and "--heterogeneity 0.3" in str(info.value)
    with pytest.raises(ConfigError, match=r"heterogeneity \(--heterogeneity\) 0.5 needs at least 2 workers, got 1"):
        ToyConfig(workers=1, heterogeneity=0.5)
    ToyConfig(workers=1, heterogeneity=0.0)  # one i.i.d. worker is still fine


@pytest.mark.parametrize("flags,fragment", [
    (["--heterogeneity", "-0.5"], "toy heterogeneity (--heterogeneity) must be >= 0, got -0.5"),
    (["--heterogeneity", "nan"], "must be a finite number, got nan"),
    (["--heterogeneity", "inf"], "must be a finite number, got inf"),
    (["--heterogeneity", "1", "--workers", "1"], "needs at least 2 workers"),
])
def test_cli_refuses_bad_heterogeneity(flags, fragment, tmp_path, capsys):
    from _cli_helpers import error_line

    line = error_line(capsys, ["toy", "--steps", "4", "--workers", "2", *flags, "--out", str(tmp_path / "toy")])
    assert fragment in line and "--heterogeneity" in line
    assert not (tmp_path / "toy").exists()


def test_cli_heterogeneity_reaches_the_record(tmp_path, capsys):
    from desloc.cli import main

    out = tmp_path / "run"
    assert main(["toy", "--json", "--workers", "4", "--steps", "32", "--kx", "8",
                 "--methods", "ddp,keep-states", "--heterogeneity", "0.5", "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["config"]["heterogeneity"] == 0.5
    assert json.loads((out / "config.json").read_text())["heterogeneity"] == 0.5
