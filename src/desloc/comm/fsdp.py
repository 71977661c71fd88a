r"""A worker as a sharded replica group: the 2-D device mesh and FSDP2 sharding of ``--shard``.

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
each process's shard. That traffic is FSDP's own, inside the group, every step. Across groups,
desloc's method averages over the ``"replicate"`` dimension (:class:`desloc.comm.mesh.MeshComm`).
The engine that runs such workers is :mod:`desloc.runtime.sharded`; their checkpoints are
:mod:`desloc.comm.dcp`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

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
