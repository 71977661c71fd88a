"""Edge cases of the wrapper found in review (issue 18, items 1 and 4-6), each a test that failed
before its fix:

* the CLI resolves the outer momentum mu(K_x) for the K_x it is given (it used the default K_x's);
* ``add_param_group`` while a delayed parameter average is in flight (the snapshot has the old
  layout) -- compared bitwise with a run where the group existed from the start but had no
  gradient until then (Adam skips parameters without a gradient, and the average of identical
  rows at M = 2 is exact, so the two runs do the same arithmetic);
* ``zero_grad(set_to_none=False)`` after ``zero_grad()`` (None gradients) is torch's no-op;
* reset-states with state syncs in flight, and step hooks, on a communicator whose overlapped
  all-reduces really land late (:class:`DeferredComm`): bitwise the blocking run;
* a checkpoint with a delayed average in flight, read onto the CPU, resumes on the parameters'
  device (CUDA where available).
"""

from __future__ import annotations

import io

import pytest
import torch

from desloc.algorithms import DesLoc, MethodConfig, build_method, outer_factory
from desloc.algorithms.outer import nesterov_sgd
from desloc.comm import SimulatedComm
from desloc.comm.base import PendingReduce

M = 2


# --------------------------------------------------------------- item 1: CLI outer momentum
def _cli_config(*argv: str):
    from desloc.cli import _train_config, build_parser

    return _train_config(build_parser().parse_args(["train", "--steps", "1000", *argv]))  # K_x <= steps


@pytest.mark.parametrize("argv, mu, lr", [
    (("--method", "diloco", "--kx", "500"), 0.9, 0.7),
    (("--method", "diloco", "--kx", "100"), 0.5, 0.833333),
    (("--method", "diloco", "--kx", "16"), 0.0, 1.0),
    (("--method", "desloc", "--outer", "nesterov", "--kx", "200"), 0.75, 0.75),
    (("--method", "gasloc", "--kx", "100"), 0.5, 0.833333),
    (("--method", "diloco", "--kx", "500", "--outer-momentum", "0.3"), 0.3, 0.7),
    (("--method", "diloco", "--kx", "16", "--outer-lr", "0.7"), 0.0, 0.7),
])
def test_cli_outer_momentum_and_lr_follow_the_given_kx(argv, mu, lr):
    cfg = _cli_config(*argv)
    assert cfg.method.outer_momentum == pytest.approx(mu) and cfg.method.outer_lr == pytest.approx(lr)
    method = cfg.to_dict()["method"]  # what config.json records
    assert method["outer_momentum"] == pytest.approx(mu) and method["outer_lr"] == pytest.approx(lr)
    outer = outer_factory(cfg.method)([torch.zeros(1)])
    assert outer.defaults["momentum"] == pytest.approx(mu) and outer.defaults["lr"] == pytest.approx(lr)


# ------------------------------------------------------------------------------- helpers
def _grad(step: int, shape: tuple[int, ...], salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + salt)
    return torch.randn(shape, generator=g)


def _stacked(n: int, seed: int) -> torch.nn.Parameter:
    row = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return torch.nn.Parameter(row.expand(M, n).clone())  # every worker starts from the same row


# ------------------------------------------------ item 4: add_param_group with an average in flight
def _delayed_run(late_group: bool, outer: bool, steps: int = 14, add_at: int = 5, save_at: int | None = None):
    """K_x = 4, param delay 2 (launched after steps 4, 8, 12; applied after 6, 10, 14). Parameter
    b joins after ``add_at`` steps: by ``add_param_group`` (``late_group``) or present from the
    start with no gradient until then (the reference). ``save_at``: round-trip the optimizer's
    state_dict after that step (the resumed run is compared too)."""
    a, b = _stacked(5, 1), _stacked(3, 2)
    inner = torch.optim.AdamW([a], lr=0.05) if late_group else \
        torch.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=0.05)
    kw = dict(outer=nesterov_sgd(0.7, 0.5)) if outer else {}
    opt = DesLoc(inner, SimulatedComm(M), 4, {"exp_avg": 8, "exp_avg_sq": 12}, param_delay=2, **kw)
    for t in range(1, steps + 1):
        if late_group and t == add_at + 1:
            opt.add_param_group({"params": [b]})
        a.grad = _grad(t, tuple(a.shape), 1)
        b.grad = _grad(t, tuple(b.shape), 2) if t > add_at else None
        opt.step()
        if save_at == t:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            fresh_inner = torch.optim.AdamW([a], lr=0.05) if late_group else \
                torch.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=0.05)
            opt = DesLoc(fresh_inner, SimulatedComm(M), 4, {"exp_avg": 8, "exp_avg_sq": 12}, param_delay=2, **kw)
            if late_group and t > add_at:
                opt.add_param_group({"params": [b]})
            opt.load_state_dict(torch.load(buf, weights_only=True))
    opt.finish_syncs()
    return a.detach().clone(), b.detach().clone()


@pytest.mark.parametrize("outer", [False, True], ids=["plain", "nesterov"])
def test_add_param_group_while_a_delayed_average_is_in_flight(outer):
    ref = _delayed_run(late_group=False, outer=outer)
    got = _delayed_run(late_group=True, outer=outer)  # the group arrives between launch (4) and apply (6)
    for x, y in zip(got, ref):
        assert torch.equal(x, y), (x - y).abs().max()
    assert not torch.equal(ref[1], _stacked(3, 2).detach())  # b was trained


