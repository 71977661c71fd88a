r"""The sync schedule: what a method sends at which step, as one pure function.

Every method's communication is periodic in the global step t (1 = the first step)::

    due(t) = [tag for tag, K in periods if K is not None and t % K == 0]

with ``periods`` in send order: DDP ``{"grads": 1}`` (before its local step); DES-LOC and its
presets ``{"params": K_x, <state>: K_j, ...}`` (after the local step; local-adam K_j = K_x,
keep/reset-states and DiLoCo K_j = None); GASLoC ``{"params": H}`` (its gossip round). The
engine executes exactly ``due(t)`` (``tests/test_fake_comm.py`` checks every call against it),
:meth:`SyncSchedule.count` gives how often a tag is sent in T steps (``expected_bytes``,
``tests/test_ledger.py``), and anything that needs to know what is sent when (a time model, a
planner) asks the same object; ``tests/test_schedule.py`` checks it against the papers' rules
written out by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SyncSchedule:
    """``periods``: tag -> period in steps (None = never), in the order tags are sent."""

    periods: Mapping[str, int | None] = field(default_factory=dict)

    def due(self, step: int) -> list[str]:
        """Tags sent at global step ``step`` (1-based: the step that has just been taken)."""
        return [tag for tag, k in self.periods.items() if k is not None and step % k == 0]

    def count(self, tag: str, steps: int) -> int:
        """How many times ``tag`` is sent in steps 1..``steps``."""
        k = self.periods.get(tag)
        return 0 if k is None else steps // k

    @property
    def tags(self) -> list[str]:
        """Every tag that is ever sent."""
        return [tag for tag, k in self.periods.items() if k is not None]
