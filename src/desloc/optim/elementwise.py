r"""The one update body of ADOPT and MT-DAO: N first momenta, one second moment, elementwise.

N first momenta u^j (decay beta_j), one second moment v, step direction d; t counts the
parameter's earlier calls (0 on the first), tau = t + 1.

ADOPT flavour (:func:`adopt_flavour_step`)::

    t = 0:     v <- g^2                                  (no parameter update, no decay)
    t >= 1:    n   = clamp(g / max(sqrt(v), eps), -t^(1/4), t^(1/4))   (v from step t - 1)
               u^j <- beta_j u^j + (1 - beta_j) n
               x   <- x (1 - lr wd) - lr d,   d = (1 - sum_j omega_j) n + sum_j omega_j u^j
                                              (ADOPT, no mixing weights: d = u^0)
               v   <- beta2 v + (1 - beta2) g^2

Adam flavour (:func:`adam_flavour_step`)::

    x   <- x (1 - lr wd);   u^j <- beta_j u^j + (1 - beta_j) g;   v <- beta2 v + (1 - beta2) g^2
    x   <- x - lr d / (sqrt(v) / sqrt(1 - beta2^tau) + eps),
           d = (1 - sum_j omega_j) g + sum_j omega_j u^j / (1 - beta_j^tau)

:class:`ElementwiseOptimizer` holds the state -- per parameter a 0-dim float ``step`` (t), the
momenta under the names its subclass gives (ADOPT: ``exp_avg``; MT-DAO: ``exp_avg_{j}``) and
``exp_avg_sq`` (v) -- and applies one step to all parameters of a group that share t (normally
all of them), op by op over the group's tensor lists. On the devices in :data:`FOREACH_DEVICES`
each op is one ``torch._foreach_*`` call: there (CPU) a foreach kernel is the per-tensor op run on
every tensor of its lists, so the bits equal a per-parameter loop (tests/test_elementwise.py
checks it). Elsewhere each op runs per tensor, until a device's foreach kernels are checked to
give the same bits: they need not (CUDA's per-tensor division by a Python scalar multiplies by its
reciprocal, torch's sources have its foreach kernel divide). The
two-sided clamp has no foreach kernel and runs per tensor.
Every operation is elementwise with shared scalars, so one instance over worker-stacked tensors
equals M independent instances.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from desloc.errors import ConfigError

Tensors = list[torch.Tensor]


def check_decay(owner: str, name: str, value: float, hint: str = "") -> None:
    """An EMA decay must lie in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{owner} {name} must be in [0, 1), got {value}{hint}")


def check_lr_eps_wd(owner: str, h: dict[str, Any], eps_hint: float) -> None:
    """lr >= 0, eps > 0, weight_decay >= 0 (NaN fails each)."""
    if not h["lr"] >= 0:
        raise ConfigError(f"{owner} lr must be >= 0, got {h['lr']}")
    if not h["eps"] > 0:
        raise ConfigError(f"{owner} eps must be > 0, got {h['eps']}; e.g. {eps_hint}")
    if not h["weight_decay"] >= 0:
        raise ConfigError(f"{owner} weight_decay must be >= 0, got {h['weight_decay']}; use 0 to disable")


# ---------------------------------------------------------------------- math over tensor lists
FOREACH_DEVICES = {"cpu"}
"""Device types whose ``torch._foreach_*`` kernels are known to give the per-tensor ops' bits."""


class ListOps:
    """Elementwise ops over tensor lists, by tensor method name: ``torch._foreach_<op>`` or, with
    ``foreach=False``, the method per tensor (list arguments zipped, scalars shared), as a list."""

    def __init__(self, foreach: bool):
        self.foreach = foreach

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if self.foreach:
            fn = getattr(torch, "_foreach_" + op)
        else:
            method = getattr(torch.Tensor, op)

            def fn(*args: Any, **kwargs: Any) -> list[Any]:
                columns = [a if isinstance(a, list) else itertools.repeat(a) for a in args]
                return [method(*row, **kwargs) for row in zip(*columns)]
        setattr(self, op, fn)  # resolved once per op
        return fn


_FOREACH, _PER_TENSOR = ListOps(foreach=True), ListOps(foreach=False)


