"""Streamed, delayed and compressed syncs (issue 20) in the simulator.

* Reductions: fragments = 1, state_delay = 0 and compression None / "none" are today's runs bit for
  bit (parameters, states, ledger), for desloc, local-adam, keep-states, diloco, desloc + Nesterov
  and desloc + param_delay; and the zero-copy path equals the copying reference.
* The schedule (:class:`~desloc.algorithms.schedule.SyncSchedule`) against brute force: every
  fragment once per period, spread over it; F = 1 is ``t % K == 0``; the last-step rule;
  ``final``; ``fragment_count`` / ``count``; the ledger equals ``expected_bytes(T)``.
* Fragments: after ``finish_syncs`` every worker holds the same parameters; a hand-traced F = 2
  run where exactly the synced fragment is averaged.
* State delay: a float64 reference written out by hand (per worker, per parameter) of
  s <- s + beta^D (E[s_snap] - s_snap); the "instant average, same contributions" identity; v >= 0;
  an inner optimizer whose state is not a known EMA is refused.
* Compression: every worker holds bitwise the same shared value after each sync; "none" is no
  compression; the rule by hand (M = 2, n = 3, int8); error feedback (buffer, and the bias it
  removes); v >= 0 under int4; DDP's compressed gradient and its bytes.
* Checkpoints with delayed, fragmented and compressed syncs in flight resume bitwise.
* Refusals name the field, the value and the fix.
* The contract (every method x inner optimizer with fragments + int8 + state delay): an LR
  scheduler steps, state_dict / load_state_dict round-trips (tests/test_contract.py's helpers).
"""

from __future__ import annotations

import copy
import io
import math
import sys
from pathlib import Path

import pytest
import torch

from desloc import InnerConfig, MethodConfig, SimulatedComm, build_method
from desloc.algorithms import DesLoc, fastsync
from desloc.algorithms.schedule import SyncSchedule
from desloc.comm.codecs import get_codec
from desloc.errors import ConfigError
from desloc.optim import register_elementwise

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_contract as contract  # noqa: E402  (its helpers: steps, _halving)

M = 2
SHAPES = ((3, 70), (5,), (2, 3))  # 221 elements per worker: 3 full int8 blocks and a partial one
N = sum(math.prod(s) for s in SHAPES)
CODECS = ("bf16", "fp16", "int8", "int4", "fp8", "topk:0.1")


# ------------------------------------------------------------------------------------ helpers
def make_params(world: int = M, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Worker-stacked parameters, identical on every worker (as StackedReplicas makes them)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, *s, generator=g, dtype=dtype).repeat(world, *([1] * len(s))) for s in SHAPES]


