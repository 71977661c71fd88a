r"""Zero-copy syncs: the tensors of one tag live as views of one flat buffer.

Layout (the one DDP's gradient buckets and FSDP's flat parameters use): the tensors t_1 .. t_n
of one tag -- the parameters, one optimizer state such as ``exp_avg``, or the gradients -- of one
kind (dtype, device) are consecutive slices of one buffer::

    one worker per process:  buf = [numel]       t_i = buf[o_i : o_i + n_i].view(shape_i)
    simulator (M workers):   buf = [M, numel]    t_i = buf[:, o_i : o_i + n_i].view(M, *shape_i)

with o_i = n_1 + ... + n_{i-1}. Averaging ``buf`` in place (one collective per buffer,
:meth:`desloc.comm.base.Communicator.all_reduce_mean_flat`) averages every t_i: nothing is
copied into a bucket before the network or back after it.

:class:`FlatGroup` computes the layout and says whether given tensors *are* its views
(:meth:`FlatGroup.bound`); binding them is the owner's job, because it differs by tag
(:class:`~desloc.algorithms.base.SyncedOptimizer`): a parameter gets ``p.data = view``, a
gradient ``p.grad = view``, a state ``inner.state[p][name] = view``. An optimizer that updates
its states in place (torch's Adam/AdamW/SGD, ADOPT, MT-DAO) keeps writing into the buffer; one
that replaces a state tensor is noticed at the next sync (the tensor is no longer the view) and
its values are copied back in (``refill``), so the result stays right, only not zero-copy.

Tensors that already lie this way (e.g. :class:`~desloc.sim.StackedReplicas`' parameters and
gradients, or parameters re-homed by an earlier wrapper) are adopted as they are: no copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` address the same elements the same way (the same view, or one of them).
    A missing tensor (a gradient set to None) is no view of anything."""
    if a is None or b is None:
        return a is b
    return (a is b) or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                        and a.dtype == b.dtype and a.device == b.device)


class FlatGroup:
    """The flat layout of ``tensors`` (one tag): ``buffers`` (one per dtype and device, in order
    of first appearance) and ``views`` (``views[i]`` is where ``tensors[i]`` lives).

    ``world_size``: None for one worker per process (1-D buffers), M for the simulator's stacked
    tensors (``[M, numel]`` buffers). The constructor adopts tensors that already form such a
    buffer and otherwise allocates one and copies the values in (``copied`` says which).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], world_size: int | None = None):
        self.world_size = world_size
        self.signature = [self._signature(t) for t in tensors]
        kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            kinds.setdefault((t.dtype, t.device), []).append(i)
        self.buffers: list[torch.Tensor] = []
        self.views: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        self.slots: list[tuple[int, int, int]] = [None] * len(tensors)  # type: ignore[list-item]  # (buffer, offset, numel)
        self.copied = False
        for members in kinds.values():
            group = [tensors[i] for i in members]
            buf = self._adopt(group)
            if buf is None:
                buf = self._allocate(group)
                self.copied = True
            b = len(self.buffers)
            self.buffers.append(buf)
            offset = 0
            for i in members:
                n = self._numel(tensors[i])
                self.slots[i] = (b, offset, n)
                self.views[i] = self._view(buf, offset, tensors[i])
                offset += n
        if self.copied:
            self.refill(tensors)

    # ------------------------------------------------------------------ layout
    def _signature(self, t: torch.Tensor) -> tuple:
        return (tuple(t.shape), t.dtype, t.device)

    def _numel(self, t: torch.Tensor) -> int:
        if self.world_size is None:
            return t.numel()
        if t.dim() == 0 or t.shape[0] != self.world_size:
            raise ValueError(f"a stacked tensor has the {self.world_size} workers on dim 0, got shape {tuple(t.shape)}")
        return t[0].numel()

    def _view(self, buf: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
        n = self._numel(like)
        if self.world_size is None:
            return buf[offset : offset + n].view(like.shape)
        return buf[:, offset : offset + n].view(like.shape)

    def _allocate(self, group: list[torch.Tensor]) -> torch.Tensor:
        total = sum(self._numel(t) for t in group)
        shape = (total,) if self.world_size is None else (self.world_size, total)
        return torch.empty(shape, dtype=group[0].dtype, device=group[0].device)

    def _adopt(self, group: list[torch.Tensor]) -> torch.Tensor | None:
        """The buffer ``group`` already forms (consecutive, dense, one storage), else None."""
        first = group[0]
        storage = first.untyped_storage()
        base = first.storage_offset()
        total = sum(self._numel(t) for t in group)
        offset = 0
        for t in group:
            if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != base + offset:
                return None
            if not (t.is_contiguous() if self.world_size is None else t[0].is_contiguous()):
                return None
            if self.world_size is not None and self.world_size > 1 and t.stride()[0] != total:
                return None
            offset += self._numel(t)
        if self.world_size is None:
            size, stride, end = (total,), (1,), base + total
        else:
            size, stride, end = (self.world_size, total), (total, 1), base + self.world_size * total
        if end * first.element_size() > storage.nbytes():
            return None
        return torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, base, size, stride)

    # ------------------------------------------------------------------ checks
    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Same number, shapes and kinds of tensors as this layout was built for."""
        return len(tensors) == len(self.signature) and all(
            self._signature(t) == s for t, s in zip(tensors, self.signature))

    def bound(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Every ``tensors[i]`` is ``views[i]`` (so averaging the buffers averages them)."""
        return len(tensors) == len(self.views) and all(_same_view(t, v) for t, v in zip(tensors, self.views))

    def unbound(self, tensors: Sequence[torch.Tensor]) -> list[int]:
        return [i for i, (t, v) in enumerate(zip(tensors, self.views)) if not _same_view(t, v)]

    @torch.no_grad()
    def refill(self, tensors: Sequence[torch.Tensor], which: Sequence[int] | None = None) -> None:
        """Copy the values of ``tensors`` (all, or those at ``which``) into their views."""
        for i in range(len(tensors)) if which is None else which:
            if not _same_view(tensors[i], self.views[i]):
                self.views[i].copy_(tensors[i])

    def views_of(self, buffers: Sequence[torch.Tensor], count: int | None = None) -> list[torch.Tensor]:
        """The same layout over other buffers (e.g. a snapshot of the parameters); ``count``: only
        the first ``count`` tensors. Tensors appended later (``add_param_group``) go after the
        earlier ones in their kind's buffer, so the first ``count`` views of a grown layout read a
        snapshot taken before it grew."""
        out = []
        for (b, offset, n), v in zip(self.slots[:count], self.views[:count]):
            out.append(self._view(buffers[b], offset, v))
        return out
