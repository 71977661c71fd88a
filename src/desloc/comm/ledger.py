"""The communication ledger: every byte a method sends through a :class:`~desloc.comm.Communicator`.

Definitions (each field means the same thing on both engines, and every worker of a
torch.distributed run holds the same ledger as the simulator of that run):

The ledger describes the traffic of the *whole run*, all M workers. Every communicator call is
collective -- every worker takes part with tensors of the same shapes and, for gossip, the same
mixing matrix W -- so each worker knows exactly what every other worker sends, and one process
(the simulator, or any rank) can account for all of them without extra communication. The
bookkeeping is shared code (:meth:`Communicator._record_all_reduce`,
:meth:`Communicator._record_all_gather`, :meth:`Communicator._record_mix`), called by both
implementations, so both count identically.

``sent_by_tag[tag]``
    Bytes sent under ``tag`` summed over all M workers (elements x element size; exact integer).
    An all-reduce of a tensor counts its per-worker payload once per worker (M x payload); a
    gossip call counts the payload once per link ``src -> dst`` with ``W[dst, src] > 0``.
    Compressed syncs count the encoded payload a worker sends (values + scales + indices, the
    uint8 bytes of :meth:`Communicator.all_gather_flat`), once per worker, not the decoded tensor.
``bytes_by_tag[tag]`` (derived)
    Bytes one worker sent under ``tag``, averaged over the workers: ``sent_by_tag[tag] / M``.
    That is the papers' unit ("model-sized tensors sent per worker"). For all-reduce traffic
    every worker sends the same, so it is an exact ``int``; so is gossip on regular graphs. When
    workers send different amounts (one-peer gossip with odd M: one worker sits out each round)
    the mean is not an integer and is given as the ``float`` ``sent / M`` -- never rounded.
    ``total_bytes`` is the same mean over all tags (``sum(sent_by_tag) / M``).
``syncs_by_tag[tag]``
    Number of communicator calls that carried ``tag``: how often it was synced (one per call,
    however many tensors or flat buffers, buckets or links carried it).
``collectives``
    Number of communicator calls (``all_reduce_mean[_flat]``, ``all_gather_flat`` or ``mix``) that
    moved method data. A
    call is one, whatever the engine does underneath: the torch.distributed engine may split it
    into several bucket all-reduces (counted in ``TorchDistComm.buckets_reduced``, not here), the
    simulator does one reduction per tensor. Calls with no tensors and observer calls (below)
    are not counted.
``bytes_by_link["src->dst"]``
    Point-to-point gossip bytes from worker ``src`` to worker ``dst``, for every link of the run
    (not only this process's). ``bytes_by_worker()`` sums them per sender: the exact bytes each
    worker sent point to point.
``observer_bytes_by_tag[tag]``
    Traffic that observes training rather than being part of the method (``OBSERVER_TAGS``: the
    loss / norm averages for logging), bytes per worker. Engine-specific by nature (the simulator
    averages its metrics locally and sends nothing) and therefore kept out of every field above
    and out of :meth:`summary`.

:meth:`summary` returns the engine-independent fields; ``tests/test_gloo_equivalence.py``
checks it is equal between the simulator and real gloo runs of 2 and 3 processes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Traffic that observes training rather than being part of the method (loss/norm averages for
# logging): counted in ``observer_bytes_by_tag`` only.
OBSERVER_TAGS = frozenset({"metrics"})


def _exact_mean(total: int, world_size: int) -> int | float:
    """``total / world_size``: an int when it divides exactly, else the float quotient."""
    q, r = divmod(int(total), world_size)
    return q if r == 0 else total / world_size


@dataclass
class CommLedger:
    """Bytes and operations per tag (``params``, ``exp_avg``, ``exp_avg_sq``, ``grads``, ...).

    ``world_size`` is the number of workers M the ledger accounts for (the communicator's). The
    fields are defined in the module docstring.
    """

    world_size: int = 1
    sent_by_tag: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    syncs_by_tag: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    collectives: int = 0
    bytes_by_link: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    observer_bytes_by_tag: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def __post_init__(self) -> None:
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"CommLedger world_size must be an integer >= 1, got {self.world_size!r}")

    # ------------------------------------------------------------------ record
    def record(self, tag: str, nbytes: int) -> None:
        """Every worker sends ``nbytes`` under ``tag`` (one tensor of an all-reduce)."""
        if tag in OBSERVER_TAGS:
            self.observer_bytes_by_tag[tag] += int(nbytes)
            return
        self.sent_by_tag[tag] += int(nbytes) * self.world_size

    def record_links(self, tag: str, nbytes: int, links: Iterable[tuple[int, int]]) -> None:
        """One tensor of a gossip call: ``nbytes`` from ``src`` to ``dst`` for every link."""
        links = list(links)
        if tag in OBSERVER_TAGS:
            self.observer_bytes_by_tag[tag] += int(nbytes) * len(links)
            return
        for src, dst in links:
            self.bytes_by_link[f"{src}->{dst}"] += int(nbytes)
        self.sent_by_tag[tag] += int(nbytes) * len(links)

    def record_call(self, tags: Iterable[str]) -> None:
        """One communicator call carrying ``tags``: a collective if any of them is method data."""
        method_tags = {t for t in tags if t not in OBSERVER_TAGS}
        for tag in method_tags:
            self.syncs_by_tag[tag] += 1
        if method_tags:
            self.collectives += 1

    # ------------------------------------------------------------------- views
    @property
    def bytes_by_tag(self) -> dict[str, int | float]:
        """Bytes per worker (mean over workers, exact) per tag; see the module docstring."""
        return {t: _exact_mean(b, self.world_size) for t, b in self.sent_by_tag.items()}

    @property
    def method_bytes_by_tag(self) -> dict[str, int | float]:
        """Same as :attr:`bytes_by_tag` (observer traffic is never in it); kept for callers."""
        return self.bytes_by_tag

    @property
    def total_bytes(self) -> int | float:
        """Bytes one worker sent for the method, mean over workers (observer traffic excluded)."""
        return _exact_mean(sum(self.sent_by_tag.values()), self.world_size)

    def bytes_by_worker(self) -> dict[int, int]:
        """Bytes each worker sent point to point (from ``bytes_by_link``)."""
        out: dict[int, int] = defaultdict(int)
        for link, n in self.bytes_by_link.items():
            out[int(link.split("->")[0])] += n
        return dict(sorted(out.items()))

    # --------------------------------------------------------------- save/load
    def state_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "sent_by_tag": dict(self.sent_by_tag),
            "bytes_by_tag": self.bytes_by_tag,  # derived, for readers of the checkpoint
            "syncs_by_tag": dict(self.syncs_by_tag),
            "collectives": self.collectives,
            "bytes_by_link": dict(self.bytes_by_link),
            "observer_bytes_by_tag": dict(self.observer_bytes_by_tag),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; also reads the older format (per-worker ``bytes_by_tag`` only, observer
        tags mixed in), whose gossip bytes for odd M were floored means."""
        self.world_size = int(state.get("world_size", self.world_size))
        syncs = dict(state["syncs_by_tag"])
        observer = dict(state.get("observer_bytes_by_tag", {}))
        if "sent_by_tag" in state:
            sent = dict(state["sent_by_tag"])
        else:
            sent = {}
            for tag, b in state["bytes_by_tag"].items():
                if tag in OBSERVER_TAGS:
                    observer[tag] = observer.get(tag, 0) + int(b)
                    syncs.pop(tag, None)
                else:
                    sent[tag] = int(b) * self.world_size
        self.sent_by_tag = defaultdict(int, sent)
        self.syncs_by_tag = defaultdict(int, syncs)
        self.collectives = int(state["collectives"])
        self.bytes_by_link = defaultdict(int, state.get("bytes_by_link", {}))
        self.observer_bytes_by_tag = defaultdict(int, observer)

    def summary(self) -> dict[str, Any]:
        """The engine-independent fields (what the two engines must agree on)."""
        return {
            "world_size": self.world_size,
            "total_bytes": self.total_bytes,
            "bytes_by_tag": self.bytes_by_tag,
            "syncs_by_tag": dict(self.syncs_by_tag),
            "collectives": self.collectives,
            "bytes_by_link": dict(sorted(self.bytes_by_link.items())),
            "bytes_by_worker": self.bytes_by_worker(),
        }