def grads_at(step: int, world: int = M, dtype: torch.dtype = torch.float32, seed: int = 1,
             scale: float = 1.0) -> list[torch.Tensor]:
    """Every worker's gradient at ``step`` (0-based): a function of (seed, step) only, never of
    the parameters, so a resumed run and an identity check see the same sequence."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return [torch.randn(world, *s, generator=g, dtype=dtype) * scale for s in SHAPES]


def build(name: str = "desloc", inner: str = "adamw", world: int = M, dtype: torch.dtype = torch.float32,
          total_steps: int | None = None, zero_copy: bool = True, weight_decay: float = 0.01, lr: float | None = None,
          **cfg):
    cfg.setdefault("period_x", 4)
    params = make_params(world, dtype)
    icfg = InnerConfig(inner, lr=lr or (0.05 if inner == "sgdm" else 0.01), weight_decay=weight_decay)
    opt = build_method(MethodConfig(name, **cfg), icfg.build(params), SimulatedComm(world), icfg.state_roles(),
                       total_steps=total_steps, zero_copy=zero_copy)
    return params, opt


def train(params, opt, start: int, stop: int, seed: int = 1, scale: float = 1.0, after=None) -> None:
    for t in range(start, stop):
        for p, g in zip(params, grads_at(t, p_world(params), params[0].dtype, seed, scale)):
            p.grad = g
        opt.step()
        if after is not None:
            after(t + 1)


def p_world(params) -> int:
    return params[0].shape[0]


def snapshot(params, opt) -> dict:
    opt.wait_for_syncs()
    states = {f"{i}.{k}": v.detach().clone() for i, p in enumerate(params)
              for k, v in opt.inner.state[p].items() if torch.is_tensor(v)}
    return {"params": [p.detach().clone() for p in params], "states": states,
            "ledger": opt.comm.ledger.state_dict(), "summary": opt.comm.ledger.summary()}


def assert_same(a: dict, b: dict, what: str) -> None:
    for i, (x, y) in enumerate(zip(a["params"], b["params"])):
        assert torch.equal(x, y), f"{what}: param {i} max |diff| {(x - y).abs().max().item():.3e}"
    assert a["states"].keys() == b["states"].keys(), f"{what}: state names differ"
    assert a["states"], f"{what}: no states compared"
    for k in a["states"]:
        x, y = a["states"][k], b["states"][k]
        assert torch.equal(x, y), f"{what}: state {k} max |diff| {(x - y).double().abs().max().item():.3e}"
    assert a["ledger"] == b["ledger"], f"{what}: ledgers differ"
    assert a["summary"] == b["summary"], f"{what}: ledger summaries differ"


def run(steps: int, finish: bool = True, seed: int = 1, **kw) -> dict:
    params, opt = build(**kw)
    train(params, opt, 0, steps, seed)
    if finish:
        opt.finish_syncs()
    return snapshot(params, opt)


def workers_equal(t: torch.Tensor) -> bool:
    return all(torch.equal(t[0], t[m]) for m in range(1, t.shape[0]))


# ------------------------------------------------------------------------- 1. reductions
REDUCTION_CASES = {
    "desloc": dict(name="desloc", period_x=2, period_u=3, period_v=5),
    "local-adam": dict(name="local-adam", period_x=3),
    "keep-states": dict(name="keep-states", period_x=3),
    "diloco": dict(name="diloco", period_x=3),
    "desloc+nesterov": dict(name="desloc", period_x=2, period_u=3, period_v=5, outer="nesterov"),
    "desloc+delay2": dict(name="desloc", period_x=4, period_u=6, period_v=10, param_delay=2),
}
OFF = {
    "explicit": dict(fragments=1, state_delay=0, fragment_alpha=0.0),
    "compression=None": dict(compression=None),
    "compression=none": dict(compression="none"),
    "compression={*:none}": dict(compression={"*": "none"}),
    "params=none": dict(compression="params=none"),
    "all-off": dict(fragments=1, state_delay=0, fragment_alpha=0.0, compression="none"),
}
STEPS = 13  # a multiple of no period: ends mid-period


@pytest.mark.numerics
@pytest.mark.parametrize("total_steps", [None, STEPS])
@pytest.mark.parametrize("off", list(OFF))
@pytest.mark.parametrize("case", list(REDUCTION_CASES))
def test_options_off_are_the_default_bitwise(case, off, total_steps):
    base = run(STEPS, total_steps=total_steps, **REDUCTION_CASES[case])
    got = run(STEPS, total_steps=total_steps, **REDUCTION_CASES[case], **OFF[off])
    assert_same(base, got, f"{case} {off}")


@pytest.mark.numerics
@pytest.mark.parametrize("case", [c for c in REDUCTION_CASES if "delay" not in c])
def test_default_zero_copy_path_equals_the_copying_reference(case):
    """F = 1 now goes through the fragment launcher; the copying path (``zero_copy=False``) is the
    pre-fragment ``_sync`` of whole tags: the same numbers and bytes."""
    assert_same(run(STEPS, **REDUCTION_CASES[case]), run(STEPS, zero_copy=False, **REDUCTION_CASES[case]), case)


@pytest.mark.numerics
def test_ledger_without_options_is_the_period_formula():
    """Hand count (desloc K = 2, 3, 5, 13 steps, no total_steps): 6 + 4 + 2 syncs of 4 N bytes."""
    s = run(STEPS, **REDUCTION_CASES["desloc"])["summary"]
    assert s["bytes_by_tag"] == {"params": 6 * 4 * N, "exp_avg": 4 * 4 * N, "exp_avg_sq": 2 * 4 * N}


def test_none_is_no_compression():
    for spec in (None, "none", "NONE", " none ", {"*": "none"}):
        assert MethodConfig("desloc", period_x=4, compression=spec).compression is None, spec
    params, opt = build(compression="params=none,exp_avg=none")
    assert opt.compression == {} and not opt._compressed
    params, opt = build(compression="int8,exp_avg=none")
    assert opt.compression == {"params": "int8", "exp_avg_sq": "int8"}


# --------------------------------------------------------------------------- 2. schedule
PERIOD_SETS = [
    {"params": 4, "exp_avg": 12, "exp_avg_sq": 24},
    {"params": 5, "exp_avg": 5, "exp_avg_sq": 5},
    {"params": 6, "exp_avg": None, "exp_avg_sq": 9},
    {"params": 7},
    {"params": 5, "exp_avg": 2, "exp_avg_sq": 3},  # state periods below F: still once per period
]


def _fragments_of(sched: SyncSchedule, tag: str, step: int) -> list[int]:
    return [f for t, f in sched.due_fragments(step) if t == tag]


@pytest.mark.parametrize("periods, F", [(p, F) for p in PERIOD_SETS for F in range(1, 6) if F <= p["params"]],
                         ids=lambda v: "-".join(map(str, v.values())) if isinstance(v, dict) else f"F{v}")
def test_each_fragment_once_per_period_spread_over_it(periods, F):
    """(F > K_x is refused by the config, so those combinations are not generated.)"""
    sched = SyncSchedule(periods, fragments=F)
    for tag, k in periods.items():
        if k is None:
            assert all(not _fragments_of(sched, tag, t) for t in range(1, 60))
            continue
        for window in range(4):
            seen = [f for t in range(window * k + 1, (window + 1) * k + 1) for f in _fragments_of(sched, tag, t)]
            assert sorted(seen) == list(range(F)), f"{tag} K={k} F={F} window {window}: {seen}"
        if k >= F:  # spread: every fragment at a step of its own
            residues = [sched.residue(tag, f) for f in range(F)]
            assert len(set(residues)) == F, (tag, residues)
    # the parameters (first tag): fragment F-1 on the multiples of K_x, gaps of K_x // F or + 1
    k = periods["params"]
    steps = [next(t for t in range(1, k + 1) if f in _fragments_of(sched, "params", t)) for f in range(F)]
    assert steps[-1] == k and steps == sorted(steps)
    gaps = [b - a for a, b in zip([0] + steps, steps)]
    assert set(gaps) <= {k // F, k // F + 1}, gaps


@pytest.mark.parametrize("periods", PERIOD_SETS + [{"grads": 1}], ids=lambda p: "-".join(map(str, p.values())))
def test_one_fragment_is_the_old_rule(periods):
    sched = SyncSchedule(periods)
    for t in range(1, 100):
        assert sched.due(t) == [tag for tag, k in periods.items() if k is not None and t % k == 0], t
        assert sched.due_fragments(t) == [(tag, 0) for tag in sched.due(t)]
    assert sched.final(97) == []


@pytest.mark.parametrize("F", [1, 2, 3, 4])
@pytest.mark.parametrize("T", [24, 25, 29])
@pytest.mark.parametrize("delays", [{}, {"params": 2, "exp_avg": 1, "exp_avg_sq": 1}, {"exp_avg": 3, "exp_avg_sq": 3}])
@pytest.mark.parametrize("final_all", [False, True])
def test_last_step_rule_final_and_counts_by_brute_force(F, T, delays, final_all):
    periods = {"params": 4, "exp_avg": 6, "exp_avg_sq": 8}
    sched = SyncSchedule(periods, fragments=F, delays=delays, total_steps=T, final_all=final_all)
    free = SyncSchedule(periods, fragments=F)
    for t in range(1, T + 1):
        expect = [(tag, f) for tag, f in free.due_fragments(t)
                  if tag == "params" or t + delays.get(tag, 0) < T]
        assert sched.due_fragments(t) == expect, t
    final = sched.final(T)
    if F == 1 and not final_all:
        assert final == []
    else:
        assert final == [("params", f) for f in range(F)
                         if final_all or T % 4 != sched.residue("params", f)]
    for tag in periods:
        for f in range(F):
            for steps in (T - 5, T - 1, T):
                brute = sum((tag, f) in sched.due_fragments(t) for t in range(1, steps + 1))
                brute += steps == T and (tag, f) in final
                assert sched.fragment_count(tag, f, steps) == brute, (tag, f, steps)
        assert sched.count(tag, T) == sum(sched.fragment_count(tag, f, T) for f in range(F)) // F


LEDGER_CASES = {
    "F2": dict(fragments=2),
    "F3+pd1": dict(fragments=3, param_delay=1),
    "sd2": dict(state_delay=2),
    "F4+pd2+sd1": dict(fragments=4, param_delay=2, state_delay=1),
    "alpha": dict(fragments=2, fragment_alpha=0.5, param_delay=1),
    "mixed-codecs": dict(fragments=2, param_delay=1, state_delay=1, compression="params=int4,exp_avg=int8,exp_avg_sq=fp8"),
    "diloco-F3": dict(name="diloco", fragments=3, param_delay=1),
    "diloco-int8": dict(name="diloco", fragments=2, compression="int8"),
    "local-adam-F2": dict(name="local-adam", fragments=2, state_delay=1, compression="exp_avg=int4"),
    **{f"codec-{c}": dict(fragments=2, param_delay=1, state_delay=1, compression=c) for c in CODECS},
}


@pytest.mark.parametrize("T", [23, 24])
@pytest.mark.parametrize("case", list(LEDGER_CASES))
def test_ledger_equals_expected_bytes(case, T):
    kw = {"period_x": 4, "period_u": 6, "period_v": 8, **LEDGER_CASES[case]}
    if kw.get("name") in ("diloco", "local-adam"):
        kw.pop("period_u"), kw.pop("period_v")
    params, opt = build(total_steps=T, **kw)
    train(params, opt, 0, T)
    opt.finish_syncs()
    assert opt.comm.ledger.total_bytes == opt.expected_bytes(T)
    assert sum(opt.comm.ledger.summary()["bytes_by_tag"].values()) == opt.expected_bytes(T)


def test_ledger_bytes_by_hand_int8_fragments():
    """keep-states, K_x = 4, F = 2, int8, T = 8, N = 221 split 110 / 111: fragment 0 at steps 2, 6
    and once more at the end (not averaged at step 8), fragment 1 at 4, 8:
    3 (110 + 4 ceil(110/64)) + 2 (111 + 4 ceil(111/64)) bytes."""
    params, opt = build("keep-states", period_x=4, fragments=2, compression="int8", total_steps=8)
    train(params, opt, 0, 8)
    assert opt.comm.ledger.summary()["bytes_by_tag"] == {"params": 2 * (110 + 8) + 2 * (111 + 8)}
    opt.finish_syncs()
    assert opt.comm.ledger.summary()["bytes_by_tag"] == {"params": 3 * (110 + 8) + 2 * (111 + 8)}
    assert opt.expected_bytes(8) == 3 * (110 + 8) + 2 * (111 + 8)


# --------------------------------------------------------------------------- 3. fragments
@pytest.mark.parametrize("kw", [dict(fragments=2), dict(fragments=3, param_delay=1), dict(fragments=4, state_delay=1),
                                dict(fragments=2, fragment_alpha=0.5, param_delay=1),
                                dict(name="diloco", fragments=3, param_delay=2, fragment_alpha=0.3),
                                dict(fragments=3, compression="params=int8")],
                         ids=str)
@pytest.mark.parametrize("T", [13, 16])
def test_final_flush_makes_every_worker_equal(kw, T):
    kw = {"period_x": 4, **kw}
    if kw.get("name") != "diloco":
        kw.update(period_u=6, period_v=8)
    params, opt = build(total_steps=T, **kw)
    train(params, opt, 0, T)
    assert not all(workers_equal(p) for p in params), "vacuous: the workers already agree before the flush"
    opt.finish_syncs()
    for i, p in enumerate(params):
        assert workers_equal(p), f"param {i} differs across workers after finish_syncs"
    assert not opt.delayed_syncs


@pytest.mark.numerics
def test_hand_traced_two_fragments():
    """keep-states, SGD momentum, K_x = 4, F = 2 (tags: params only, so no shift): fragment 0
    (first 110 flat elements) is averaged at steps 2, 6, ..., fragment 1 (the other 111) at 4, 8.
    The local trajectory is that of the same run with no sync in the first 4 steps (K_x = 8)."""
    params, opt = build("keep-states", inner="sgdm", period_x=4, fragments=2)
    local, lopt = build("keep-states", inner="sgdm", period_x=8)
    assert [opt.schedule.residue("params", f) for f in (0, 1)] == [2, 0]
    half = N // 2
    for t in range(2):
        train(local, lopt, t, t + 1)
        train(params, opt, t, t + 1)
    flat, lflat = opt.flat_buffers("params")[0], lopt.flat_buffers("params")[0]
    expect = (lflat[0, :half] + lflat[1, :half]) / 2  # a 2-term mean: the same in any order
    assert torch.equal(flat[0, :half], expect) and torch.equal(flat[1, :half], expect)
    assert torch.equal(flat[:, half:], lflat[:, half:]), "fragment 1 was touched at step 2"
    assert not workers_equal(flat[:, half:])
    # step 3: local steps from the (partly) averaged parameters; step 4: fragment 1 only
    train(params, opt, 2, 3)
    before = flat.clone()
    train(params, opt, 3, 4)
    assert workers_equal(flat[:, half:]) and not workers_equal(flat[:, :half])
    # the averaged fragment 1 is the mean of what the inner step left: recompute that step by hand
    # (SGD momentum, wd 0.01: d = g + wd x; buf = mu buf + d; x -= lr buf) from the step-3 values
    buf = torch.cat([opt.inner.state[p]["momentum_buffer"].reshape(M, -1) for p in params], dim=1)
    x_local = before.add(buf, alpha=-0.05)  # step 4's update, as torch's SGD: x.add_(buf, alpha=-lr)
    assert torch.equal(flat[0, :half], x_local[0, :half]) and torch.equal(flat[1, :half], x_local[1, :half])
    expect = (x_local[0, half:] + x_local[1, half:]) / 2
    assert torch.equal(flat[0, half:], expect)


# ------------------------------------------------------------------------- 4. state delay
def _adamw_step(x, s, g, t, lr, b1, b2, eps, wd):
    x.mul_(1 - lr * wd)
    s["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
    s["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (s["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
    x.addcdiv_(s["exp_avg"], denom, value=-lr / (1 - b1 ** t))


def _sgdm_step(x, s, g, t, lr, mu):
    if "momentum_buffer" not in s:
        s["momentum_buffer"] = g.clone()
    else:
        s["momentum_buffer"].mul_(mu).add_(g)
    x.add_(s["momentum_buffer"], alpha=-lr)


def naive_desloc(inner: str, periods: dict, param_delay: int, state_delay: int, T: int, world: int = M):
    """DES-LOC with delayed parameter and state averages, F = 1, written out per worker and per
    parameter in float64: after the local step t, apply every average whose step has come, then
    launch the due ones (last-step rule: a state average launched at t is sent only if
    t + D < T); at the end apply what is still in flight."""
    lr = 0.05 if inner == "sgdm" else 0.01
    x0 = make_params(world, torch.float64)
    xs = [[p[m].clone() for p in x0] for m in range(world)]
    st: list[list[dict]] = [[({} if inner == "sgdm" else {"exp_avg": torch.zeros_like(p[m]),
                                                           "exp_avg_sq": torch.zeros_like(p[m])})
                             for p in x0] for m in range(world)]
    beta = {"exp_avg": 0.9, "exp_avg_sq": 0.999, "momentum_buffer": 0.9}
    pending: list[tuple[int, str, list, list]] = []  # (apply step, tag, mean per param, snap[m][i])

    def apply(tag, mean, snap):
        for m in range(world):
            for i in range(len(x0)):
                if tag == "params":
                    xs[m][i] += mean[i] - snap[m][i]
                else:
                    s = st[m][i][tag]
                    s += beta[tag] ** state_delay * (mean[i] - snap[m][i])
                    if tag == "exp_avg_sq":
                        s.clamp_(min=0)

    def values(tag):
        return [[(xs[m][i] if tag == "params" else st[m][i][tag]) for i in range(len(x0))] for m in range(world)]

    for t in range(T):
        step = t + 1
        grads = grads_at(t, world, torch.float64)
        for m in range(world):
            for i in range(len(x0)):
                if inner == "sgdm":
                    _sgdm_step(xs[m][i], st[m][i], grads[i][m], step, lr, 0.9)
                else:
                    _adamw_step(xs[m][i], st[m][i], grads[i][m], step, lr, 0.9, 0.999, 1e-8, 0.0)
        for item in [p for p in pending if p[0] <= step]:
            pending.remove(item)
            apply(*item[1:])
        for tag, k in periods.items():
            delay = param_delay if tag == "params" else state_delay
            if step % k or (tag != "params" and step + delay >= T):
                continue
            vals = values(tag)
            snap = [[v.clone() for v in row] for row in vals]
            mean = [sum(snap[m][i] for m in range(world)) / world for i in range(len(x0))]
            if delay:
                pending.append((step + delay, tag, mean, snap))
            else:
                for m in range(world):
                    for i in range(len(x0)):
                        vals[m][i].copy_(mean[i])
    for item in pending:
        apply(*item[1:])
    return ([torch.stack([xs[m][i] for m in range(world)]) for i in range(len(x0))],
            {f"{i}.{k}": torch.stack([st[m][i][k] for m in range(world)]) for i in range(len(x0)) for k in st[0][i]})


DELAY_CASES = {
    "adamw pd1 sd2": ("adamw", dict(period_x=2, period_u=3, period_v=5), 1, 2),
    "adamw pd0 sd1": ("adamw", dict(period_x=4, period_u=4, period_v=6), 0, 1),
    "adamw pd3 sd1": ("adamw", dict(period_x=4, period_u=3, period_v=5), 3, 1),  # param delay > state delay
    "sgdm pd1 sd2": ("sgdm", dict(period_x=2, period_u=3), 1, 2),
    "sgdm pd3 sd1": ("sgdm", dict(period_x=4, period_u=3), 3, 1),
}


@pytest.mark.numerics
@pytest.mark.parametrize("case", list(DELAY_CASES))
def test_state_delay_matches_float64_reference(case):
    inner, periods, pd, sd = DELAY_CASES[case]
    T = 17
    params, opt = build(inner=inner, dtype=torch.float64, total_steps=T, param_delay=pd, state_delay=sd,
                        weight_decay=0.0, **periods)
    train(params, opt, 0, T)
    opt.finish_syncs()
    got = snapshot(params, opt)
    ref_x, ref_s = naive_desloc(inner, {"params": periods["period_x"],
                                        **({"momentum_buffer": periods["period_u"]} if inner == "sgdm" else
                                           {"exp_avg": periods["period_u"], "exp_avg_sq": periods["period_v"]})},
                                pd, sd, T)
    for i, (a, b) in enumerate(zip(got["params"], ref_x)):
        assert (a - b).abs().max().item() <= 1e-12, f"{case}: param {i} off by {(a - b).abs().max().item():.3e}"
    for k, b in ref_s.items():
        a = got["states"][k]
        assert (a - b).abs().max().item() <= 1e-12, f"{case}: state {k} off by {(a - b).abs().max().item():.3e}"


@pytest.mark.numerics
@pytest.mark.parametrize("inner,periods,D", [
    ("adamw", dict(period_x=4, period_u=5, period_v=7), 3),
    ("adamw", dict(period_x=4, period_u=4, period_v=6, param_delay=3), 1),
    ("sgdm", dict(period_x=4, period_u=5), 4),
    ("sgdm", dict(period_x=4, period_u=3, param_delay=3), 1),
])
def test_delayed_state_equals_instant_average_with_the_same_contributions(inner, periods, D):
    """Gradients independent of the parameters: after a delayed state average is applied (t0 + D),
    the states equal those of the run whose average arrived at t0 (float64, 1e-12); between
    launch and application they differ (the test is not vacuous)."""
    T = 30
    a_params, a = build(inner=inner, dtype=torch.float64, state_delay=D, weight_decay=0.0, **periods)
    b_params, b = build(inner=inner, dtype=torch.float64, state_delay=0, weight_decay=0.0, **periods)
    state_k = {n: k for n, k in b.state_periods.items() if k is not None}
    compared = differed = 0
    for t in range(T):
        train(a_params, a, t, t + 1)
        train(b_params, b, t, t + 1)
        a.wait_for_syncs(), b.wait_for_syncs()
        step = t + 1
        for name, k in state_k.items():
            in_flight = any(t0 <= step < t0 + D for t0 in range(k, step + 1, k))
            for pa, pb in zip(a_params, b_params):
                diff = (a.inner.state[pa][name] - b.inner.state[pb][name]).abs().max().item()
                if in_flight:
                    differed += diff > 1e-9
                elif step > k:
                    compared += 1
                    assert diff <= 1e-12, f"{name} at step {step}: off by {diff:.3e}"
    assert compared and differed


def test_v_stays_nonnegative_with_tiny_values():
    """Tiny, sparse gradients (v near 0) with delayed averages and int4 on v (whose decoded mean
    can undershoot): every v is >= 0 after every step."""
    def check(step):
        opt.wait_for_syncs()
        for p in params:
            assert opt.inner.state[p]["exp_avg_sq"].min().item() >= 0, f"negative v at step {step}"

    for compression in (None, "exp_avg_sq=int4"):
        params, opt = build(period_x=4, period_u=4, period_v=4, state_delay=3, fragments=2, compression=compression)
        train(params, opt, 0, 25, scale=1e-19, after=check)
        opt.finish_syncs()
        check(25)


class FooOptimizer(torch.optim.Optimizer):
    """Elementwise, with a per-coordinate state "foo" that is not an EMA desloc knows."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                s = self.state[p]
                if "foo" not in s:
                    s["foo"] = torch.zeros_like(p)
                s["foo"].add_(p.grad.abs())
                p.add_(p.grad / (1 + s["foo"]), alpha=-group["lr"])


