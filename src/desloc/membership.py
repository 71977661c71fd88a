r"""Workers that join and leave: the simulator's membership events.

``--events "16:add=4,48:drop=2"``: after step 16 four workers join, after step 48 the two
highest-numbered workers leave. Step t (0-based) is computed by

    live(t) = M_0 + sum(+count for add, -count for drop over events with event.step <= t)

workers; every average, the clock and the ledger count the live workers only, and the training
data is split afresh among them (``WorkerStreams`` with the new M). A joining worker starts from
the current average of the live workers' parameters (with an outer optimizer, the common anchor
and outer momentum) and, for its optimizer states, from ``--join-states``:

    average      the current average of the live workers' states (default)
    zeros        fresh states (all zero; scalar counters such as Adam's step stay shared)
    checkpoint   the average of the states in the last checkpoint of the ``--ckpt-every`` schedule
                 (DES-LOC's "copy the averaged momenta"); the current average when there is none
                 yet (with a warning)

"Average" over the rows of a stacked [M, ...] tensor (:func:`row_mean`) is exact for a replicated
quantity: rows that are all equal (the outer anchor and momentum, a state right after its sync)
give that row itself, copied -- a float mean of M equal rows is not always bitwise the row (for
M = 3, 5, ...), and an outer optimizer refuses workers whose anchors differ. Only rows that
differ are averaged (in float32 or wider).

Syncs still in flight (overlapped state syncs, a delayed parameter average) are finished before
the change. A checkpoint holds the live workers of its step; ``--resume`` rebuilds that many and
replays the events that follow, so a run resumed across an event is bitwise the uninterrupted
one. A checkpoint written because the run stopped (``--stop-after``, a signal) is not one of the
schedule, so it never becomes the source of ``checkpoint`` joiners: while a joiner may still
come, every checkpoint carries the averaged states of the last scheduled one
(:func:`join_source`), and a resumed run gives its joiners what the uninterrupted run gives them.
Membership events need the simulator (with torchrun, a worker that dies stops the run: README)
and a method that all-reduces (not gasloc, whose per-worker local steps and gossip graph are
planned for a fixed M).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from desloc.errors import ConfigError

JOIN_POLICIES = ("average", "zeros", "checkpoint")
_EVENT = re.compile(r"^\s*(\d+)\s*:\s*(add|drop)\s*=\s*(\d+)\s*$")


@dataclass(frozen=True)
class Event:
    step: int  # applied after this many steps
    op: str  # "add" | "drop"
    count: int

    @property
    def delta(self) -> int:
        return self.count if self.op == "add" else -self.count


def parse_events(spec: str | None) -> tuple[Event, ...]:
    """``"16:add=4,48:drop=2"`` -> events in step order ('' or None: none)."""
    if not spec:
        return ()
    events = []
    for part in str(spec).split(","):
        m = _EVENT.match(part)
        if not m:
            raise ConfigError(f"events: cannot read {part.strip()!r} in {spec!r}; write STEP:add=N or STEP:drop=N, "
                              "comma-separated, e.g. --events 16:add=4,48:drop=2")
        step, op, count = int(m.group(1)), m.group(2), int(m.group(3))
        if step < 1 or count < 1:
            raise ConfigError(f"events: {part.strip()!r} needs a step >= 1 and a count >= 1")
        events.append(Event(step, op, count))
    steps = [e.step for e in events]
    if steps != sorted(steps) or len(set(steps)) != len(steps):
        raise ConfigError(f"events: {spec!r} must list one event per step, in increasing step order")
    return tuple(events)


def live_workers(initial: int, events: Sequence[Event], step: int) -> int:
    """Workers that compute step ``step`` (0-based; = live after ``step`` steps are done)."""
    return initial + sum(e.delta for e in events if e.step <= step)


def worker_steps(initial: int, events: Sequence[Event], done: int) -> int:
    """Sum over steps 0 .. done-1 of the live workers (tokens = this x batch x context)."""
    total, m, last = 0, initial, 0
    for e in events:
        if e.step >= done:
            break
        total += m * (e.step - last)
        m += e.delta
        last = e.step
    return total + m * (done - last)


def check_events(initial: int, events: Sequence[Event], steps: int) -> None:
    m = initial
    for e in events:
        if e.step >= steps:
            raise ConfigError(f"events: the event at step {e.step} would never happen (the run has {steps} steps); "
                              f"use a step below {steps}")
        m += e.delta
        if m < 1:
            raise ConfigError(f"events: after step {e.step} no worker would be left ({initial} at the start); "
                              "drop fewer workers")


# ------------------------------------------------------------------------------ resize states
def row_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of the rows of a stacked [M, ...] tensor, shaped like one row, in ``t``'s dtype.
    Rows that are all bitwise equal give row 0 (their exact mean); otherwise the mean is taken
    in float32 (or ``t``'s wider dtype) and rounded once."""
    first = t[0]
    if all(torch.equal(first, row) for row in t[1:]):
        return first.clone()
    wide = torch.promote_types(t.dtype, torch.float32)
    return t.to(wide).mean(0).to(t.dtype)


