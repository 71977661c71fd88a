r"""DES-LOC: parameters and each optimizer state averaged on independent periods.

Update (DES-LOC, Iacob et al. 2025; averaging after the local step, Local-SGD convention)::

    for t = 0 .. T-1:
        every worker m:   g = clip(grad F(x^m; xi^m), rho)
                          (x^m, s^m) = OPT.step(x^m, s^m, g, lr_t)          # local
        if (t+1) % K_x == 0:  x^m   <- E_m[x]      for all m                 # tag "params"
        for each state j:
            if (t+1) % K_j == 0:  s^{j,m} <- E_m[s^j]   for all m            # tag = state name

States s^j are the names in ``state_periods`` (Adam: ``exp_avg`` = u, ``exp_avg_sq`` = v; SGD:
``momentum_buffer``; ``build_method`` takes them from the inner optimizer's declared state roles),
looked up by name in the inner optimizer's per-parameter state -- never guessed from shapes,
which cannot tell a 0-dim parameter's moments from a scalar counter. After the first step a
declared name the inner optimizer lacks is a ``ConfigError``, and so is a per-coordinate state
(a tensor with the parameter's shape, >= 1 dimension) nobody declared. Scalar counters (Adam's
``step``) are never communicated; every worker's counter is identical because all workers step
together. Sync decisions use the global step, so workers cannot disagree about what to send.

Symbols -> arguments: K_x -> ``period_x``; K_u, K_v (K_j) -> ``state_periods[name]``
(None = never); rho -> ``clip_rho``. Paper defaults K_u = 3 K_x, K_v = 6 K_x.

Communication, per step, in model-sized tensors: 1/K_x + sum_j 1/K_j. At (256, 768, 1536) this
is 1.5/256, i.e. 170.67x less than DDP and 2x less than Local Adam at K = 256.

Settings of the same class (the registry's names):
    local-adam    K_x = K_u = K_v = K                   (Cheng & Glasgow 2025)
    keep-states   K_u = K_v = None                       (FAVG+OPT: states stay local)
    reset-states  K_u = K_v = None, ``reset_states_on_param_sync``: at every parameter sync
                  the state tensors are zeroed (scalar counters such as Adam's ``step`` are
                  kept, so bias correction does not restart -- our reading of "reset to zero").
    diloco        K_u = K_v = None and an outer optimizer (below), K_x = H.
Reductions (tests/test_reductions.py): M = 1 or identical data -> plain OPT; sgdm with
K_x = K_u = 1 -> DDP-SGDM exactly; Adam with all K = 1 is *not* DDP-Adam (E[g^2] != E[g]^2).

Outer optimizer (DiLoCo, Douillard et al. 2023; "DES-LOC + Nesterov"): with ``outer`` given,
the parameter sync does not overwrite x with the average but feeds the pseudo-gradient to an
outer optimizer over an anchor copy xbar (the parameters at the start of the round)::

    xbar_0 = x_0
    at every parameter sync:   Delta = xbar - E_m[x^m]            (the all-reduce, tag "params")
                               xbar  = OUTER.step(xbar, Delta)     (default SGD lr 0.7, momentum
                                                                    0.9, Nesterov)
                               x^m   = xbar                        for all m

Communication is unchanged (one model-sized all-reduce per parameter sync). The anchor and the
outer optimizer's state are part of ``state_dict``. Outer SGD with lr 1 and no momentum gives
xbar - (xbar - E[x]) = E[x]: plain averaging (tests/test_outer.py).

``add_param_group`` (on every worker alike): the inner optimizer steps the new parameters and
they are averaged with the others; with an outer optimizer their anchor starts at their current
value (xbar_0 = x_0) and joins the outer optimizer as a new group of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from desloc.algorithms.base import LocalOptimizer
from desloc.comm.base import Communicator
from desloc.errors import CheckpointMismatchError, ConfigError, check_period


class DesLoc(LocalOptimizer):
    algorithm = "desloc"

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        comm: Communicator,
        period_x: int,
        state_periods: Mapping[str, int | None],
        reset_states_on_param_sync: bool = False,
        clip_rho: float | None = None,
        assume_elementwise: bool = False,
        outer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
    ):
        check_period("period_x", period_x)
        for name, period in state_periods.items():
            check_period(f"state_periods[{name!r}]", period, allow_none=True)
        super().__init__(inner, comm, clip_rho=clip_rho, assume_elementwise=assume_elementwise)
        self.period_x = period_x
        self.state_periods = dict(state_periods)
        self.reset_states_on_param_sync = bool(reset_states_on_param_sync)
        self._state_names: list[str] | None = None  # checked after the first local step
        self.anchor: list[torch.Tensor] | None = None
        self.outer: torch.optim.Optimizer | None = None
        if outer is not None:
            self.anchor = [p.detach().clone() for p in self.params]
            self.outer = outer(self.anchor)
            if not isinstance(self.outer, torch.optim.Optimizer):
                raise TypeError(f"outer must build a torch.optim.Optimizer, got {type(self.outer).__name__}")

    # ----------------------------------------------------------------- states
    def _validate_states(self) -> None:
        names = list(self.state_periods)
        self._check_declared_states(names, "state_periods")
        self._state_names = names

    def _on_param_group_added(self, params: list[torch.Tensor]) -> None:
        if self.outer is None or self.anchor is None:
            return
        new = [p.detach().clone() for p in params]
        self.anchor += new
        self.outer.add_param_group({"params": new})

    # -------------------------------------------------------------------- sync
    def _after_local_step(self) -> None:
        if self._state_names is None:
            self._validate_states()
        t = self.global_step
        params_due = t % self.period_x == 0
        tensors: list[torch.Tensor] = []
        tags: list[str] = []
        if params_due:
            tensors += self._param_sync_tensors()
            tags += ["params"] * (len(tensors) - len(tags))
        for name in self._state_names or []:
            period = self.state_periods[name]
            if period is not None and t % period == 0:
                states = self.state_tensors(name)
                tensors += states
                tags += [name] * len(states)
        if tensors:
            self.comm.all_reduce_mean(tensors, tags)
        if params_due:
            self._finish_param_sync()
            if self.reset_states_on_param_sync:
                for name in self._state_names or []:
                    for s in self.state_tensors(name):
                        s.zero_()

    def _param_sync_tensors(self) -> list[torch.Tensor]:
        """What to average at a parameter sync (overridden by outer-optimizer variants)."""
        return self.params

    def _finish_param_sync(self) -> None:
        """After the parameter all-reduce: the outer step on Delta = xbar - E[x], if any."""
        if self.outer is None or self.anchor is None:
            return
        # xbar_0 = x_0 needs every worker to start from the same parameters (as DDP does).
        if self.comm.stacked and not all(torch.equal(a[0].expand_as(a), a) for a in self.anchor):
            raise ConfigError("an outer optimizer needs every worker to start from the same "
                              "parameters; initialise the replicas identically (StackedReplicas does)")
        for xbar, x in zip(self.anchor, self.params):
            xbar.grad = xbar - x  # x holds E_m[x^m] now
        self.outer.step()
        for xbar, x in zip(self.anchor, self.params):
            x.copy_(xbar)
            xbar.grad = None

    def _extra_state(self) -> dict[str, Any]:
        if self.outer is None or self.anchor is None:
            return {}
        return {"anchor": [a.detach().clone() for a in self.anchor], "outer": self.outer.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if self.outer is None or self.anchor is None:
            return
        if len(state["anchor"]) != len(self.anchor):
            raise CheckpointMismatchError(f"checkpoint has {len(state['anchor'])} outer anchors but this "
                                          f"optimizer has {len(self.anchor)} parameters")
        for a, saved in zip(self.anchor, state["anchor"]):
            a.copy_(saved)
        self.outer.load_state_dict(state["outer"])

    # ------------------------------------------------------------------ record
    def config_dict(self) -> dict[str, Any]:
        return {
            **super().config_dict(),
            "period_x": self.period_x,
            "state_periods": dict(self.state_periods),
            "reset_states_on_param_sync": self.reset_states_on_param_sync,
            "outer": None if self.outer is None else {
                "optimizer": type(self.outer).__name__,
                **{k: v for k, v in self.outer.defaults.items() if k in ("lr", "momentum", "nesterov", "dampening")},
            },
        }

    def expected_bytes(self, steps: int) -> int:
        """Bytes one worker sends over ``steps`` steps by the docstring's formula."""
        p_bytes = sum(self.comm.payload_bytes(p) for p in self.params)
        total = (steps // self.period_x) * p_bytes
        for name, period in self.state_periods.items():
            if period is not None:
                total += (steps // period) * sum(self.comm.payload_bytes(s) for s in self.state_tensors(name))
        return total
