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

Overlapped state syncs (``overlap=True``, default): a state averaged after step t is first read
by step t+1's inner update, so its all-reduce is left in flight and waited for just before that
update (after step t+1's forward and backward): bitwise the blocking result
(:class:`~desloc.algorithms.base.SyncedOptimizer`). Parameters are read by the very next forward,
so their sync blocks -- unless delayed.

Delayed parameter sync (``param_delay = d``, 0 <= d < K_x; off by default because it changes the
algorithm; overlapped Local SGD, Streaming DiLoCo's delayed outer step, Douillard et al. 2025)::

    if t % K_x == 0:       x_snap = x^m;  launch E_m[x_snap]           (in flight for d steps)
    if t == t_0 + d:       x^m <- x^m + (E_m[x_snap] - x_snap)        (local progress since t_0 kept)
      with an outer optimizer:
                           xbar <- OUTER.step(xbar, xbar - E_m[x_snap])
                           x^m  <- x^m + (xbar - x_snap)

d = 0 is the blocking sync exactly (the code path is the blocking one, bit for bit); the rule with
d >= 1 is tested against a float64 reference (tests/test_flat.py). A checkpoint taken while
the snapshot is in flight waits for its all-reduce and stores E_m[x_snap] and x_snap with the
step to apply them, so a resumed run applies the same update at the same step.

The schedule is :class:`~desloc.algorithms.schedule.SyncSchedule` ``{"params": K_x, <state>: K_j}``.
``add_param_group`` (on every worker alike): the inner optimizer steps the new parameters and
they are averaged with the others; with an outer optimizer their anchor starts at their current
value (xbar_0 = x_0) and joins the outer optimizer as a new group of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from desloc.algorithms.base import SyncedOptimizer
from desloc.algorithms.outer import OuterFactory, OuterStep
from desloc.algorithms.schedule import SyncSchedule
from desloc.algorithms.spec import MethodSpec, outer_factory, state_periods
from desloc.comm.base import Communicator, PendingReduce
from desloc.errors import ConfigError, check_period


@dataclass
class DelayedParams:
    """A parameter sync in flight: E_m[x_snap] arrives in ``mean`` (flat buffers, once the
    handles are done), ``original`` holds x_snap; applied after step ``apply_step``. It covers
    the first ``n_params`` parameters: those that existed at the snapshot (a group added while it
    is in flight has no average in flight; its parameters are averaged from the next sync on)."""

    apply_step: int
    handles: list[PendingReduce]
    mean: list[torch.Tensor]
    original: list[torch.Tensor]
    n_params: int


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
        param_delay: int = 0,
        overlap: bool = True,
        zero_copy: bool = True,
    ):
        check_period("period_x", period_x)
        if isinstance(param_delay, bool) or not isinstance(param_delay, int) or not 0 <= param_delay < period_x:
            raise ConfigError(f"param_delay (--param-delay) must be an integer in [0, K_x={period_x}), got "
                              f"{param_delay!r}; 0 = blocking parameter sync, e.g. {min(4, period_x - 1)}")
        for name, period in state_periods.items():
            check_period(f"state_periods[{name!r}]", period, allow_none=True)
        super().__init__(inner, comm, clip_rho=clip_rho, assume_elementwise=assume_elementwise,
                         zero_copy=zero_copy, overlap=overlap)
        if param_delay and not self.zero_copy:
            raise ConfigError("param_delay needs the zero-copy sync path (zero_copy=True and a communicator with "
                              "flat all-reduces, as SimulatedComm and TorchDistComm)")
        self.param_delay = param_delay
        self.delayed: DelayedParams | None = None
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
    def _flat_tags(self) -> list[str]:
        return list(self.schedule.tags)

    def _after_local_step(self) -> None:
        if not self._states_checked:
            self._check_declared_states(list(self.state_periods), "state_periods")
            self._states_checked = True
        if self.delayed is not None and self.global_step >= self.delayed.apply_step:
            self._apply_delayed()
        due = self.schedule.due(self.global_step)
        states = [tag for tag in due if tag != "params"]
        hidden = [1 if self.overlap else 0] * len(states)
        if "params" in due and self.param_delay:
            original = [b.clone() for b in self.flat_buffers("params")]
            mean = [b.clone() for b in original]
            handles = self._sync(states, hidden, extra=[("params", mean, self.param_delay)])
            self.delayed = DelayedParams(self.global_step + self.param_delay, handles["params"], mean, original,
                                         len(self.params))
            self._in_flight += [h for tag in states for h in handles.get(tag, [])]
            return
        blocking_params = ["params"] if "params" in due else []
        handles = self._sync(blocking_params + states, [0] * len(blocking_params) + hidden)
        self._in_flight += [h for tag in states for h in handles.get(tag, [])]
        if blocking_params:
            self._finish_param_sync()
            self._reset_states()  # waits for this step's state averages first

    def _reset_states(self) -> None:
        if self.reset_states_on_param_sync:
            self._finish_in_flight()  # a state average still in flight would land on the zeros
            for name in self.state_periods:
                for s in self.state_tensors(name):
                    s.zero_()

    @torch.no_grad()
    def _apply_delayed(self) -> None:
        """x <- x + (E[x_snap] - x_snap); with an outer optimizer x <- x + (OUTER(xbar) - x_snap)."""
        delayed, self.delayed = self.delayed, None
        for h in delayed.handles:
            h.wait()
        buffers = self.flat_buffers("params")  # re-homed if a group was added since the snapshot
        layout, n = self._flat["params"], delayed.n_params
        if self.outer is None and n == len(self.params):
            for x, mean, original in zip(buffers, delayed.mean, delayed.original):
                x.add_(mean - original)
        elif self.outer is None:  # elementwise, so the same numbers as the flat update
            for x, mean, original in zip(self.params, layout.views_of(delayed.mean, n),
                                         layout.views_of(delayed.original, n)):
                x.add_(mean - original)
        else:  # the outer step sees the snapshot's parameters only (newer anchors get no gradient)
            self._check_common_start()
            self.outer.step(layout.views_of(delayed.mean, n))
            for x, xbar, original in zip(self.params, self.outer.anchor, layout.views_of(delayed.original, n)):
                x.add_(xbar - original)
                xbar.grad = None
        self._reset_states()

    def finish_syncs(self) -> None:
        """Apply a delayed parameter sync now, instead of ``param_delay`` steps after it was
        launched: at the end of training, so the final model is averaged as a blocking run's."""
        self.wait_for_syncs()
        if self.delayed is not None:
            self._apply_delayed()

    def wait_for_syncs(self) -> None:
        super().wait_for_syncs()
        if self.delayed is not None:
            for h in self.delayed.handles:
                h.wait()

    def _finish_param_sync(self) -> None:
        """After the parameter all-reduce: the outer step on Delta = xbar - E[x], if any."""
        if self.outer is None:
            return
        self._check_common_start()
        self.outer.step(self.params)  # self.params hold E_m[x^m] now
        self.outer.copy_to(self.params)

    def _check_common_start(self) -> None:
        # xbar_0 = x_0 needs every worker to start from the same parameters (as DDP does).
        first, *others = self.comm.local_workers
        if others and not all(torch.equal(self.comm.worker_view(a, w), self.comm.worker_view(a, first))
                              for a in self.outer.anchor for w in others):
            raise ConfigError("an outer optimizer needs every worker to start from the same "
                              "parameters; initialise the replicas identically (StackedReplicas does)")

    def _extra_state(self) -> dict[str, Any]:
        out = {} if self.outer is None else self.outer.state_dict()
        if self.delayed is not None:  # received (state_dict waited for it), not yet applied
            out["delayed_params"] = {"apply_step": self.delayed.apply_step, "n_params": self.delayed.n_params,
                                     "mean": [t.detach().clone() for t in self.delayed.mean],
                                     "original": [t.detach().clone() for t in self.delayed.original]}
        return out

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if self.outer is not None:
            self.outer.load_state_dict(state)
        self.delayed = None
        saved = state.get("delayed_params")
        if saved is not None:
            # on the parameters' devices (a checkpoint is read onto the CPU), one buffer per kind
            homes = self.flat_buffers("params")
            mean = [t.to(home.device, copy=True) for t, home in zip(saved["mean"], homes)]
            original = [t.to(home.device, copy=True) for t, home in zip(saved["original"], homes)]
            self.delayed = DelayedParams(int(saved["apply_step"]), [PendingReduce(t) for t in mean], mean,
                                         original, int(saved.get("n_params", len(self.params))))

    # ------------------------------------------------------------------ record
    def config_dict(self) -> dict[str, Any]:
        return {
            **super().config_dict(),
            "period_x": self.period_x,
            "state_periods": dict(self.state_periods),
            "reset_states_on_param_sync": self.reset_states_on_param_sync,
            **({"param_delay": self.param_delay} if self.param_delay else {}),  # older checkpoints: 0
            "outer": None if self.outer is None else {
                "optimizer": type(self.outer.optimizer).__name__, **self.outer.hyperparameters(),
            },
        }

    @property
    def anchor(self) -> list[torch.Tensor] | None:
        """The outer optimizer's anchor xbar (None without an outer optimizer)."""
        return None if self.outer is None else self.outer.anchor


# ------------------------------------------------------------------------------ method specs
_FIELDS = frozenset({"period_x", "period_u", "period_v", "clip_rho", "outer", "outer_lr", "outer_momentum",
                     "momentum_periods", "param_delay", "overlap"})
_NO_STATE_SYNC = _FIELDS - {"period_u", "period_v", "momentum_periods", "overlap"}


def _builder(reset_states: bool):
    def build(cfg, inner, comm, roles, kwargs) -> DesLoc:
        kwargs.setdefault("outer", outer_factory(cfg))
        kwargs.setdefault("param_delay", cfg.param_delay)
        kwargs.setdefault("overlap", cfg.overlap)
        return DesLoc(inner, comm, cfg.period_x, state_periods(cfg, roles), reset_states_on_param_sync=reset_states,
                      **kwargs)
    return build


SPECS = {
    "local-adam": MethodSpec("parameters and all optimizer states every K steps", _builder(False),
                             _FIELDS - {"momentum_periods"}, "tied",
                             why_fixed="syncs every state with the parameters (every K_x)"),
    "desloc": MethodSpec("parameters every K_x, first moment every K_u, second every K_v", _builder(False), _FIELDS,
                         "tunable", 3, 6),
    "keep-states": MethodSpec("parameters every K_x, optimizer states never (FAVG+OPT)", _builder(False),
                              _NO_STATE_SYNC, why_fixed="never syncs optimizer states"),
    "reset-states": MethodSpec("parameters every K_x, states zeroed at each parameter sync", _builder(True),
                               _NO_STATE_SYNC, why_fixed="zeroes optimizer states at each parameter sync",
                               reset_states=True),
    # the MT-DAO paper's K = 32 example: every period K_x
    "mtdao": MethodSpec("MT-DAO: N first momenta, each synced every K_j; x every K_x, v every K_v", _builder(False),
                        _FIELDS, "tunable", 1, 1, inner="mtdao"),
}