register_elementwise(FooOptimizer)


def test_unknown_state_refuses_state_delay():
    params = make_params()
    opt = DesLoc(FooOptimizer(params), SimulatedComm(M), 2, {"foo": 4}, state_delay=1)
    for p, g in zip(params, grads_at(0)):
        p.grad = g
    with pytest.raises(ConfigError, match=r"state-delay.*'foo'.*--state-delay 0"):
        opt.step()
    params = make_params()  # without a delay it trains and syncs "foo"
    opt = DesLoc(FooOptimizer(params), SimulatedComm(M), 2, {"foo": 4})
    train(params, opt, 0, 4)
    assert workers_equal(opt.inner.state[params[0]]["foo"])


# ------------------------------------------------------------------------ 5. compression
@pytest.mark.numerics
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("world", [2, 3])
def test_compressed_tags_are_bitwise_equal_on_every_worker_after_each_sync(codec, world):
    params, opt = build(world=world, period_x=4, period_u=4, period_v=8, fragments=2, compression=codec)
    seen = set()

    def check(step):
        opt.wait_for_syncs()
        for tag, f in opt.schedule.due_fragments(step):
            seen.add(tag)
            for buf in fastsync.fragment_slices(opt.flat_buffers(tag), 2, f, True):
                assert workers_equal(buf), f"{codec}: {tag} fragment {f} differs across workers at step {step}"
            for shared in opt._compressed[tag].slices("shared", 2, f, True):
                assert torch.equal(shared, buf)  # the shared value is what every worker holds
    train(params, opt, 0, 16, after=check)
    assert seen == {"params", "exp_avg", "exp_avg_sq"}


