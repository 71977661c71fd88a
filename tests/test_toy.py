"""`desloc toy`: the JSON contract, the records, and the qualitative result it documents."""

import json
import subprocess
import sys

import pytest

from desloc.toy import ToyConfig, rosenbrock_grad, run_method


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
