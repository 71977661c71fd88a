"""The communication ledger: every byte that crosses a :class:`~desloc.comm.Communicator`.

Both communicators call :meth:`CommLedger.record` from inside their collective, with the
payload one worker contributes (elements per worker x element size). That is the unit the
papers use ("model-sized tensors sent per step"); the wire traffic of a ring all-reduce is
``2 (M-1) / M`` times larger and is reported separately by :meth:`wire_bytes_ring`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

# Traffic that observes training rather than being part of the method (loss/norm averages for
# logging). Counted under its tag but kept out of ``total_bytes``.
OBSERVER_TAGS = frozenset({"metrics"})


@dataclass
class CommLedger:
    """Bytes and operations per tag (``params``, ``exp_avg``, ``exp_avg_sq``, ``grads``, ...).

    ``bytes_by_tag[tag]`` is the payload bytes one worker sent under ``tag``;
    ``syncs_by_tag[tag]`` how many collectives carried that tag; ``collectives`` the number of
    network operations issued (one per bucket).
    """

    bytes_by_tag: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    syncs_by_tag: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    collectives: int = 0
    bytes_by_link: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record_link(self, src: int, dst: int, nbytes: int) -> None:
        """Point-to-point traffic from worker ``src`` to worker ``dst`` (gossip)."""
        self.bytes_by_link[f"{src}->{dst}"] += int(nbytes)

    def bytes_by_worker(self) -> dict[int, int]:
        """Bytes each worker sent point to point (from ``bytes_by_link``)."""
        out: dict[int, int] = defaultdict(int)
        for link, n in self.bytes_by_link.items():
            out[int(link.split("->")[0])] += n
        return dict(out)

    def record(self, tag: str, nbytes: int) -> None:
        self.bytes_by_tag[tag] += int(nbytes)
        self.syncs_by_tag[tag] += 1

    def record_collective(self, count: int = 1) -> None:
        self.collectives += count

    @property
    def method_bytes_by_tag(self) -> dict[str, int]:
        """Bytes per tag, without observer traffic (see ``OBSERVER_TAGS``)."""
        return {t: b for t, b in self.bytes_by_tag.items() if t not in OBSERVER_TAGS}

    @property
    def total_bytes(self) -> int:
        """Bytes the method sent (observer traffic excluded)."""
        return sum(self.method_bytes_by_tag.values())

    def wire_bytes_ring(self, world_size: int) -> float:
        """Bytes each worker puts on the wire if every collective were a ring all-reduce."""
        if world_size <= 1:
            return 0.0
        return self.total_bytes * 2.0 * (world_size - 1) / world_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "bytes_by_tag": dict(self.bytes_by_tag),
            "syncs_by_tag": dict(self.syncs_by_tag),
            "collectives": self.collectives,
            "bytes_by_link": dict(self.bytes_by_link),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bytes_by_tag = defaultdict(int, state["bytes_by_tag"])
        self.syncs_by_tag = defaultdict(int, state["syncs_by_tag"])
        self.collectives = int(state["collectives"])
        self.bytes_by_link = defaultdict(int, state.get("bytes_by_link", {}))

    def summary(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, **self.state_dict()}