@pytest.mark.numerics
def test_compressed_rule_by_hand_int8():
    """M = 2, n = 3 (one parameter), keep-states K_x = 2, params=int8. S_0 = x_0, e = 0;
    delta = x - S + e, q = Q(delta), e <- delta - Q^-1(q), S <- S + (Q^-1(q_0) + Q^-1(q_1)) / 2."""
    codec = get_codec("int8")
    x = torch.tensor([[0.5, -1.0, 0.25]]).repeat(2, 1)
    icfg = InnerConfig("adamw", lr=0.1)
    opt = build_method(MethodConfig("keep-states", period_x=2, compression="params=int8"), icfg.build([x]),
                       SimulatedComm(2), icfg.state_roles())
    pre = []
    opt.inner.register_step_post_hook(lambda o, a, k: pre.append(x.detach().clone()))  # after the local step
    S = x.detach().clone()
    e = torch.zeros_like(x)
    g = torch.Generator().manual_seed(3)
    for step in range(1, 9):
        x.grad = torch.randn(2, 3, generator=g)
        opt.step()
        if step % 2:
            assert torch.equal(x, pre[-1])
            continue
        delta = pre[-1] - S + e
        rows = [codec.encode(delta[m]) for m in range(2)]  # each worker encodes its own row
        dec = [codec.decode(r, 3) for r in rows]
        e = torch.stack([delta[m] - dec[m] for m in range(2)])
        S = S + (dec[0] + dec[1]) / 2
        assert torch.equal(x, S.expand(2, 3)), f"step {step}: {x} vs {S}"
        comp = opt._compressed["params"]
        assert torch.equal(comp.error[0], e) and torch.equal(comp.shared[0], S)
        assert e.abs().max() > 0, "int8 lost nothing: the error feedback is not exercised"
    # the codec itself, by hand: scale = 1/127, 0.5 * 127 = 63.5 -> 64 (half to even), 0.25 * 127 = 31.75 -> 32
    p = codec.encode(torch.tensor([0.5, -1.0, 0.25]))
    assert p[:3].view(torch.int8).tolist() == [64, -127, 32]
    assert torch.equal(p[3:].clone().view(torch.float32), torch.tensor([1.0]) / 127)


