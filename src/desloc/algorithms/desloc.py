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
    diloco        K_u = K_v = None and an outer optimizer, K_x = H (diloco.py).
Reductions (tests/test_reductions.py): M = 1 or identical data -> plain OPT; sgdm with
K_x = K_u = 1 -> DDP-SGDM exactly; Adam with all K = 1 is *not* DDP-Adam (E[g^2] != E[g]^2).

Outer optimizer ("DES-LOC + Nesterov"): with ``outer`` given, a parameter sync does not
overwrite x with E_m[x^m] but takes DiLoCo's outer step on the pseudo-gradient
xbar - E_m[x^m] (:mod:`desloc.algorithms.outer`; DiLoCo itself is :mod:`desloc.algorithms.diloco`).
Communication is unchanged: one model-sized all-reduce per parameter sync.

The schedule is :class:`~desloc.algorithms.schedule.SyncSchedule` ``{"params": K_x, <state>: K_j}``.
``add_param_group`` (on every worker alike): the inner optimizer steps the new parameters and
they are averaged with the others; with an outer optimizer their anchor starts at their current
value (xbar_0 = x_0) and joins the outer optimizer as a new group of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from desloc.algorithms.base import SyncedOptimizer
from desloc.algorithms.outer import OuterFactory, OuterStep
from desloc.algorithms.schedule import SyncSchedule
from desloc.comm.base import Communicator
from desloc.errors import ConfigError, check_period


class DesLoc(SyncedOptimizer):
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
        outer: OuterFactory | None = None,
    ):
        check_period("period_x", period_x)
        for name, period in state_periods.items():
            check_period(f"state_periods[{name!r}]", period, allow_none=True)
        super().__init__(inner, comm, clip_rho=clip_rho, assume_elementwise=assume_elementwise)
        self.period_x = period_x
        self.state_periods = dict(state_periods)
        self.schedule = SyncSchedule({"params": period_x, **self.state_periods})
        self.reset_states_on_param_sync = bool(reset_states_on_param_sync)
        self._states_checked = False
        self.outer = None if outer is None else OuterStep(self.params, outer)

    def _on_param_group_added(self, params: list[torch.Tensor]) -> None:
        if self.outer is not None:
            self.outer.add(params)

    # -------------------------------------------------------------------- sync
    def _after_local_step(self) -> None:
        if not self._states_checked:
            self._check_declared_states(list(self.state_periods), "state_periods")
            self._states_checked = True
        due = self.schedule.due(self.global_step)
        tensors: list[torch.Tensor] = []
        tags: list[str] = []
        for tag in due:
            group = self.params if tag == "params" else self.state_tensors(tag)
            tensors += group
            tags += [tag] * len(group)
        if tensors:
            self.comm.all_reduce_mean(tensors, tags)
        if "params" in due:
            self._finish_param_sync()
            if self.reset_states_on_param_sync:
                for name in self.state_periods:
                    for s in self.state_tensors(name):
                        s.zero_()

    def _finish_param_sync(self) -> None:
        """After the parameter all-reduce: the outer step on Delta = xbar - E[x], if any."""
        if self.outer is None:
            return
        # xbar_0 = x_0 needs every worker to start from the same parameters (as DDP does).
        first, *others = self.comm.local_workers
        if others and not all(torch.equal(self.comm.worker_view(a, w), self.comm.worker_view(a, first))
                              for a in self.outer.anchor for w in others):
            raise ConfigError("an outer optimizer needs every worker to start from the same "
                              "parameters; initialise the replicas identically (StackedReplicas does)")
        self.outer.step(self.params)  # self.params hold E_m[x^m] now
        self.outer.copy_to(self.params)

    def _extra_state(self) -> dict[str, Any]:
        return {} if self.outer is None else self.outer.state_dict()

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if self.outer is not None:
            self.outer.load_state_dict(state)

    # ------------------------------------------------------------------ record
    def config_dict(self) -> dict[str, Any]:
        return {
            **super().config_dict(),
            "period_x": self.period_x,
            "state_periods": dict(self.state_periods),
            "reset_states_on_param_sync": self.reset_states_on_param_sync,
            "outer": None if self.outer is None else {
                "optimizer": type(self.outer.optimizer).__name__, **self.outer.hyperparameters(),
            },
        }

    @property
    def anchor(self) -> list[torch.Tensor] | None:
        """The outer optimizer's anchor xbar (None without an outer optimizer)."""
        return None if self.outer is None else self.outer.anchor
