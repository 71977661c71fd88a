r"""GASLoC: gossip between sparse random peers, with a local outer optimizer and local steps.

The paper's exact accelerated rule is not public (the project's paper notes, section 5); this is
the design stated there, derived so that the complete graph recovers DiLoCo exactly.

Each worker i keeps an outer copy xbar_i and an outer momentum m_i. A round has H global steps;
worker i takes inner steps only in the first H_i of them (H_i <= H: a worker on a slow link does
fewer local steps; in the remaining H - H_i steps it is idle and its parameters and inner
states are left untouched). At the end of round r::

    Delta_i = xbar_i - x_i                                  (local pseudo-gradient)
    m_i     = mu m_i + Delta_i                              (outer SGD, Nesterov:
    xbar_i  = xbar_i - eta (Delta_i + mu m_i)                torch.optim.SGD on xbar_i)
    xbar_i  = sum_j W^(r)_ij xbar_j                          (gossip with this round's peers)
    x_i     = xbar_i

W^(r) is doubly stochastic (desloc.topology): a random perfect matching (one-peer), a random
cycle (two-peer), a ring, the complete graph, or none. Only the peers exchange, point to point.

Why the complete graph is DiLoCo: with W = 11^T/M and all xbar_i equal at the round start,
mean_i(xbar - eta(Delta_i + mu m_i)) = xbar - eta(mean Delta + mu mean m), and mean m obeys
DiLoCo's recursion mean m = mu mean m + mean Delta, because the outer step is linear. So every
xbar_i equals DiLoCo's xbar (tests/test_gasloc.py checks it to float rounding). With W = I
(topology none) the workers train independently.

Symbols -> arguments: H -> ``period``; H_i -> ``local_steps[i]``; eta, mu -> ``outer_lr``,
``outer_momentum`` (None: :func:`~desloc.algorithms.outer.default_outer_lr` (H) and
:func:`~desloc.algorithms.outer.default_outer_momentum` (H)); W -> ``topology`` (+ ``seed`` for the random ones).
Communication per round and worker: deg_i model-sized tensors (one-peer: 1, two-peer and ring:
2, complete: one all-reduce), counted per link in ``ledger.bytes_by_link``.
Idle steps cost nothing: the training loop runs no forward or backward for a worker that sits
out (:meth:`sitting_out`), and a process whose workers all sit out skips the inner step too.
Scalar counters such as Adam's ``step`` still advance (in both engines alike), so a worker that
sat out matches one whose step was computed and undone, bit for bit.

The inner states an idle worker keeps untouched are named by ``state_names`` (``build_method``
passes the inner optimizer's declared state roles, e.g. ``exp_avg``, ``exp_avg_sq``), never
guessed from shapes: a 0-dim parameter's moments look like scalar counters on torch.distributed.
After the first step a declared name the inner optimizer lacks, or an undeclared per-coordinate
state, is a ``ConfigError``.

``add_param_group`` (on every worker alike): the new parameters get an anchor (their current
value) that joins the outer optimizer as a new group and is gossiped with the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from desloc.algorithms.base import SyncedOptimizer
from desloc.algorithms.outer import OuterStep, default_outer_lr, default_outer_momentum, nesterov_sgd
from desloc.algorithms.schedule import SyncSchedule
from desloc.algorithms.spec import MethodSpec
from desloc.comm.base import Communicator
from desloc.errors import ConfigError, check_period
from desloc.topology import TOPOLOGIES, mixing


class GasLoc(SyncedOptimizer):
    algorithm = "gasloc"

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        comm: Communicator,
        period: int,
        topology: str = "one-peer",
        outer_lr: float | None = None,
        outer_momentum: float | None = None,
        nesterov: bool = True,
        local_steps: Sequence[int] | None = None,
        seed: int = 0,
        clip_rho: float | None = None,
        assume_elementwise: bool = False,
        state_names: Sequence[str] | None = None,
        zero_copy: bool = True,
        overlap: bool = True,
    ):
        check_period("period (H)", period)
        if state_names is None or isinstance(state_names, str):
            raise ConfigError("GasLoc needs state_names: the names of the inner optimizer's per-parameter "
                              "states (e.g. ['exp_avg', 'exp_avg_sq'] for Adam, [] for plain SGD; "
                              "InnerConfig.state_roles() gives them)")
        if topology not in TOPOLOGIES:
            raise ConfigError(f"unknown topology {topology!r}; choose one of {TOPOLOGIES}")
        m = comm.world_size
        local_steps = list(local_steps) if local_steps is not None else [period] * m
        if len(local_steps) != m or any(not isinstance(h, int) or not 1 <= h <= period for h in local_steps):
            raise ConfigError(f"local_steps (H_i) needs {m} integers in [1, H={period}], got {local_steps}; "
                              f"e.g. {[period] * (m - 1) + [max(1, period // 4)]}")
        # zero_copy / overlap are accepted for a uniform interface: gossip sends the outer copies
        # point to point (one flat send buffer per round) and has no state syncs to overlap.
        super().__init__(inner, comm, clip_rho=clip_rho, assume_elementwise=assume_elementwise,
                         zero_copy=zero_copy, overlap=overlap)
        self.period, self.topology, self.seed = period, topology, seed
        self.schedule = SyncSchedule({"params": period})
        self.local_steps = local_steps
        if outer_lr is None:
            outer_lr = default_outer_lr(period)
        if outer_momentum is None:
            outer_momentum = default_outer_momentum(period)
        self.outer = OuterStep(self.params, nesterov_sgd(outer_lr, outer_momentum, nesterov))
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.state_names = list(state_names)
        self._states_checked = False

    @property
    def anchor(self) -> list[torch.Tensor]:
        """Each worker's outer copy xbar_i (what is gossiped)."""
        return self.outer.anchor

    def _on_param_group_added(self, params: list[torch.Tensor]) -> None:
        self.outer.add(params)

    # ----------------------------------------------------------- idle workers
    def sitting_out(self) -> list[int]:
        """Workers that sit out the coming step of the round (its position >= H_i)."""
        pos = self.global_step % self.period  # 0-based position of the coming step
        return [w for w in range(self.comm.world_size) if pos >= self.local_steps[w]]

    def _declared_state_names(self) -> list[str]:
        return self.state_names

    def _tensors(self) -> list[torch.Tensor]:
        """Parameters and their declared per-coordinate states (what an idle worker keeps)."""
        out = list(self.params)
        for p in self.params:
            state = self.inner.state[p]
            out += [state[n] for n in self.state_names if n in state]
        return out

    def _before_local_step(self) -> None:
        self._clip()
        if self._skips_inner_step():  # nothing here computes: nothing to undo
            return
        views = [self.comm.worker_view(t, w) for w in self.idle_workers() for t in self._tensors()]
        self._saved = [(v, v.clone()) for v in views]

    def _after_local_step(self) -> None:
        if not self._states_checked:
            self._check_declared_states(self.state_names, "state_names")
            self._states_checked = True
        for view, saved in self._saved:  # idle workers' parameters and states stay untouched
            view.copy_(saved)
        self._saved = []
        if "params" in self.schedule.due(self.global_step):
            self._round_end(self.global_step // self.period - 1)

    # ------------------------------------------------------------------ round
    def _round_end(self, round_index: int) -> None:
        self.outer.step(self.params)  # local outer step on Delta_i = xbar_i - x_i
        tags = ["params"] * len(self.anchor)
        if self.topology == "complete":
            self.comm.all_reduce_mean(self.anchor, tags)
        elif self.topology != "none":
            self.comm.mix(self.anchor, tags, mixing(self.topology, self.comm.world_size, round_index, self.seed))
        self.outer.copy_to(self.params)

    # ----------------------------------------------------------------- record
    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), "period": self.period, "topology": self.topology, "seed": self.seed,
                "local_steps": list(self.local_steps),
                "outer": self.outer.hyperparameters(("lr", "momentum", "nesterov"))}

    def _extra_state(self) -> dict[str, Any]:
        return self.outer.state_dict()

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.outer.load_state_dict(state)


def _build(cfg, inner, comm, roles, kwargs) -> GasLoc:
    kwargs.setdefault("state_names", list(roles))
    return GasLoc(inner, comm, cfg.period_x, topology=cfg.topology, outer_lr=cfg.outer_lr,
                  outer_momentum=cfg.outer_momentum, nesterov=cfg.outer == "nesterov",
                  local_steps=cfg.local_steps, seed=cfg.gossip_seed, **kwargs)


SPEC = MethodSpec("gossip with random peers every H steps after a local outer Nesterov step", _build,
                  frozenset({"period_x", "clip_rho", "outer", "outer_lr", "outer_momentum", "topology", "local_steps",
                             "gossip_seed"}),
                  why_fixed="never syncs optimizer states", outer="nesterov", gossips=True,
                  refuses={"events": "--events needs a method that all-reduces: gasloc's per-worker local steps and "
                                     "gossip graph are planned for a fixed number of workers",
                           "ft": "gasloc gossips with chosen peers, which torchft's quorum all-reduce does not offer"})
