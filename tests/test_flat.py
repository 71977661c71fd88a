"""Zero-copy flat-buffer syncs, overlapped state syncs and the delayed parameter sync, in the
simulator (the same on real gloo processes: tests/test_overlap_gloo.py).

* Layout: after the first step the parameters and every synced state are views of their tag's
  flat ``[M, numel]`` buffer; a sync hands the communicator exactly those buffers (no per-tensor
  lists); results are bitwise those of the copying path (``zero_copy=False``); state_dict /
  load_state_dict round trips and rebinds the views; an optimizer that replaces its state
  tensors is handled (a warning, same numbers).
* Overlap: overlapped == blocking, bitwise, for every method x inner.
* Delayed parameter sync: delay 0 is the blocking code path; delay d follows the documented rule
  against a float64 reference (with and without an outer optimizer); a checkpoint with the
  snapshot in flight resumes bitwise; bad settings are refused with the flag's name.
* The clock: overlapped traffic is hidden behind the compute it overlaps.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from desloc.algorithms import MethodConfig, build_method
from desloc.comm import SimulatedComm
from desloc.comm.base import Communicator
from desloc.errors import ConfigError
from desloc.timing import NetworkProfile, TimeModel, VirtualClock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_workload as wl  # noqa: E402
from _numerics import assert_within, gamma  # noqa: E402

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

M = 3
SNAP_PARTS = ("params", "states", "scalars")


def _same(a: dict, b: dict, what: str) -> None:
    for part in SNAP_PARTS:
        assert a[part].keys() == b[part].keys(), f"{what}: {part} differ in names"
        for name in a[part]:
            x, y = a[part][name], b[part][name]
            if torch.is_tensor(x):
                assert torch.equal(x, y), f"{what}: {part} {name} max |diff| {(x - y).abs().max().item():.3e}"
            else:
                assert x == y, f"{what}: {part} {name}"
    assert a["ledger"] == b["ledger"], f"{what}: ledgers differ"


def _spans_inside(t: torch.Tensor, buf: torch.Tensor) -> bool:
    lo = buf.data_ptr()
    hi = lo + buf.numel() * buf.element_size()
    return lo <= t.data_ptr() < hi


# ------------------------------------------------------------------------------------ layout
def test_params_and_states_are_views_of_their_flat_buffer_after_the_first_step():
    replicas, opt = wl.build_sim("desloc", "adamw", M)
    wl.train_sim(replicas, opt, 0, 1)
    for tag in ("params", "exp_avg", "exp_avg_sq"):
        group = opt._flat[tag]
        tensors = opt._tag_tensors(tag)
        assert group.bound(tensors), tag
        (buf,) = group.buffers  # one dtype, one device: one buffer
        assert buf.shape == (M, sum(t[0].numel() for t in tensors)) and buf.is_contiguous()
        assert all(_spans_inside(t, buf) for t in tensors)
        assert not group.copied or tag != "params"  # StackedReplicas' parameters were adopted as they lie
    # the replicas run on rows of the same storage: an in-place change of the buffer shows in them
    params_buf = opt._flat["params"].buffers[0]
    params_buf[1].add_(1.0)
    first = dict(replicas[1].named_parameters())
    assert all(torch.equal(first[n], replicas.stacked[n][1]) for n in replicas.names)


class _FlatSpy(SimulatedComm):
    def __init__(self, m):
        super().__init__(m)
        self.flat_calls, self.list_calls = [], 0

    def all_reduce_mean(self, tensors, tags):
        self.list_calls += 1
        super().all_reduce_mean(tensors, tags)

    def all_reduce_mean_flat(self, buffers, tags, hidden_steps=None):
        self.flat_calls.append((list(buffers), list(tags), list(hidden_steps or [])))
        return super().all_reduce_mean_flat(buffers, tags, hidden_steps)


def test_a_sync_hands_the_communicator_the_flat_buffers_only():
    replicas, opt = wl.build_sim("desloc", "adamw", M)
    spy = _FlatSpy(M)
    spy.ledger = opt.comm.ledger
    opt.comm = spy
    wl.train_sim(replicas, opt, 0, 6)  # K_x 2, K_u 3, K_v 5: every tag falls due
    assert spy.list_calls == 0 and len(spy.flat_calls) == 5  # steps 2, 3, 4, 5, 6
    for buffers, tags, hidden in spy.flat_calls:
        for buf, tag in zip(buffers, tags):
            assert any(buf is b for b in opt._flat[tag].buffers), f"{tag}: not the tag's home buffer"
        assert hidden == [0 if tag == "params" else 1 for tag in tags]  # states overlap, params block


@pytest.mark.parametrize("method, inner", [c for c in wl.COMBOS])
def test_zero_copy_equals_the_copying_path_and_overlap_equals_blocking(method, inner):
    base = wl.run_simulated(method, inner, M)
    _same(base, wl.run_simulated(method, inner, M, sync={"zero_copy": False}), f"{method}/{inner} copy")
    _same(base, wl.run_simulated(method, inner, M, sync={"overlap": False}), f"{method}/{inner} blocking")
    if wl.supports_delay(method):
        _same(base, wl.run_simulated(method, inner, M, sync={"param_delay": 0}), f"{method}/{inner} delay 0")


def test_state_dict_round_trip_rebinds_the_views():
    replicas, opt = wl.build_sim("local-adam", "adamw", M)
    wl.train_sim(replicas, opt, 0, 4)
    sd = copy.deepcopy(opt.state_dict())
    replicas2, opt2 = wl.build_sim("local-adam", "adamw", M)
    replicas2.load_state_dict(replicas.state_dict())
    opt2.load_state_dict(sd)  # the inner optimizer allocates fresh state tensors here ...
    for tag in ("exp_avg", "exp_avg_sq"):  # ... which are re-homed at once
        assert opt2._flat[tag].bound(opt2._tag_tensors(tag)), tag
    wl.train_sim(replicas, opt, 4, 9)
    wl.train_sim(replicas2, opt2, 4, 9)
    _same(wl.snapshot_sim(replicas, opt), wl.snapshot_sim(replicas2, opt2), "resumed")


class ReplacingSGD(torch.optim.Optimizer):
    """Momentum SGD that allocates a new momentum tensor every step (never in place)."""

    def __init__(self, params, lr=0.05, momentum=0.9):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                buf = p.grad.clone() if buf is None else buf * group["momentum"] + p.grad
                state["momentum_buffer"] = buf  # a new tensor: the old view is dropped
                p.add_(buf, alpha=-group["lr"])


def _replacing_run(zero_copy: bool):
    replicas = wl.StackedReplicas(wl.make_model(), M)
    inner = ReplacingSGD(replicas.parameters())
    opt = build_method(MethodConfig("local-adam", period_x=2), inner, SimulatedComm(M),
                       {"momentum_buffer": "u"}, zero_copy=zero_copy, assume_elementwise=True)
    wl.train_sim(replicas, opt, 0, 7)
    return wl._snapshot(dict(replicas.named_parameters()), opt)


def test_an_optimizer_that_replaces_its_states_is_handled():
    reference = _replacing_run(zero_copy=False)
    with pytest.warns(UserWarning, match="replaced its 'momentum_buffer' tensors"):
        flat = _replacing_run(zero_copy=True)
    for name, value in reference["params"].items():
        assert torch.equal(value, flat["params"][name]), name
    for name, value in reference["scalars"].items():  # momentum_buffer is not a declared role name
        assert torch.equal(value, flat["scalars"][name]), name


# ------------------------------------------------------------------------ delayed parameter sync
def _quadratic_grads(x: torch.Tensor, t: int) -> torch.Tensor:
    """Per-worker gradients of 0.5 |x - c_m(t)|^2 (different targets per worker and step)."""
    m = torch.arange(x.shape[0], dtype=x.dtype).reshape(-1, 1)
    target = torch.sin(0.7 * m + 0.3 * t + torch.arange(x.shape[1], dtype=x.dtype))
    return x - target


def _delayed_reference(steps: int, kx: int, delay: int, lr: float, outer: tuple[float, float] | None) -> torch.Tensor:
    """The documented rule in float64, written out naively (SGD inner, no momentum)."""
    x = torch.linspace(-1, 1, 4, dtype=torch.float64).repeat(M, 1)
    xbar = x[0].clone()
    mom = torch.zeros_like(xbar)
    pending = None
    for t in range(1, steps + 1):
        x = x - lr * _quadratic_grads(x, t - 1)
        if pending is not None and t == pending[0]:
            _, mean, snap = pending
            if outer is None:
                x = x + (mean - snap)
            else:
                eta, mu = outer
                delta = xbar - mean
                mom = mu * mom + delta
                xbar = xbar - eta * (delta + mu * mom)  # Nesterov
                x = x + (xbar - snap)
            pending = None
        if t % kx == 0:
            pending = (t + delay, x.mean(0, keepdim=True).expand_as(x).clone(), x.clone())
    return x


@pytest.mark.parametrize("outer", [None, (0.7, 0.5)])
@pytest.mark.parametrize("delay", [1, 3])
def test_delayed_param_sync_follows_the_documented_rule(delay, outer):
    steps, kx, lr = 17, 4, 0.1
    x = torch.linspace(-1, 1, 4).repeat(M, 1).contiguous()
    kwargs = {} if outer is None else dict(outer="nesterov", outer_lr=outer[0], outer_momentum=outer[1])
    cfg = MethodConfig("keep-states", period_x=kx, param_delay=delay, **kwargs)
    opt = build_method(cfg, torch.optim.SGD([x], lr=lr), SimulatedComm(M), {})
    for t in range(steps):
        x.grad = _quadratic_grads(x.detach(), t)
        opt.step()
    want = _delayed_reference(steps, kx, delay, lr, outer)
    # fp32 vs the float64 rule: each step rounds at most ~20 times (target, gradient, SGD step,
    # 3-term mean, x + (mean - snap), the outer step) values of magnitude <= 2 (|x|, |target|
    # <= 1 plus steps); the SGD step contracts (factor 1 - lr), the mean does not expand, the
    # outer Nesterov step amplifies by at most eta (1 + mu) / (1 - mu) = 2.1 <= 4.
    assert_within(x.double(), want, 4 * gamma(20 * steps) * 2.0, f"delay {delay} outer {outer}")
    # and the delay changed something: the blocking run ends elsewhere
    y = torch.linspace(-1, 1, 4).repeat(M, 1).contiguous()
    blocking = build_method(MethodConfig("keep-states", period_x=kx, **kwargs), torch.optim.SGD([y], lr=lr),
                            SimulatedComm(M), {})
    for t in range(steps):
        y.grad = _quadratic_grads(y.detach(), t)
        blocking.step()
    assert (x - y).abs().max() > 1e-3


def test_finish_syncs_applies_the_last_delayed_average():
    replicas, opt = wl.build_sim("local-adam", "adamw", M, sync={"param_delay": 2})
    wl.train_sim(replicas, opt, 0, 6)  # K 3: launched at 6, due at 8
    assert opt.delayed is not None
    opt.finish_syncs()
    assert opt.delayed is None
    assert all(torch.equal(p[0], p[m]) for p in replicas.parameters() for m in range(M))


@pytest.mark.parametrize("method, save_at", [("desloc", 6), ("local-adam", 7), ("diloco", 7), ("mtdao", 7)])
def test_checkpoint_with_a_sync_in_flight_resumes_bitwise(method, save_at):
    inner = "mtdao" if method == "mtdao" else "adamw"
    sync = {"param_delay": "max"}
    straight = wl.run_simulated(method, inner, M, sync=sync)
    replicas, opt = wl.build_sim(method, inner, M, sync=sync)
    wl.train_sim(replicas, opt, 0, save_at)
    assert opt.delayed is not None, "the test needs a parameter average in flight at the checkpoint"
    ckpt = copy.deepcopy({"model": replicas.state_dict(), "optim": opt.state_dict()})
    replicas2, opt2 = wl.build_sim(method, inner, M, sync=sync)
    replicas2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.delayed is not None and opt2.delayed.apply_step == opt.delayed.apply_step
    wl.train_sim(replicas2, opt2, save_at, wl.STEPS)
    _same(straight, wl.snapshot_sim(replicas2, opt2), f"{method} resumed at {save_at}")


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="desloc", period_x=4, param_delay=4), "must be < K_x=4"),
    (dict(name="desloc", period_x=4, param_delay=-1), "integer >= 0"),
    (dict(name="ddp", period_x=1, param_delay=1), "all-reduces the gradient every step"),
    (dict(name="gasloc", period_x=4, param_delay=1), "gossips"),
    (dict(name="desloc", period_x=4, overlap="yes"), "overlap must be true or false"),
])
def test_bad_sync_options_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MethodConfig(**kwargs)


# -------------------------------------------------------------------------------- the clock
def test_clock_hides_overlapped_traffic_behind_compute():
    net = NetworkProfile("n", 8e6, 0.0)  # 1 MB/s
    model = TimeModel(net, 0.5, 2)  # 2 workers: an all-reduce of B bytes takes B / 1e6 s
    clock = VirtualClock(model)
    clock.local_step([0, 1])
    clock.on_all_reduce(200_000, [0, 1])  # blocking 0.2 s
    assert clock.now == pytest.approx(0.7)
    clock.on_all_reduce(300_000, [0, 1], hidden_steps=1)  # 0.3 s, hidden behind the next 0.5 s step
    assert clock.now == pytest.approx(1.0)  # in flight: the run is not done before it lands
    clock.local_step([0, 1])
    assert clock.time == [pytest.approx(1.2)] * 2
    clock.on_all_reduce(800_000, [0, 1], hidden_steps=1)  # 0.8 s: 0.3 s show after the 0.5 s step
    clock.local_step([0, 1])
    assert clock.time == [pytest.approx(2.0)] * 2
    clock.on_all_reduce(900_000, [0, 1], hidden_steps=2)  # 0.9 s behind two steps: hidden
    clock.on_all_reduce(100_000, [0, 1])  # a blocking one waits for the link: 2.0 + 0.9 + 0.1
    assert clock.time == [pytest.approx(3.0)] * 2
    restored = VirtualClock(model)
    restored.load_state_dict(clock.state_dict())
    assert restored.state_dict() == clock.state_dict()


class ListOnlyComm(SimulatedComm):
    """A user's communicator that implements all_reduce_mean only (no flat all-reduces)."""

    _reduce_flat = Communicator._reduce_flat


def test_a_communicator_without_flat_all_reduces_gets_the_copying_path():
    reference = wl.run_simulated("desloc", "adamw", M, sync={"zero_copy": False})
    replicas = wl.StackedReplicas(wl.make_model(), M)
    icfg = wl.inner_config("adamw")
    opt = build_method(wl.method_config("desloc", M), icfg.build(replicas.parameters()), ListOnlyComm(M),
                       icfg.state_roles())
    assert not opt.zero_copy and not opt.overlap
    wl.train_sim(replicas, opt, 0, wl.STEPS)
    _same(reference, wl.snapshot_sim(replicas, opt), "list-only communicator")
    with pytest.raises(ConfigError, match="flat all-reduces"):
        build_method(MethodConfig("desloc", period_x=4, param_delay=1), icfg.build(replicas.parameters()),
                     ListOnlyComm(M), icfg.state_roles())