def ops_for(tensors: Tensors) -> ListOps:
    """The list ops for ``tensors``' device: foreach kernels on :data:`FOREACH_DEVICES`."""
    first = tensors[0]
    device = "cpu" if first.is_cpu else first.device.type  # is_cpu: 40 ns, .device.type: 240 ns
    return _FOREACH if device in FOREACH_DEVICES else _PER_TENSOR


def normalized(ops: ListOps, grads: Tensors, exp_avg_sqs: Tensors, step: int, eps: float) -> Tensors:
    """n = clamp(g / max(sqrt(v), eps), -t^(1/4), t^(1/4)) per tensor, as new tensors."""
    denom = ops.sqrt(exp_avg_sqs)
    ops.clamp_min_(denom, eps)
    normed = ops.div(grads, denom)
    bound = step**0.25
    for n in normed:  # no two-sided foreach clamp; clamp_min_ + clamp_max_ would read twice
        n.clamp_(-bound, bound)
    return normed


def _mix(
    ops: ListOps, current: Tensors, momenta: Sequence[Tensors], weights: Sequence[float], rest: float,
) -> Tensors:
    """rest * current + sum_j weights[j] * momenta[j], new tensors. Zero weights are skipped:
    with rest = 0 the current gradient is not read at all."""
    out = ops.mul(current, rest) if rest != 0 else [torch.zeros_like(c) for c in current]
    for us, w in zip(momenta, weights):
        if w != 0:
            ops.add_(out, us, alpha=w)
    return out


def _ema_(ops: ListOps, avgs: Tensors, values: Tensors, beta: float) -> None:
    """avg <- beta avg + (1 - beta) value."""
    ops.mul_(avgs, beta)
    ops.add_(avgs, values, alpha=1 - beta)


def _ema_sq_(ops: ListOps, exp_avg_sqs: Tensors, grads: Tensors, beta2: float) -> None:
    """v <- beta2 v + (1 - beta2) g^2."""
    ops.mul_(exp_avg_sqs, beta2)
    ops.addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)


def _decay_(ops: ListOps, params: Tensors, lr: float, weight_decay: float) -> None:
    """x <- x (1 - lr wd), decoupled; nothing at wd = 0."""
    if weight_decay != 0:
        ops.mul_(params, 1 - lr * weight_decay)


def adopt_flavour_step(
    params: Tensors, grads: Tensors, momenta: Sequence[Tensors], exp_avg_sqs: Tensors, step: int,
    lr: float, betas: Sequence[float], omegas: Sequence[float] | None, beta2: float, eps: float,
    weight_decay: float,
) -> None:
    """One ADOPT-flavour step in place. ``momenta[j]`` holds u^j of every parameter; ``step`` is
    the number of earlier calls; ``omegas`` None: no mixing, x moves along u^0 (ADOPT)."""
    ops = ops_for(params)
    if step == 0:
        ops.copy_(exp_avg_sqs, ops.mul(grads, grads))
        return
    normed = normalized(ops, grads, exp_avg_sqs, step, eps)
    for us, beta in zip(momenta, betas):
        _ema_(ops, us, normed, beta)
    if omegas is None:
        direction = momenta[0]
    else:
        direction = _mix(ops, normed, momenta, omegas, max(0.0, 1.0 - sum(omegas)))
    _decay_(ops, params, lr, weight_decay)
    ops.add_(params, direction, alpha=-lr)
    _ema_sq_(ops, exp_avg_sqs, grads, beta2)


def adam_flavour_step(
    params: Tensors, grads: Tensors, momenta: Sequence[Tensors], exp_avg_sqs: Tensors, step: int,
    lr: float, betas: Sequence[float], omegas: Sequence[float], beta2: float, eps: float,
    weight_decay: float,
) -> None:
    """One Adam-flavour step in place (bias-corrected); arguments as :func:`adopt_flavour_step`."""
    ops = ops_for(params)
    tau = step + 1
    _decay_(ops, params, lr, weight_decay)
    for us, beta in zip(momenta, betas):
        _ema_(ops, us, grads, beta)
    _ema_sq_(ops, exp_avg_sqs, grads, beta2)
    corrected = [w / (1 - beta**tau) for w, beta in zip(omegas, betas)]  # omega_j / (1 - beta_j^tau)
    direction = _mix(ops, grads, momenta, corrected, max(0.0, 1.0 - sum(omegas)))
    denom = ops.sqrt(exp_avg_sqs)
    ops.div_(denom, math.sqrt(1 - beta2**tau))
    ops.add_(denom, eps)
    ops.addcdiv_(params, direction, denom, value=-lr)