@pytest.mark.numerics
def test_two_half_compressed_all_reduce_by_hand_int8():
    """M = 3, n = 5 (one parameter), keep-states K_x = 2, params=int8: from M = 3 on a compressed sync is
    a reduce-scatter of encoded chunks and an all-gather of the reduced ones (fastsync's docstring).
    Chunks of c = ceil(5 / 3) = 2 (zero padded to 6): worker m encodes chunk j of delta^m for worker j;
    owner j decodes the three chunks, takes their mean in rank order, adds its error e2_j, encodes
    again (e2_j keeps the loss); S <- S + the decoded owners' chunks [:5]. The ledger counts 3 encoded
    chunks per worker and sync, priced as one all-reduce of them."""
    codec, m, n, c = get_codec("int8"), 3, 5, 2
    x = torch.tensor([[0.5, -1.0, 0.25, 2.0, -0.125]]).repeat(m, 1)
    icfg = InnerConfig("adamw", lr=0.1)
    opt = build_method(MethodConfig("keep-states", period_x=2, compression="params=int8"), icfg.build([x]),
                       SimulatedComm(m), icfg.state_roles())
    pre = []
    opt.inner.register_step_post_hook(lambda o, a, k: pre.append(x.detach().clone()))
    S, e = x[0].detach().clone(), torch.zeros(m, n)
    e2 = torch.zeros(m, c)
    g = torch.Generator().manual_seed(5)
    syncs = 0
    for step in range(1, 9):
        x.grad = torch.randn(m, n, generator=g)
        opt.step()
        if step % 2:
            continue
        syncs += 1
        delta = pre[-1] - S + e
        padded = torch.zeros(m, m * c)
        padded[:, :n] = delta
        chunks = [[codec.encode(padded[w, j * c:(j + 1) * c]) for j in range(m)] for w in range(m)]
        e = delta - torch.stack([torch.cat([codec.decode(chunks[w][j], c) for j in range(m)])[:n] for w in range(m)])
        owners = []
        for j in range(m):
            r = codec.decode(chunks[0][j], c).clone()
            for w in range(1, m):
                r += codec.decode(chunks[w][j], c)
            r = r / m + e2[j]
            q = codec.encode(r)
            e2[j] = r - codec.decode(q, c)
            owners.append(codec.decode(q, c))
        S = S + torch.cat(owners)[:n]
        assert torch.equal(x, S.expand(m, n)), f"step {step}: {x} vs {S}"
        comp = opt._compressed["params"]
        assert torch.equal(comp.error[0], e) and torch.equal(comp.owner_error["0:0"], e2)
    assert e2.abs().max() > 0, "the owners' re-encoding lost nothing: e2 is not exercised"
    assert opt.comm.ledger.summary()["bytes_by_tag"]["params"] == syncs * m * codec.nbytes(c) == opt.expected_bytes(8)


