r"""Streamed, delayed and compressed syncs: the tensor rules, apart from the orchestration.

:class:`~desloc.algorithms.desloc.DesLoc` (and DDP for compression) call these; the schedule of
what is sent when is :class:`~desloc.algorithms.schedule.SyncSchedule`.

Fragments. A tag's flat buffer of n elements (per worker) is cut into F slices,
fragment f = elements [f n // F, (f + 1) n // F): :func:`fragment_slices`. F = 1 is the whole
buffer (the same tensor, so the same collective as without fragments).

Delayed parameter average (launched at t_0 from the snapshot x_snap, applied after step t_0 + D;
``alpha`` = torchft's ``fragment_update_alpha``)::

    x <- x + (1 - alpha) (X - x_snap)        X = E_m[x_snap] (or the outer step's new anchor)

alpha = 0 keeps every worker's own progress since the snapshot and moves it by the average's
correction; alpha = 1 ignores the average; with D = 0 (x = x_snap) it is torchft's mixing
x <- alpha x_local + (1 - alpha) X.

Delayed state average. An optimizer state s that is an exponential moving average,
s_{t+1} = beta s_t + (1 - beta) h_t (Adam's u with beta_1, v with beta_2 and h = g^2, SGD's
momentum buffer with beta = mu), evolves over the D local steps after the snapshot as
s_{t_0+D} = beta^D s_snap + L, where L = sum_k beta^(D-1-k) (1 - beta) h_{t_0+k} is the worker's own
contribution. Had the average arrived at once, the state would be beta^D E_m[s_snap] + L. So ::

    s <- s + beta^D (E_m[s_snap] - s_snap)                                 (:func:`apply_delayed_state`)

is *exactly* the state of a run whose average arrived instantly and whose later local
contributions were the same; for v, beta^D E_m[v_snap] >= 0 and L >= 0, so v stays >= 0 (clamped
at 0 against rounding: the computed sum can be a few ulps below zero where v is near 0). beta is
read per parameter group from the inner optimizer (:func:`state_decay`); an optimizer whose
states are not such EMAs is refused. Tested against a float64 reference and against the
"instant average, same contributions" identity (tests/test_fast_syncs.py).

Compressed sync (codec Q with decoder Q^-1, :mod:`desloc.comm.codecs`). Every worker holds the
same last shared value S of the tag (parameters: x_0; states: 0) and an error-feedback buffer e
(0 at the start)::

    delta^m = x^m - S + e^m          (the change since the last shared value, plus what was lost)
    q^m     = Q(delta^m);  e^m <- delta^m - Q^-1(q^m)
    all-gather q^1..q^M              (encoded bytes on the wire: values + scales / indices)
    S      <- S + (1/M) sum_m Q^-1(q^m)   (rows summed in rank order, then divided by M)
    x^m    <- S                      (non-negative states: S clamped at 0)

Every worker decodes the same M messages with the same arithmetic, so every worker holds
bitwise the same S, on both engines and at any M (the simulator runs the same ops on the same
[M, bytes] payloads). DDP compresses its gradient the same way with S = 0 always (no shared value:
the message is the gradient plus its error feedback).

Which collective (:func:`two_stage`). The all-gather above sends (M - 1) payloads p per worker on
a ring; an fp32 all-reduce of the full buffer sends 2 (M - 1)/M of it. From M = 3 on, desloc uses
a compressed all-reduce in two halves instead, which sends 2 (M - 1)/M p -- what a ring all-reduce
of the encoded message would:

    delta^m cut into M chunks (zero-padded to c = ceil(n / M)), chunk j encoded -> worker j
                                                     (all-to-all: reduce-scatter of encoded chunks)
    owner j: r_j = (1/M) sum_m decode(chunk_j^m) + e2_j  (senders in rank order)
             q_j = Q(r_j);  e2_j <- r_j - Q^-1(q_j)      (the owner's error feedback)
    all-gather q_1..q_M;  S <- S + concat_j Q^-1(q_j)[:n]

The owner's re-encoding is a second quantization, kept by the owner's error-feedback buffer e2
(1-bit Adam's "server" error); everyone decodes the same q_j, so every worker still holds bitwise
the same S on both engines. At M = 2 both collectives send the same bytes and the all-gather is
exact (no second quantization), so it is used there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from desloc.errors import ConfigError


# ------------------------------------------------------------------------------ fragments
def fragment_bounds(n: int, fragments: int, f: int) -> tuple[int, int]:
    """Elements [a, b) of fragment ``f`` of a buffer of ``n`` elements (per worker)."""
    return f * n // fragments, (f + 1) * n // fragments


def fragment_slices(buffers: Sequence[torch.Tensor], fragments: int, f: int, stacked: bool) -> list[torch.Tensor]:
    """Fragment ``f`` of each flat buffer (views; the buffers themselves when ``fragments`` = 1)."""
    if fragments == 1:
        return list(buffers)
    out = []
    for buf in buffers:
        a, b = fragment_bounds(buf.shape[-1], fragments, f)
        out.append(buf[:, a:b] if stacked else buf[a:b])
    return out


# ------------------------------------------------------------------------------ delays
@torch.no_grad()
def apply_delayed_params(x: torch.Tensor, mean: torch.Tensor, snap: torch.Tensor, alpha: float = 0.0) -> None:
    """x <- x + (1 - alpha) (mean - snap), in place."""
    if alpha == 0.0:
        x.add_(mean - snap)
    else:
        x.add_(mean - snap, alpha=1.0 - alpha)


@torch.no_grad()
def mix_into(x: torch.Tensor, new: torch.Tensor, alpha: float = 0.0) -> None:
    """x <- alpha x + (1 - alpha) new (alpha = 0: a copy)."""
    if alpha == 0.0:
        x.copy_(new)
    else:
        x.mul_(alpha).add_(new, alpha=1.0 - alpha)


@torch.no_grad()
def apply_delayed_state(s: torch.Tensor, mean: torch.Tensor, snap: torch.Tensor, decay_pow: torch.Tensor,
                        nonnegative: bool) -> None:
    """s <- s + beta^D (mean - snap), clamped at 0 for a non-negative state."""
    s.add_((mean - snap).mul_(decay_pow))
    if nonnegative:
        s.clamp_(min=0)


_MTDAO_MOMENT = re.compile(r"^exp_avg_(\d+)$")


def state_decay(group: dict[str, Any], name: str) -> float | None:
    """The per-step decay beta of state ``name`` under param group ``group`` (None: not known to be
    an exponential moving average). Adam / AdamW / ADOPT: ``exp_avg`` betas[0], ``exp_avg_sq``
    betas[1]; MT-DAO: ``exp_avg_j`` betas[j], ``exp_avg_sq`` beta2; SGD: ``momentum_buffer`` the
    momentum (dampening scales the contribution, not the decay)."""
    if name == "momentum_buffer":
        return float(group["momentum"]) if "momentum" in group else None
    betas = group.get("betas")
    if name == "exp_avg_sq":
        if "beta2" in group:
            return float(group["beta2"])
        return float(betas[1]) if betas is not None and len(betas) > 1 else None
    if name == "exp_avg" and betas is not None:
        return float(betas[0])
    match = _MTDAO_MOMENT.match(name)
    if match and betas is not None and int(match.group(1)) < len(betas):
        return float(betas[int(match.group(1))])
    return None


# ------------------------------------------------------------------------------ compression
def mean_of_rows(rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """(1/M) sum_m rows[m] over dimension ``dim``, summed in rank order (the one arithmetic both
    engines use)."""
    acc = rows.select(dim, 0).clone()
    for m in range(1, rows.shape[dim]):
        acc.add_(rows.select(dim, m))
    return acc.div_(rows.shape[dim])


def two_stage(world_size: int) -> bool:
    """Whether a compressed sync of M = ``world_size`` workers uses the two-half compressed
    all-reduce (M >= 3: fewer bytes than the all-gather) -- module docstring."""
    return world_size >= 3


def encoded_bytes(codec, n: int, world_size: int) -> int:
    """The ledger's bytes for one compressed sync of ``n`` elements: the payload (the all-gather),
    or the M encoded chunks of ceil(n / M) elements (the two halves, M >= 3)."""
    if two_stage(world_size):
        return world_size * codec.nbytes(-(-n // world_size))
    return codec.nbytes(n)


class TwoStageReduce:
    """A compressed all-reduce in flight: the all-to-all of encoded chunks (``first``); then, at
    :meth:`advance`, the owner's reduction (``reduce``) and the all-gather of the reduced chunks.
    ``wait()`` returns the gathered ``[M, bytes]`` payloads. Every rank advances its syncs in the
    same order (the schedule is global), so the collectives line up."""

    def __init__(self, comm, tag: str, first, reduce):
        self.comm, self.tag, self.first, self.reduce = comm, tag, first, reduce
        self.second = None

    def advance(self, in_flight: bool = True) -> None:
        if self.second is None:
            payload = self.reduce(self.first.wait())
            self.second = self.comm.all_gather_flat([payload], [self.tag], [1 if in_flight else 0], record=False)[0]

    @property
    def done(self) -> bool:
        return self.second is not None and self.second.done

    def wait(self) -> torch.Tensor:
        self.advance(in_flight=False)
        return self.second.wait()


def _add_to_shared(mean: torch.Tensor, shared: torch.Tensor | None, nonnegative: bool) -> torch.Tensor:
    """S <- S + mean (clamped at 0 for a non-negative state) and return S; ``mean`` itself without S."""
    if shared is None:
        return mean
    shared.add_(mean)
    if nonnegative:
        shared.clamp_(min=0)
    return shared


class CompressedTag:
    """The shared value S and the error-feedback buffer e of one compressed tag (flat, the tag's
    layout: one tensor per flat buffer; S is None for DDP's gradient)."""

    def __init__(self, codec, buffers: Sequence[torch.Tensor], shared_start: str | None):
        self.codec = codec
        self.error = [torch.zeros_like(b) for b in buffers]
        self.owner_error: dict[str, torch.Tensor] = {}  # e2 of the chunks this worker owns, by "fragment:buffer"
        if shared_start is None:
            self.shared = None
        elif shared_start == "zeros":
            self.shared = [torch.zeros_like(b) for b in buffers]
        else:  # "current": the buffers' values now (the parameters x_0, identical on every worker)
            self.shared = [b.detach().clone() for b in buffers]

    def slices(self, which: str, fragments: int, f: int, stacked: bool) -> list[torch.Tensor] | None:
        held = getattr(self, which)
        return None if held is None else fragment_slices(held, fragments, f, stacked)

    @torch.no_grad()
    def message(self, x: torch.Tensor, shared: torch.Tensor | None, error: torch.Tensor) -> torch.Tensor:
        """Encode delta = x - S + e; keep e <- delta - decode(payload). Returns the payload."""
        delta = (x - shared) if shared is not None else x.clone()
        delta.add_(error)
        payload = self.codec.encode(delta)
        error.copy_(delta.sub_(self.codec.decode(payload, x.shape[-1])))
        return payload

    @torch.no_grad()
    def combine(self, gathered: torch.Tensor, n: int, shared: torch.Tensor | None, nonnegative: bool) -> torch.Tensor:
        """The new value from every worker's payload ([M, bytes]): S + mean of the decoded changes
        (S updated in place and returned), or the mean itself without a shared value."""
        return _add_to_shared(mean_of_rows(self.codec.decode(gathered, n)), shared, nonnegative)

    # --------------------------------------------------------------- the two halves (M >= 3)
    @torch.no_grad()
    def chunked_message(self, x: torch.Tensor, shared: torch.Tensor | None, error: torch.Tensor,
                        world_size: int) -> torch.Tensor:
        """delta = x - S + e cut into M zero-padded chunks, each encoded: ``[..., M, bytes]``
        (chunk j for worker j); e keeps what the encoding lost."""
        n = x.shape[-1]
        c = -(-n // world_size)
        delta = (x - shared) if shared is not None else x.clone()
        delta.add_(error)
        padded = delta.new_zeros((*x.shape[:-1], world_size * c))
        padded[..., :n] = delta
        payload = self.codec.encode(padded.view(*x.shape[:-1], world_size, c))
        decoded = self.codec.decode(payload, c).reshape(*x.shape[:-1], world_size * c)[..., :n]
        error.copy_(delta.sub_(decoded))
        return payload

    @torch.no_grad()
    def reduce_chunk(self, received: torch.Tensor, n: int, world_size: int, key: str) -> torch.Tensor:
        """At the chunk's owner: the mean of the senders' decoded chunks (``received``:
        ``[..., M(src), bytes]``, rank order) plus the owner's error feedback, encoded again."""
        c = -(-n // world_size)
        mean = mean_of_rows(self.codec.decode(received, c), dim=-2)
        e2 = self.owner_error.get(key)
        if e2 is None:
            e2 = self.owner_error[key] = torch.zeros_like(mean)
        mean.add_(e2)
        payload = self.codec.encode(mean)
        e2.copy_(mean.sub_(self.codec.decode(payload, c)))
        return payload

    @torch.no_grad()
    def combine_chunks(self, gathered: torch.Tensor, n: int, shared: torch.Tensor | None,
                       nonnegative: bool) -> torch.Tensor:
        """Every owner's reduced chunk (``[M, bytes]``) -> the mean change [n]; S updated as in
        :meth:`combine`."""
        world_size = gathered.shape[0]
        return _add_to_shared(self.codec.decode(gathered, -(-n // world_size)).reshape(-1)[:n], shared, nonnegative)

    def state_dict(self) -> dict[str, Any]:
        return {"owner_error": {k: t.detach().clone() for k, t in self.owner_error.items()},
                "error": [t.detach().clone() for t in self.error],
                "shared": None if self.shared is None else [t.detach().clone() for t in self.shared]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for mine, saved in zip(self.error, state["error"]):
            mine.copy_(saved)
        self.owner_error = {k: t.detach().clone().to(self.error[0].device)
                            for k, t in state.get("owner_error", {}).items()}
        if self.shared is not None:
            if state.get("shared") is None:
                raise ConfigError("the checkpoint's compressed sync has no shared value; resume with its settings")
            for mine, saved in zip(self.shared, state["shared"]):
                mine.copy_(saved)