def _rows(t: torch.Tensor, old: int, new: int, fill: torch.Tensor | None) -> torch.Tensor:
    """A stacked [old, ...] tensor as [new, ...]: the first min(old, new) rows, then ``fill`` rows
    (None: :func:`row_mean` of the old rows)."""
    kept = t[: min(old, new)]
    if new <= old:
        return kept.clone()
    fill = (row_mean(t) if fill is None else fill).to(dtype=t.dtype, device=t.device)
    return torch.cat([kept, fill.unsqueeze(0).expand(new - old, *t.shape[1:])]).contiguous()


def _stacked(t: Any, old: int) -> bool:
    return torch.is_tensor(t) and t.dim() >= 1 and t.shape[0] == old


def resize_tree(tree: Any, old: int, new: int) -> Any:
    """Every stacked tensor in a nested dict / list: joiners get the :func:`row_mean` of the live rows."""
    if isinstance(tree, dict):
        return {k: resize_tree(v, old, new) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(resize_tree(v, old, new) for v in tree)
    return _rows(tree, old, new, None) if _stacked(tree, old) else tree


StateMeans = dict[int, dict[str, torch.Tensor]]  # parameter index -> state name -> one worker's row


def averaged_states(sd: dict[str, Any]) -> StateMeans:
    """The :func:`row_mean` of every stacked state in a simulator SyncedOptimizer state_dict."""
    m = sd["desloc"]["world_size"]
    return {idx: {name: row_mean(t) for name, t in per_param.items() if _stacked(t, m)}
            for idx, per_param in sd["inner"]["state"].items()}


def join_source(cfg: Any, step: int, optimizer_sd: dict[str, Any],
                previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``--join-states checkpoint`` joiners get after the checkpoint of ``step`` of a run of
    ``cfg`` (a TrainConfig) with optimizer state ``optimizer_sd``, given the ``previous`` source:
    ``{"step": c, "states": StateMeans}`` of the last checkpoint c of the ``--ckpt-every`` schedule
    (c <= step). A checkpoint off the schedule (a stop) keeps ``previous``. None when no joiner
    can need it (another policy, or no ``add`` event after ``step``)."""
    joiners_ahead = any(e.op == "add" and e.step > step for e in parse_events(cfg.events))
    if cfg.join_states != "checkpoint" or not joiners_ahead:
        return None
    if step % cfg.ckpt_every == 0:
        return {"step": step, "states": averaged_states(optimizer_sd)}
    return previous


def resize_optimizer_state(sd: dict[str, Any], old: int, new: int, policy: str,
                           checkpoint_means: StateMeans | None = None) -> dict[str, Any]:
    """A simulator SyncedOptimizer state_dict of ``old`` workers as one of ``new`` workers; with
    ``policy`` "checkpoint" the joiners' states are ``checkpoint_means`` (None: the live average)."""
    if policy not in JOIN_POLICIES:
        raise ConfigError(f"join_states must be one of {JOIN_POLICIES}, got {policy!r}")
    state = {}
    for idx, per_param in sd["inner"]["state"].items():
        out = {}
        for name, t in per_param.items():
            if not _stacked(t, old):
                out[name] = t  # scalar counters: shared by every worker
                continue
            fill = None
            if policy == "zeros":
                fill = torch.zeros_like(t[0])
            elif policy == "checkpoint" and checkpoint_means is not None:
                fill = checkpoint_means[idx][name]
            out[name] = _rows(t, old, new, fill)
        state[idx] = out
    meta = dict(sd["desloc"])
    meta["world_size"] = new
    meta["ledger"] = {**meta["ledger"], "world_size": new}
    meta["extra"] = resize_tree(meta.get("extra", {}), old, new)
    return {"inner": {**sd["inner"], "state": state}, "desloc": meta}


def resize_clock_state(state: dict[str, Any], old: int, new: int) -> dict[str, Any]:
    """Joiners start now (at the latest clock) with no compute behind them and nothing in flight."""
    now = max(state["time"])
    keep = min(old, new)
    pending = state.get("pending", [[] for _ in range(old)])
    return {"time": list(state["time"][:keep]) + [now] * (new - keep),
            "compute": list(state["compute"][:keep]) + [0.0] * (new - keep),
            "link_free": state.get("link_free", 0.0),
            "pending": [list(p) for p in pending[:keep]] + [[] for _ in range(new - keep)]}