STEPS: dict[str, Callable[..., None]] = {"adopt": adopt_flavour_step, "adam": adam_flavour_step}


# ---------------------------------------------------------------------------- the optimizer
class Rule(NamedTuple):
    """A group's update: flavour (a key of :data:`STEPS`), momentum state names, beta_j,
    omega_j (None: no mixing, ADOPT) and beta2."""

    flavour: str
    momenta: tuple[str, ...]
    betas: Sequence[float]
    omegas: Sequence[float] | None
    beta2: float


CPU_CHUNK = 1 << 15
"""Elements per foreach call on CPU. CPU foreach kernels run op by op over their lists, so one
call over a whole model streams every temporary through memory once per op; runs of about this
many elements keep a run's working set (x, g, u^j, v and the temporaries) in cache, and the
parameter loop costs one Python iteration per run instead of one per tensor. Off the CPU the
whole list is one run."""


def _runs(params: Tensors, idx: list[int]) -> list[list[int]]:
    """``idx`` cut into consecutive runs of at most :data:`CPU_CHUNK` elements (a larger tensor is
    a run of its own); one run off the CPU."""
    if params[idx[0]].device.type != "cpu":
        return [idx]
    runs: list[list[int]] = []
    size = CPU_CHUNK
    for i in idx:
        n = params[i].numel()
        if size + n > CPU_CHUNK:
            runs.append([])
            size = 0
        runs[-1].append(i)
        size += n
    return runs


def _by_step(counters: Tensors) -> dict[int, list[int]]:
    """{t: indices of the counters equal to t}, read in one call. All parameters of a group
    step together unless some had no gradient at some step; those keep their own t."""
    values = [counters[0].item()] if len(counters) == 1 else torch.stack(counters).tolist()
    groups: dict[int, list[int]] = {}
    for i, value in enumerate(values):
        groups.setdefault(int(value), []).append(i)
    return groups


def _local(tensors: Tensors) -> Tensors:
    """Each tensor's local part: a sharded DTensor's shard (``to_local()``, a view, so the update
    lands in the DTensor), any other tensor itself. The update is elementwise, so stepping every
    shard is stepping the whole tensor (FSDP2 workers, ``desloc train --shard``)."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


class ElementwiseOptimizer(torch.optim.Optimizer):
    """Base of :class:`~desloc.optim.adopt.ADOPT` and :class:`~desloc.optim.mtdao.MTDAO`.

    A subclass gives ``_validate(hyper)`` (raise :class:`ConfigError` naming the argument; run on
    the defaults and on every param group) and ``_rule(group)`` (its :class:`Rule`)."""

    def __init__(self, params, defaults: dict[str, Any]):
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, hyper: dict[str, Any]) -> None:
        raise TypeError(f"{type(self).__name__} must define _validate(hyper): ElementwiseOptimizer is a base class "
                        "(use ADOPT or MTDAO)")

    def _rule(self, group: dict[str, Any]) -> Rule:
        raise TypeError(f"{type(self).__name__} must define _rule(group): ElementwiseOptimizer is a base class "
                        "(use ADOPT or MTDAO)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate per-group overrides too."""
        self._validate({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def _state(self, p: torch.Tensor, momenta: tuple[str, ...]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            for name in momenta:
                state[name] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            rule = self._rule(group)
            states = [self._state(p, rule.momenta) for p in params]
            counters = [s["step"] for s in states]
            for t, idx in _by_step(counters).items():
                for run in _runs(params, idx):
                    ps, ss = [params[i] for i in run], [states[i] for i in run]
                    STEPS[rule.flavour](
                        _local(ps), _local([p.grad for p in ps]),
                        [_local([s[name] for s in ss]) for name in rule.momenta],
                        _local([s["exp_avg_sq"] for s in ss]), t, group["lr"], rule.betas, rule.omegas, rule.beta2,
                        group["eps"], group["weight_decay"],
                    )
            ops_for(counters).add_(counters, 1)
        return loss