def _ddp_topk(steps: int, feedback: bool, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """DDP with topk:0.1 (1 of 10 entries) on a constant per-worker gradient; returns (the
    time-average of the averaged gradient the inner step saw, the true mean)."""
    if not feedback:
        real = fastsync.CompressedTag.message

        def no_feedback(self, x, shared, error):
            payload = real(self, x, shared, error)
            error.zero_()
            return payload
        monkeypatch.setattr(fastsync.CompressedTag, "message", no_feedback)
    x = torch.zeros(2, 10)
    icfg = InnerConfig("sgdm", lr=1e-3, momentum=0.0)
    opt = build_method(MethodConfig("ddp", period_x=1, compression="topk:0.1"), icfg.build([x]), SimulatedComm(2),
                       icfg.state_roles())
    seen = []
    opt.inner.register_step_pre_hook(lambda o, a, k: seen.append(x.grad.detach().clone()))
    g = torch.linspace(0.1, 1.0, 20).reshape(2, 10)
    for _ in range(steps):
        x.grad = g.clone()
        opt.step()
    return torch.stack(seen).mean(dim=0), g.mean(dim=0).expand(2, 10)


def test_error_feedback_removes_the_bias(monkeypatch):
    avg, true = _ddp_topk(400, True, monkeypatch)
    # sum of what was sent = T g - e_T, |e_T| bounded: the time-average is within |e_T| / T
    assert (avg - true).abs().max().item() < 0.02
    avg, true = _ddp_topk(400, False, monkeypatch)
    assert (avg - true).abs().max().item() > 0.3  # without feedback only the largest entry is ever sent


def test_v_nonnegative_under_int4():
    """int4 on every tag, v synced every 2 steps: every v >= 0 after every step."""
    params, opt = build(period_x=2, period_u=2, period_v=2, compression="int4")

    def check(step):
        opt.wait_for_syncs()
        for p in params:
            assert opt.inner.state[p]["exp_avg_sq"].min().item() >= 0, f"negative v at step {step}"
    train(params, opt, 0, 20, scale=0.3, after=check)


def test_combine_clamps_a_nonnegative_tag_at_zero():
    """S + mean of the decoded changes can undershoot 0 (a small v next to a large one in its int4
    block): S = 0.1, delta = -0.1 -> code round(-0.7) = -1 -> -1/7, S + mean = 0.1 - 1/7 < 0.
    Clamped for a non-negative tag, kept for another."""
    codec = get_codec("int4")
    delta = torch.tensor([[-0.1, 1.0], [-0.1, 1.0]])
    gathered = codec.encode(delta)
    for nonneg in (True, False):
        comp = fastsync.CompressedTag(codec, [torch.zeros(2, 2)], "zeros")
        comp.shared[0][:, 0] = 0.1
        out = comp.combine(gathered, 2, comp.shared[0], nonneg)
        raw = torch.tensor([0.1, 0.0]) + codec.decode(gathered, 2)[0]
        assert raw[0] < 0
        expect = raw.clamp(min=0) if nonneg else raw
        assert torch.equal(out, expect.expand(2, 2)) and out is comp.shared[0]


@pytest.mark.numerics
@pytest.mark.parametrize("codec", CODECS)
def test_ddp_compressed_gradient(codec):
    params, opt = build("ddp", period_x=1, compression=codec)
    seen = []
    opt.inner.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.detach().clone() for p in params]))
    train(params, opt, 0, 7)
    raw = grads_at(0)
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], raw))  # the inner step saw the decoded mean
    for grads in seen:
        for g in grads:
            assert workers_equal(g)
    assert opt.comm.ledger.summary()["bytes_by_tag"] == {"grads": 7 * get_codec(codec).nbytes(N)}
    assert opt.comm.ledger.total_bytes == opt.expected_bytes(7)
    # step 1 by hand: e = 0, every worker's gradient encoded, decoded, rows summed in rank order / M
    flat = torch.cat([g.reshape(M, -1) for g in raw], dim=1)
    c = get_codec(codec)
    dec = [c.decode(c.encode(flat[m]), N) for m in range(M)]
    assert torch.equal(torch.cat([g[0].reshape(-1) for g in seen[0]]), (dec[0] + dec[1]) / 2)