@pytest.mark.parametrize("outer", [False, True], ids=["plain", "nesterov"])
def test_checkpoint_with_a_grown_layout_in_flight_resumes_bitwise(outer):
    ref = _delayed_run(late_group=True, outer=outer)
    got = _delayed_run(late_group=True, outer=outer, save_at=5)  # snapshot of a only, b added next
    got2 = _delayed_run(late_group=True, outer=outer, save_at=9)  # in flight after b joined
    for x, y, z in zip(got, got2, ref):
        assert torch.equal(x, z) and torch.equal(y, z)


# --------------------------------------------------------------- item 5: zero_grad twice
@pytest.mark.parametrize("method", ["ddp", "desloc", "local-adam"])
def test_zero_grad_keep_after_set_to_none_is_a_no_op(method):
    p = _stacked(4, 3)
    opt = build_method(MethodConfig(method, period_x=2), torch.optim.AdamW([p], lr=0.1), SimulatedComm(M),
                       {"exp_avg": "u", "exp_avg_sq": "v"})
    for t in range(3):
        p.grad = _grad(t, tuple(p.shape), 4)
        opt.step()
        opt.zero_grad()  # grads -> None
        opt.zero_grad(set_to_none=False)  # torch: nothing to zero
        assert p.grad is None


# --------------------------------------- item 6: syncs that land late (reset, hooks), CUDA resume
class _Late(PendingReduce):
    """An all-reduce that read its buffer at launch and writes the average only when waited for."""

    def __init__(self, buffer: torch.Tensor, world_size: int):
        super().__init__(buffer)
        self.sent = buffer.clone()
        self.world_size = world_size
        self.done = False

    def wait(self) -> torch.Tensor:
        if not self.done:
            mean = self.sent.sum(dim=0, keepdim=True).div_(self.world_size)  # SimulatedComm's arithmetic
            self.buffer.copy_(mean.expand_as(self.buffer))
            self.done = True
        return self.buffer


class DeferredComm(SimulatedComm):
    """The simulator with a real network's timing: a buffer left in flight (hidden steps > 0) is
    what it was at launch, and its average overwrites it at the wait -- a write to it in between
    is lost, a read in between sees the un-averaged values (as with gloo's async all-reduce)."""

    def _reduce_flat(self, buffers, hidden):
        out = []
        for buf, k in zip(buffers, hidden):
            if k:
                out.append(_Late(buf, self.world_size))
            else:
                self._average([buf])
                out.append(PendingReduce(buf))
        return out


def _overlap_run(overlap: bool, reset: bool = False, hooks: bool = False, steps: int = 7):
    p = _stacked(6, 5)
    inner = torch.optim.AdamW([p], lr=0.05)
    opt = DesLoc(inner, DeferredComm(M), 2, {"exp_avg": 2, "exp_avg_sq": 2}, reset_states_on_param_sync=reset,
                 overlap=overlap)
    seen: list[torch.Tensor] = []
    if hooks:
        def read(o, *_):
            seen.extend(t.clone() for t in o.state_tensors("exp_avg") + o.state_tensors("exp_avg_sq"))

        opt.register_step_pre_hook(read)
        opt.register_step_post_hook(read)
    for t in range(steps):
        p.grad = _grad(t, tuple(p.shape), 6)
        opt.step()
    opt.finish_syncs()
    return [p.detach().clone(), *[s.clone() for s in opt.state_tensors("exp_avg") + opt.state_tensors("exp_avg_sq")],
            *seen]


@pytest.mark.parametrize("reset, hooks", [(True, False), (False, True), (True, True)],
                         ids=["reset-states", "hooks", "reset-states+hooks"])
def test_syncs_that_land_late_equal_blocking(reset, hooks):
    blocking = _overlap_run(False, reset, hooks)
    overlapped = _overlap_run(True, reset, hooks)
    assert len(blocking) == len(overlapped)
    for i, (x, y) in enumerate(zip(overlapped, blocking)):
        assert torch.equal(x, y), f"tensor {i}: max |diff| {(x - y).abs().max().item():.3e}"


def test_overlap_is_kept_without_hooks():
    """Without hooks the state average is still left in flight across the step boundary."""
    p = _stacked(6, 5)
    opt = DesLoc(torch.optim.AdamW([p], lr=0.05), DeferredComm(M), 2, {"exp_avg": 2, "exp_avg_sq": 2})
    for t in range(2):
        p.grad = _grad(t, tuple(p.shape), 6)
        opt.step()
    assert opt._in_flight and not any(h.done for h in opt._in_flight)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("outer", [False, True], ids=["plain", "nesterov"])
def test_resume_with_a_delayed_average_in_flight_on_the_parameters_device(device, outer):
    def run(save_at: int | None):
        p = torch.nn.Parameter(_stacked(6, 7).detach().to(device))
        kw = dict(outer=nesterov_sgd(0.7, 0.5)) if outer else {}

        def make():
            return DesLoc(torch.optim.AdamW([p], lr=0.05), SimulatedComm(M), 4, {"exp_avg": 4, "exp_avg_sq": 8},
                          param_delay=3, **kw)

        opt = make()
        for t in range(1, 11):
            p.grad = _grad(t, tuple(p.shape), 8).to(device)
            opt.step()
            if t == save_at:  # launched after 4, applied after 7: in flight at 5
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = make()
                opt.load_state_dict(torch.load(buf, map_location="cpu", weights_only=True))  # as desloc's loader
                assert opt.delayed is not None and all(t.device == p.device for t in opt.delayed.mean)
        opt.finish_syncs()
        return p.detach().cpu()

    assert torch.equal(run(save_at=5), run(save_at=None))
