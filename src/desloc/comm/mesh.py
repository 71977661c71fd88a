r"""A worker is a sharded replica group: FSDP2 inside each group, desloc's syncs across groups.

Layout (HSDP's, torchtitan's and torchft's): W processes form a 2-D ``DeviceMesh`` of
M replica groups x N shards, ``mesh_dim_names = ("replicate", "shard")``, process
``g = r * N + s`` holding shard s of replica group r::

                 shard 0   shard 1  ...  shard N-1
    replica 0    g = 0     g = 1         g = N-1       <- one desloc worker (FSDP2 over "shard")
    replica 1    g = N     g = N+1       g = 2N-1      <- another worker
    ...

Inside a replica group, ``torch.distributed.fsdp.fully_shard`` over ``mesh["shard"]`` shards every
parameter, gradient and optimizer state on dim 0 (DTensors, ``Shard(0)``): the group's forward
all-gathers the parameters, its backward reduce-scatters the gradients (averaged over the N
shards: each shard computes on its own N-th of the group's batch), and the inner optimizer steps
each process's shard. That traffic is FSDP's own, inside the group, every step.

Across groups, desloc's method averages over the ``"replicate"`` dimension only:
:class:`MeshComm` is a :class:`~desloc.comm.torch_dist.TorchDistComm` over the replicate process
group of this process's shard column, and hands the network each DTensor's local shard
(``to_local()``): shard s of group i is averaged with shard s of every other group, and gossip
pairs shard s of group i with shard s of group j. The arithmetic is the one-worker-per-process
arithmetic on a slice of every tensor, so a sharded run computes what unsharded workers compute,
up to the floating-point order of FSDP's gradient reduction (``tests/test_sharded.py``).

Ledger: ``ledger`` counts what the replica group sends (a DTensor's global size, summed over its
shards) -- the number comparable with an unsharded worker, and what the method's schedule and
the virtual clock see; ``process_ledger`` counts what this process sends (its local shards).

Checkpoints use ``torch.distributed.checkpoint`` (DCP) per replica group: replica groups diverge
between syncs, so each writes its own DCP checkpoint with its shard group as the process group
(:func:`save_sharded` / :func:`load_sharded`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from desloc.comm.ledger import CommLedger
from desloc.comm.torch_dist import DEFAULT_BUCKET_BYTES, TorchDistComm
from desloc.errors import ConfigError


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: a DTensor's local shard (a view: writes show through), or ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class ReplicaMesh:
    """The (replicate, shard) mesh of this process: M replica groups of N shards each."""

    mesh: DeviceMesh
    replicas: int  # M: desloc's workers
    shards: int  # N: processes per worker
    replica: int  # this process's replica group r
    shard: int  # this process's shard s within it

    @property
    def replicate_group(self) -> dist.ProcessGroup:
        """The M processes holding shard ``shard`` of every replica group (desloc's syncs)."""
        return self.mesh.get_group("replicate")

    @property
    def shard_group(self) -> dist.ProcessGroup:
        """The N processes of this replica group (FSDP's all-gathers and reduce-scatters)."""
        return self.mesh.get_group("shard")

    @property
    def shard_mesh(self) -> DeviceMesh:
        return self.mesh["shard"]


def init_mesh(shard: int, device_type: str = "cpu") -> ReplicaMesh:
    """The 2-D mesh of an initialised process group of W = M x ``shard`` processes."""
    if not dist.is_initialized():
        raise RuntimeError("init_mesh needs an initialised process group; call "
                           "desloc.comm.torch_dist.init_from_env() (under torchrun) first")
    world = dist.get_world_size()
    check_shard(shard, world)
    mesh = init_device_mesh(device_type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
    rank = dist.get_rank()
    return ReplicaMesh(mesh, world // shard, shard, rank // shard, rank % shard)


def check_shard(shard: int, world: int) -> None:
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 1:
        raise ConfigError(f"--shard must be an integer >= 1 (processes per replica group), got {shard!r}")
    if world % shard:
        raise ConfigError(f"--shard {shard}: the world size {world} (torchrun's processes) is not divisible by "
                          f"{shard}; launch a multiple of {shard} processes (e.g. --nproc_per_node "
                          f"{shard * max(1, world // shard)}) or choose a --shard that divides {world}")


def shard_model(model: nn.Module, rmesh: ReplicaMesh, blocks: list[nn.Module] | None = None) -> nn.Module:
    """FSDP2 over the replica group: ``fully_shard`` each block (default: ``model.blocks``), then
    the root (embeddings, final norm, the tied head). Returns ``model``, now sharded in place."""
    from torch.distributed.fsdp import fully_shard

    mesh = rmesh.shard_mesh
    for block in (list(model.blocks) if blocks is None else blocks):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


MMAP_THRESHOLD_BYTES = 1 << 20


def limit_cpu_heap_fragmentation(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations of ``threshold`` bytes and more with their own mappings (glibc ``mallopt``).

    FSDP on CPU allocates and frees a layer's gathered parameters and gradients every step (tens of
    MB each). glibc raises its mmap threshold each time such a block is freed, after which they come
    from the heap, which fragments and keeps growing: measured on the 125m preset, a sharded
    process's resident memory grew by ~0.3 GB per step and peaked above the unsharded process's.
    A fixed threshold (which also turns off glibc's adjustment) returns them to the system when
    freed: the same run then peaks at 1.37 GiB against 1.95 GiB unsharded (benchmarks/README.md,
    sharded_memory). Returns False where there is no glibc (nothing is changed)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class MeshComm(TorchDistComm):
    """Averages over the replica groups (the mesh's ``"replicate"`` dimension), on local shards.

    ``world_size`` and ``rank`` are the replica groups' (M, r): an algorithm sees M workers.
    Syncs take the copying path (``all_reduce_mean``: local shards into buckets and back), as
    FSDP2 owns the parameters' storage; DES-LOC's delayed parameter sync, which needs flat
    buffers, is refused with --shard.
    """

    def __init__(self, rmesh: ReplicaMesh, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(group=rmesh.replicate_group, bucket_bytes=bucket_bytes)
        self.mesh = rmesh
        self.process_ledger = CommLedger(self.world_size)

    @property
    def has_flat_all_reduce(self) -> bool:
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

    def shard_sum(self, values: torch.Tensor) -> torch.Tensor:
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


# ------------------------------------------------------------------------------- checkpoints
_REF = "__desloc_dtensor__"


def _placement_spec(p) -> list:
    if isinstance(p, Shard):
        return ["shard", p.dim]
    if isinstance(p, Replicate):
        return ["replicate"]
    raise ValueError(f"cannot checkpoint a DTensor placed {p!r} (only Shard and Replicate)")


def _placement(spec: list):
    return Shard(int(spec[1])) if spec[0] == "shard" else Replicate()


def split_dtensors(tree: Any, prefix: str = "") -> tuple[Any, dict[str, DTensor]]:
    """``tree`` with every DTensor replaced by a plain reference (what ``torch.save`` of a
    skeleton can hold), and the DTensors by key (what DCP saves)."""
    found: dict[str, DTensor] = {}

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, DTensor):
            found[key] = x
            return {_REF: key, "shape": list(x.shape), "stride": list(x.stride()), "dtype": str(x.dtype),
                    "local_shape": list(x.to_local().shape),
                    "placements": [_placement_spec(p) for p in x.placements]}
        if isinstance(x, dict):
            return {k: walk(v, f"{key}/{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            out = [walk(v, f"{key}/{i}") for i, v in enumerate(x)]
            return out if isinstance(x, list) else tuple(out)
        return x

    return walk(tree, prefix), found


def _refs(skeleton: Any):
    """Every DTensor reference in ``skeleton``."""
    if isinstance(skeleton, dict) and _REF in skeleton:
        yield skeleton
    elif isinstance(skeleton, dict):
        for v in skeleton.values():
            yield from _refs(v)
    elif isinstance(skeleton, (list, tuple)):
        for v in skeleton:
            yield from _refs(v)


def _dtype(ref: dict) -> torch.dtype:
    return getattr(torch, ref["dtype"].removeprefix("torch."))


def _templates(skeleton: Any, mesh: DeviceMesh, device: torch.device) -> dict[str, DTensor]:
    """An empty DTensor of each reference's global shape, placement and local shape on ``mesh``."""
    return {ref[_REF]: DTensor.from_local(torch.empty(ref["local_shape"], dtype=_dtype(ref), device=device), mesh,
                                          [_placement(p) for p in ref["placements"]], run_check=False,
                                          shape=torch.Size(ref["shape"]), stride=tuple(ref["stride"]))
            for ref in _refs(skeleton)}


def _fill(skeleton: Any, tensors: dict[str, DTensor]) -> Any:
    if isinstance(skeleton, dict) and _REF in skeleton:
        return tensors[skeleton[_REF]]
    if isinstance(skeleton, dict):
        return {k: _fill(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_fill(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(_fill(v, tensors) for v in skeleton)
    return skeleton


def save_sharded(state: dict[str, Any], directory: Path, rmesh: ReplicaMesh) -> Any:
    """Write ``state``'s DTensors as one DCP checkpoint of this replica group in ``directory``
    (collective over the group's shards); returns the skeleton (everything else, with references)
    for the caller to save per process."""
    import torch.distributed.checkpoint as dcp

    skeleton, tensors = split_dtensors(state)
    dcp.save(tensors, checkpoint_id=str(directory), process_group=rmesh.shard_group)
    return skeleton


def load_sharded(skeleton: Any, directory: Path, rmesh: ReplicaMesh, device: torch.device | str = "cpu") -> Any:
    """The state :func:`save_sharded` wrote: DTensors read from the replica group's DCP checkpoint in
    ``directory`` into ``skeleton``'s references (same mesh: each process reads its own shards)."""
    import torch.distributed.checkpoint as dcp

    tensors = _templates(skeleton, rmesh.shard_mesh, torch.device(device))
    dcp.load(tensors, checkpoint_id=str(directory), process_group=rmesh.shard_group)
    return _fill(skeleton, tensors)


def load_sharded_offline(skeleton: Any, directory: Path) -> Any:
    """A replica group's checkpoint as whole tensors, in one process without a process group
    (``desloc sample`` on a ``--shard`` run): every DTensor reference becomes a plain tensor of
    its global shape, read from the group's DCP checkpoint in ``directory``."""
    import warnings

    import torch.distributed.checkpoint as dcp

    tensors = {ref[_REF]: torch.empty(ref["shape"], dtype=_dtype(ref)) for ref in _refs(skeleton)}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(tensors, checkpoint_id=str(directory), no_dist=True)
    return _fill(skeleton, tensors)