# ------------------------------------------------------------------------- 6. checkpoints
RESUME_CASES = {
    "desloc F2 pd1 sd1 int8": dict(period_x=4, period_u=6, period_v=8, fragments=2, param_delay=1, state_delay=1,
                                   compression="int8"),
    "desloc F3 pd2 sd2 mixed": dict(period_x=6, period_u=6, period_v=9, fragments=3, param_delay=2, state_delay=2,
                                    compression="params=int4,exp_avg=int8", fragment_alpha=0.25),
    "diloco F2 pd1": dict(name="diloco", period_x=4, fragments=2, param_delay=1),
    "diloco F2 pd1 int8": dict(name="diloco", period_x=4, fragments=2, param_delay=1, compression="int8"),
    "ddp int8": dict(name="ddp", period_x=1, compression="int8"),
}


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.numerics
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bitwise_with_syncs_in_flight(case):
    T = 6  # desloc F2: params fragment 0 (step 6, d = 1) and exp_avg fragment 1 (step 6) in flight
    kw = RESUME_CASES[case]
    straight = run(2 * T, total_steps=2 * T, **kw)

    params, opt = build(total_steps=2 * T, **kw)
    train(params, opt, 0, T)
    if kw.get("name") != "ddp":
        assert opt.delayed_syncs, "nothing in flight at the checkpoint"
    sd = _roundtrip(opt.state_dict())
    values = [p.detach().clone() for p in params]
    fresh_params, fresh = build(total_steps=2 * T, **kw)
    for p, v in zip(fresh_params, values):
        p.copy_(v)
    fresh.load_state_dict(sd)
    train(fresh_params, fresh, T, 2 * T)
    fresh.finish_syncs()
    assert_same(straight, snapshot(fresh_params, fresh), case)


