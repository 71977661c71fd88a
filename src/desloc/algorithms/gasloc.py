r"""GASLoC: gossip between sparse random peers, with a local outer optimizer and local steps.

The paper's exact accelerated rule is not available to us (shared/papers.md section 5); this is
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
``outer_momentum``; W -> ``topology`` (+ ``seed`` for the random ones).
Communication per round and worker: deg_i model-sized tensors (one-peer: 1, two-peer and ring:
2, complete: one all-reduce), counted per link in ``ledger.bytes_by_link``.
Idle steps still advance scalar counters such as Adam's ``step`` (in both engines alike).

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

from desloc.algorithms.base import LocalOptimizer
from desloc.comm.base import Communicator
from desloc.errors import CheckpointMismatchError, ConfigError, check_period
from desloc.topology import TOPOLOGIES, mixing


class GasLoc(LocalOptimizer):
    algorithm = "gasloc"

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        comm: Communicator,
        period: int,
        topology: str = "one-peer",
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        local_steps: Sequence[int] | None = None,
        seed: int = 0,
        clip_rho: float | None = None,
        assume_elementwise: bool = False,
        state_names: Sequence[str] | None = None,
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
        super().__init__(inner, comm, clip_rho=clip_rho, assume_elementwise=assume_elementwise)
        self.period, self.topology, self.seed = period, topology, seed
        self.local_steps = local_steps
        self.anchor = [p.detach().clone() for p in self.params]
        self.outer = torch.optim.SGD(self.anchor, lr=outer_lr, momentum=outer_momentum,
                                     nesterov=nesterov and outer_momentum > 0)
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.state_names = list(state_names)
        self._states_checked = False

    def _on_param_group_added(self, params: list[torch.Tensor]) -> None:
        new = [p.detach().clone() for p in params]
        self.anchor += new
        self.outer.add_param_group({"params": new})

    # ----------------------------------------------------------- idle workers
    def _idle_workers(self) -> list[int]:
        """Workers (local indices) that sit out the coming step of the round."""
        pos = self.global_step % self.period  # 0-based position of the coming step
        idle = [i for i, h in enumerate(self.local_steps) if pos >= h]
        if self.comm.stacked:
            return idle
        rank = self.comm.rank  # type: ignore[attr-defined]
        return [0] if rank in idle else []

    def _tensors(self) -> list[torch.Tensor]:
        """Parameters and their declared per-coordinate states (what an idle worker keeps)."""
        out = list(self.params)
        for p in self.params:
            state = self.inner.state[p]
            out += [state[n] for n in self.state_names if n in state]
        return out

    def _before_local_step(self) -> None:
        self._clip()
        idle = self._idle_workers()
        if idle:
            rows = idle if self.comm.stacked else None
            self._saved = [(t, (t[rows] if rows else t).clone()) for t in self._tensors()]
            self._idle_rows = rows

    def _after_local_step(self) -> None:
        if not self._states_checked:
            self._check_declared_states(self.state_names, "state_names")
            self._states_checked = True
        if self._saved:
            for t, saved in self._saved:
                if self._idle_rows:
                    t[self._idle_rows] = saved
                else:
                    t.copy_(saved)
            self._saved = []
        if self.global_step % self.period == 0:
            self._round_end(self.global_step // self.period - 1)

    # ------------------------------------------------------------------ round
    def _round_end(self, round_index: int) -> None:
        for xbar, x in zip(self.anchor, self.params):
            xbar.grad = xbar - x
        self.outer.step()
        tags = ["params"] * len(self.anchor)
        if self.topology == "complete":
            self.comm.all_reduce_mean(self.anchor, tags)
        elif self.topology != "none":
            self.comm.mix(self.anchor, tags, mixing(self.topology, self.comm.world_size, round_index, self.seed))
        for xbar, x in zip(self.anchor, self.params):
            x.copy_(xbar)
            xbar.grad = None

    # ----------------------------------------------------------------- record
    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), "period": self.period, "topology": self.topology, "seed": self.seed,
                "local_steps": list(self.local_steps),
                "outer": {k: self.outer.defaults[k] for k in ("lr", "momentum", "nesterov")}}

    def _extra_state(self) -> dict[str, Any]:
        return {"anchor": [a.detach().clone() for a in self.anchor], "outer": self.outer.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if len(state["anchor"]) != len(self.anchor):
            raise CheckpointMismatchError(f"checkpoint has {len(state['anchor'])} outer anchors but this "
                                          f"optimizer has {len(self.anchor)} parameters")
        for a, saved in zip(self.anchor, state["anchor"]):
            a.copy_(saved)
        self.outer.load_state_dict(state["outer"])
