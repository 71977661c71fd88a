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

Fragments (``fragments = F``, Streaming-DiLoCo style; 1 = the rule above exactly). Every synced
buffer is cut into F slices of equal size (the last takes the remainder), and fragment f of the
i-th synced tag (send order, parameters first) with period K is sent at the steps ::

    t % K == r(i, f),   r(i, f) = ((f + 1) * K // F - s_i) mod K,   s_i = i * (K_x // F) // n_tags

so the F fragments of a tag are spread evenly over its period (fragment F - 1 on the multiples of
K, as with F = 1) and the tags are shifted against each other (``s_i``, only when F > 1) so the
wire carries about 1/F of one tag at a time. Every fragment is still synced once per period.

Delays (``delays[tag] = D``): a sync launched at t is applied after step t + D (0 = applied at
once, or overlapped with the next forward/backward for states).

Nothing sent that nobody reads (``total_steps = T`` given): a *state* fragment due at t is sent
only if t + D_state < T -- an average applied after the last step is never read by an inner step
(the final model reads only the parameters). Parameters are always sent, and with F > 1 the
fragments not averaged at step T are averaged once more at the end (:meth:`final`), so the final
model is every worker's average, as with F = 1 when T is a multiple of K_x. With mixing
(``final_all``: DES-LOC's ``fragment_alpha > 0``, which keeps a share of each worker's own
parameters at every average) every fragment is averaged once more at the end, without mixing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Tags whose syncs are always sent (the final model reads them): a method's parameters and DDP's
# gradients (read by the step they are averaged for).
ALWAYS_SENT = ("params", "grads")


@dataclass(frozen=True)
class SyncSchedule:
    """``periods``: tag -> period in steps (None = never), in the order tags are sent.

    ``fragments``: F slices per synced buffer; ``delays``: tag -> D (steps between launching an
    average and applying it; absent = 0); ``total_steps``: the run's last step T (None = unknown:
    every due sync is sent)."""

    periods: Mapping[str, int | None] = field(default_factory=dict)
    fragments: int = 1
    delays: Mapping[str, int] = field(default_factory=dict)
    total_steps: int | None = None
    final_all: bool = False  # average every parameter fragment once more at the end (mixing with alpha > 0)

    def __post_init__(self) -> None:
        if isinstance(self.fragments, bool) or not isinstance(self.fragments, int) or self.fragments < 1:
            raise ValueError(f"fragments must be an integer >= 1, got {self.fragments!r}")

    # ------------------------------------------------------------------ offsets
    def residue(self, tag: str, fragment: int) -> int:
        """r(i, f): fragment ``fragment`` of ``tag`` is sent at the steps t with t % K == r."""
        k = self.periods[tag]
        F = self.fragments
        if F == 1:
            return 0
        tags = self.tags
        kx = self.periods.get("params") or k
        shift = tags.index(tag) * (kx // F) // len(tags)
        return ((fragment + 1) * k // F - shift) % k

    def _delay(self, tag: str) -> int:
        return int(self.delays.get(tag, 0))

    def sent(self, tag: str, step: int) -> bool:
        """The last-step rule: a state sync launched at ``step`` is read by some later inner step."""
        if self.total_steps is None or tag in ALWAYS_SENT:
            return True
        return step + self._delay(tag) < self.total_steps

    # --------------------------------------------------------------------- what
    def due_fragments(self, step: int) -> list[tuple[str, int]]:
        """(tag, fragment) pairs sent at global step ``step`` (1-based), in send order."""
        out = []
        for tag, k in self.periods.items():
            if k is None:
                continue
            for f in range(self.fragments):
                if step % k == self.residue(tag, f) and self.sent(tag, step):
                    out.append((tag, f))
        return out

    def due(self, step: int) -> list[str]:
        """Tags (any fragment of them) sent at global step ``step`` (1-based: the step that has just been taken)."""
        out: list[str] = []
        for tag, _ in self.due_fragments(step):
            if tag not in out:
                out.append(tag)
        return out

    def final(self, steps: int | None = None) -> list[tuple[str, int]]:
        """Parameter fragments averaged once more after the last step (F > 1: those not averaged at
        step T itself); empty with F = 1."""
        steps = self.total_steps if steps is None else steps
        k = self.periods.get("params")
        if k is None or steps is None or (self.fragments == 1 and not self.final_all):
            return []
        return [("params", f) for f in range(self.fragments)
                if self.final_all or steps % k != self.residue("params", f)]

    def fragment_count(self, tag: str, fragment: int, steps: int) -> int:
        """How many times fragment ``fragment`` of ``tag`` is sent in steps 1..``steps`` (with the
        last-step rule and, when ``steps`` is the run's T, the final parameter average)."""
        k = self.periods.get(tag)
        if k is None:
            return 0
        r = self.residue(tag, fragment)
        n = steps // k if r == 0 else (steps - r) // k + 1 if steps >= r else 0
        if self.total_steps is not None and tag not in ALWAYS_SENT:  # the last-step rule
            n -= sum(1 for t in range(max(1, self.total_steps - self._delay(tag)), steps + 1) if t % k == r)
        if self.total_steps is not None and steps == self.total_steps:
            n += (tag, fragment) in self.final(steps)
        return n

    def count(self, tag: str, steps: int) -> int:
        """How many times ``tag`` is sent in steps 1..``steps`` (F > 1: fragment syncs / F, rounded
        down -- use :meth:`fragment_count` for bytes)."""
        return sum(self.fragment_count(tag, f, steps) for f in range(self.fragments)) // self.fragments

    @property
    def tags(self) -> list[str]:
        """Every tag that is ever sent."""
        return [tag for tag, k in self.periods.items() if k is not None]