# --------------------------------------------------------------------------- 7. refusals
@pytest.mark.parametrize("kw,match", [
    (dict(name="reset-states", fragments=2), r"--fragments"),
    (dict(name="reset-states", compression="int8"), r"--compress"),
    (dict(name="desloc", fragment_alpha=1.0), r"fragment_alpha.*\[0, 1\).*1\.0"),
    (dict(name="desloc", fragment_alpha=-0.1), r"fragment_alpha.*-0\.1"),
    (dict(name="gasloc", fragments=2), r"--fragments"),
    (dict(name="ddp", period_x=1, fragments=2), r"--fragments"),
    (dict(name="desloc", period_x=4, fragments=5), r"fragments=5 > K_x=4.*--fragments 4"),
    (dict(name="desloc", fragments=0), r"fragments.*>= 1.*0"),
    (dict(name="desloc", state_delay=-1), r"state_delay.*-1"),
    (dict(name="keep-states", state_delay=1), r"--state-delay"),
    (dict(name="desloc", compression="zip"), r"unknown compression codec 'zip'"),
])
def test_config_refusals(kw, match):
    kw = {"period_x": 4, **kw}
    with pytest.raises(ConfigError, match=match):
        MethodConfig(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(period_x=4, period_u=8, period_v=16, state_delay=8), r"state_delay.*smallest state period = 8.*got 8"),
    (dict(name="local-adam", period_x=4, state_delay=4), r"state_delay.*= 4.*got 4"),
    (dict(name="keep-states", period_x=4, compression="exp_avg=int8"), r"compression names \['exp_avg'\].*never syncs"),
    (dict(name="ddp", period_x=1, compression="params=int8"), r"ddp.*'grads'.*\['params'\]"),
])
def test_build_refusals(kw, match):
    with pytest.raises(ConfigError, match=match):
        build(**kw)


def test_reset_states_class_refuses_fragments_and_compression():
    for extra in (dict(fragments=2), dict(compression="int8")):
        with pytest.raises(ConfigError, match="reset-states"):
            DesLoc(InnerConfig("adamw").build(make_params()), SimulatedComm(M), 4, {"exp_avg": None, "exp_avg_sq": None},
                   reset_states_on_param_sync=True, **extra)


# ---------------------------------------------------------------------------- 8. contract
def contract_build(name: str, inner: str):
    params = [torch.randn(1, *s).repeat(contract.M, *([1] * len(s))) for s in contract.SHAPES]
    ic = InnerConfig(inner, lr=0.01)
    syncs_states = name in ("desloc", "local-adam")
    cfg = MethodConfig(name, period_x=2, fragments=2, compression="int8", state_delay=1 if syncs_states else 0)
    opt = build_method(cfg, ic.build(params), SimulatedComm(contract.M), ic.state_roles(), total_steps=20)
    return params, opt


@pytest.mark.parametrize("inner", ["adamw", "sgdm", "adopt"])
@pytest.mark.parametrize("name", ["desloc", "local-adam", "keep-states", "diloco"])
def test_contract_scheduler_and_round_trip(name, inner):
    torch.manual_seed(0)
    params, opt = contract_build(name, inner)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, contract._halving)
    for _ in range(3):
        contract.steps(params, opt, 1)
        sched.step()
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 3)
    assert opt.fragments == 2 and set(opt.compression.values()) == {"int8"}
    assert opt.state_delay == (1 if name in ("desloc", "local-adam") else 0)
    sd, sched_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    fresh_params, fresh = contract_build(name, inner)
    for a, b in zip(fresh_params, params):
        a.copy_(b)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh, contract._halving)
    fresh.load_state_dict(sd)
    fresh_sched.load_state_dict(sched_sd)
    assert fresh.global_step == 3
    for _ in range(4):
        contract.steps(params, opt, 1, seed=9)
        sched.step()
        contract.steps(fresh_params, fresh, 1, seed=9)
        fresh_sched.step()
    assert fresh.inner.param_groups[0]["lr"] == opt.inner.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 7)
    for a, b in zip(params, fresh_params):
        assert torch.equal(a, b)
    assert fresh.comm.ledger.state_dict() == opt.comm.ledger.state_dict()


def test_compressed_parameters_refuse_workers_that_start_apart():
    """S starts at x_0: workers that start from different parameters would never agree (each
    adds the same mean change to its own x_0), so the construction refuses them."""
    torch.manual_seed(0)
    x = torch.randn(2, 256).requires_grad_()
    icfg = InnerConfig("adamw")
    with pytest.raises(ConfigError, match="same parameters"):
        build_method(MethodConfig("desloc", period_x=1, period_u=1, period_v=1, compression="int8"),
                     icfg.build([x]), SimulatedComm(2), icfg.state_roles())
    same = torch.randn(1, 256).repeat(2, 1).requires_grad_()
    build_method(MethodConfig("desloc", period_x=1, period_u=1, period_v=1, compression="int8"),
                 icfg.build([same]), SimulatedComm(2), icfg.state_roles())  # accepted
