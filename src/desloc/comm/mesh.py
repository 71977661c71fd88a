r"""The communicator of sharded replica groups (``--shard``): desloc's syncs across the groups.

A worker is a replica group of N processes that FSDP2 shards the model over
(:mod:`desloc.comm.fsdp`: the 2-D mesh and its layout). Across groups, desloc's method averages over
the ``"replicate"`` dimension only: :class:`MeshComm` is a
:class:`~desloc.comm.torch_dist.TorchDistComm` over the replicate process group of this process's
shard column, and hands the network each DTensor's local shard (``to_local()``): shard s of group i
is averaged with shard s of every other group, and gossip pairs shard s of group i with shard s of
group j. The arithmetic is the one-worker-per-process arithmetic on a slice of every tensor, so a
sharded run computes what unsharded workers compute, up to the floating-point order of FSDP's
gradient reduction (``tests/test_sharded.py``).

Ledger: ``ledger`` counts what the replica group sends (a DTensor's global size, summed over its
shards) -- the number comparable with an unsharded worker, and what the method's schedule and
the virtual clock see; ``process_ledger`` counts what this process sends (its local shards).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from desloc.comm.fsdp import ReplicaMesh, local
from desloc.comm.ledger import CommLedger
from desloc.comm.torch_dist import DEFAULT_BUCKET_BYTES, TorchDistComm


class MeshComm(TorchDistComm):
    """Averages over the replica groups (the mesh's ``"replicate"`` dimension), on local shards.

    ``world_size`` and ``rank`` are the replica groups' (M, r): an algorithm sees M workers.
    Syncs take the copying path (``all_reduce_mean``: local shards into buckets and back), as
    FSDP2 owns the parameters' storage; DES-LOC's delayed parameter sync, which needs flat
    buffers, is refused with --shard; so are compressed syncs (``has_all_gather`` is False).
    """

    def __init__(self, rmesh: ReplicaMesh, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(group=rmesh.replicate_group, bucket_bytes=bucket_bytes)
        self.mesh = rmesh
        self.process_ledger = CommLedger(self.world_size)

    @property
    def has_flat_all_reduce(self) -> bool:
        return False

    @property
    def has_all_gather(self) -> bool:
        """False: compressed syncs (``all_gather_flat``) are not implemented for sharded replica
        groups (each shard would be encoded apart, and the ledger counts whole groups)."""
        return False

    def _locals(self, tensors):
        return [local(t) for t in tensors]

    def worker_numel(self, tensor: torch.Tensor) -> int:
        return tensor.numel()  # a DTensor's global size: what the whole replica group sends

    def _record_all_reduce(self, tensors, tags, hidden_steps=None) -> None:
        super()._record_all_reduce(tensors, tags, hidden_steps)
        if tensors:
            for tensor, tag in zip(tensors, tags):
                self.process_ledger.record(tag, local(tensor).numel() * tensor.element_size())
            self.process_ledger.record_call(tags)

    def _record_mix(self, tensors, tags, neighbours) -> None:
        super()._record_mix(tensors, tags, neighbours)
        if tensors:
            links = sorted((j, i) for i, row in enumerate(neighbours) for j, w in row if j != i and w > 0)
            for tensor, tag in zip(tensors, tags):
                self.process_ledger.record_links(tag, local(tensor).numel() * tensor.element_size(), links)
            self.process_ledger.record_call(tags)

    def group_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` in place over this replica group's shards (observer traffic: norms, metrics
        and peak memory; inside the group, not a method sync, not in the ledger)."""
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.mesh.shard_group)
        return values

    def world_gather(self, value: float) -> list[float]:
        """Every process's ``value``, in global rank order (summary only)."""
        world = dist.get_world_size()
        t = torch.zeros(world, dtype=torch.float64, device=self._device())
        t[dist.get_rank()] = value
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        """Every process of every replica group (checkpoints, data preparation, the end)."""
        dist.barrier()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
