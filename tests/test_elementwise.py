"""The shared ADOPT / MT-DAO body (desloc.optim.elementwise): one step over a group's tensor lists
equals stepping each parameter alone, bitwise, also when parameters of a group have taken
different numbers of steps (a parameter without a gradient sits a step out and keeps its t)."""

from __future__ import annotations

import pytest
import torch

import desloc.optim.elementwise as elementwise
from desloc.errors import ConfigError
from desloc.optim import ADOPT, MTDAO

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

SHAPES = [(7,), (3, 5), (), (4, 2, 3), (1,)]
BUILDERS = {
    "adopt": lambda ps: ADOPT(ps, lr=0.01, weight_decay=0.1),
    "mtdao": lambda ps: MTDAO(ps, lr=0.01, betas=(0.5, 0.9, 0.99), omegas=(0.2, 0.3, 0.4), weight_decay=0.1),
    "mtdao-adam": lambda ps: MTDAO(ps, lr=0.01, omegas=(0.0, 0.6), weight_decay=0.1, flavour="adam"),
}


def _sits_out(i: int, t: int) -> bool:
    return (i == 1 and t in (1, 2)) or (i == 3 and t == 0) or (i == 4 and t % 3 == 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_group_step_equals_each_parameter_alone_bitwise(name, dtype):
    gen = torch.Generator().manual_seed(0)
    x0 = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    together = [x.clone() for x in x0]
    alone = [x.clone() for x in x0]
    opt = BUILDERS[name](together)
    opts = [BUILDERS[name]([x]) for x in alone]
    for t in range(8):
        for i, (a, b) in enumerate(zip(together, alone)):
            g = None if _sits_out(i, t) else torch.randn(a.shape, generator=gen, dtype=dtype) * 10 ** (t % 3)
            a.grad, b.grad = g, None if g is None else g.clone()
        opt.step()
        for o in opts:
            o.step()
    for i, (a, b) in enumerate(zip(together, alone)):
        assert torch.equal(a, b), i
        sa, sb = opt.state[a], opts[i].state[b]
        assert list(sa) == list(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (i, key)
    steps = [int(opt.state[x]["step"].item()) for x in together]
    assert steps == [8, 6, 8, 7, 6]  # the counters diverged and were kept per parameter


def _trajectory(name: str, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Parameters and states after 6 steps on worker-stacked [4, ...] tensors, heavy-tailed grads."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn((4, *s), generator=gen, dtype=dtype).to(device) for s in SHAPES]
    opt = BUILDERS[name](xs)
    for _ in range(6):
        for x in xs:
            g = torch.randn(x.shape, generator=gen, dtype=dtype)
            x.grad = (g / torch.rand(x.shape, generator=gen, dtype=dtype)).to(device)
        opt.step()
    return xs + [v for x in xs for v in opt.state[x].values()]


@pytest.mark.parametrize("device", sorted(elementwise.FOREACH_DEVICES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_foreach_kernels_give_the_per_tensor_bits(name, dtype, device, monkeypatch):
    """Where foreach kernels are used, they (and any CPU run length) give the per-tensor ops' bits."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.setattr(elementwise, "CPU_CHUNK", 64)  # CPU: runs of several tensors, and one alone
    runs = _trajectory(name, device, dtype)
    monkeypatch.setattr(elementwise, "CPU_CHUNK", 10**12)  # one foreach call per op for the group
    whole = _trajectory(name, device, dtype)
    monkeypatch.setattr(elementwise, "FOREACH_DEVICES", set())  # every op per tensor
    per_tensor = _trajectory(name, device, dtype)
    for a, b, c in zip(runs, whole, per_tensor):
        assert torch.equal(a, c) and torch.equal(b, c)
        assert torch.equal(torch.signbit(a), torch.signbit(c))


def test_state_layout():
    a, m = torch.zeros(3), torch.zeros(3)
    opt_a, opt_m = ADOPT([a]), MTDAO([m], betas=(0.9, 0.99, 0.999), omegas=(0.3, 0.3, 0.3))
    for x, opt in ((a, opt_a), (m, opt_m)):
        x.grad = torch.ones(3)
        opt.step()
    assert list(opt_a.state[a]) == ["step", "exp_avg", "exp_avg_sq"]
    assert list(opt_m.state[m]) == ["step", "exp_avg_0", "exp_avg_1", "exp_avg_2", "exp_avg_sq"]
    assert opt_a.state[a]["step"].dim() == 0 and opt_a.state[a]["step"].item() == 1.0
    assert set(opt_a.defaults) == {"lr", "betas", "eps", "weight_decay"}


@pytest.mark.parametrize("override,field", [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
                                            ({"eps": 0.0}, "eps")])
def test_adopt_group_overrides_are_validated(override, field):
    with pytest.raises(ConfigError, match="ADOPT " + field):
        ADOPT([{"params": [torch.zeros(1)], **override}])
