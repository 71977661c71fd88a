"""The sharded engine: a worker is a replica group of N processes sharding the model with FSDP2
(``--shard N``, under one torchrun of M x N processes).

The mesh and the sharding are :mod:`desloc.comm.fsdp`'s, the communicator across the groups
:class:`desloc.comm.mesh.MeshComm`, the checkpoints' serialization :mod:`desloc.comm.dcp`'s. This
engine owns the layout: every process writes the skeleton of its state to its own checkpoint
file (``rank<g>.pt``, g its global rank), and each replica group writes its DTensors as one DCP
checkpoint next to them (:func:`replica_checkpoint_dir`); rank 0 writes the records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from desloc.comm.mesh import MeshComm
from desloc.comm.torch_dist import init_from_env
from desloc.config import TrainConfig
from desloc.errors import ConfigError
from desloc.records import RunDir, writing
from desloc.runtime.processes import ProcessEngine
from desloc.workers import ShardedWorkers, Workers


def replica_checkpoint_dir(run: RunDir, step: int, replica: int) -> Path:
    """Replica group ``replica``'s DCP checkpoint of ``step`` in ``run``."""
    return run.checkpoint_file(step, 0).parent / f"replica{replica}"


class ShardedEngine(ProcessEngine):
    """This process's shard of its worker (:class:`desloc.workers.ShardedWorkers`) over a
    :class:`~desloc.comm.mesh.MeshComm`."""

    comm: MeshComm

    def __init__(self, comm: MeshComm, device: str, name: str):
        super().__init__(comm, device, name)
        self.mesh = comm.mesh
        self.shards = self.mesh.shards

    @classmethod
    def launch(cls, cfg: TrainConfig, backend: str, device: str, timeout_s: float) -> ShardedEngine:
        """Join torchrun's process group and build the (replicate, shard) mesh, checking that it
        holds ``cfg.workers`` replica groups of ``cfg.shard``."""
        from desloc.comm.fsdp import check_shard, init_mesh

        check_shard(cfg.shard, int(os.environ["WORLD_SIZE"]))  # before any process group exists
        init_from_env(backend, timeout_s=timeout_s)
        if backend == "gloo":
            limit_cpu_heap_fragmentation()
        comm = MeshComm(init_mesh(cfg.shard, "cuda" if backend == "nccl" else "cpu"))
        if comm.world_size != cfg.workers:
            raise ConfigError(f"--workers {cfg.workers} but torchrun started {comm.world_size * cfg.shard} processes, "
                              f"{comm.world_size} replica groups of --shard {cfg.shard}; pass --workers "
                              f"{comm.world_size} (or leave it out)")
        return cls(comm, device, backend)

    def make_workers(self, model: nn.Module, world_size: int) -> Workers:
        from desloc.comm.fsdp import shard_model

        return ShardedWorkers(shard_model(model, self.mesh), self.comm, self.mesh.shard, self.mesh.shards)

    # ---------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, run: RunDir, step: int, state: dict[str, Any]) -> None:
        """The replica group's DTensors to its DCP checkpoint (collective over the group's shards), the
        rest to this process's file."""
        from desloc.comm.dcp import save_sharded

        where = replica_checkpoint_dir(run, step, self.comm.rank)
        with writing(where, serializer=False):  # a failed write names the directory (records.writing)
            skeleton = save_sharded(state, where, self.mesh)
        super().save_checkpoint(run, step, skeleton)

    def load_checkpoint(self, run: RunDir, step: int) -> dict[str, Any]:
        from desloc.comm.dcp import load_sharded

        skeleton = super().load_checkpoint(run, step)
        return load_sharded(skeleton, replica_checkpoint_dir(run, step, self.comm.rank), self.mesh, self.device)

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"process_ledger": self.comm.process_ledger.state_dict()}  # what this process sent (its shards)

    def load_extras(self, ckpt: dict[str, Any]) -> None:
        if "process_ledger" in ckpt:
            self.comm.process_ledger.load_state_dict(ckpt["process_ledger"])

    # -------------------------------------------------------------------------- summary
    def per_process(self, workers: Workers, value: float) -> list[int]:
        return [int(v) for v in self.comm.world_gather(value)]

    def memory_summary(self, workers: Workers) -> dict[str, Any]:
        """Also what each process sent, and the mesh."""
        out = super().memory_summary(workers)
        ledger = self.comm.process_ledger
        processes = self.comm.world_size * self.shards
        out["shard"] = {"replica_groups": self.comm.world_size, "shards": self.shards, "processes": processes,
                        "bytes_sent_per_process": self.per_process(workers, ledger.total_bytes),
                        "bytes_by_state_this_process": ledger.method_bytes_by_tag}
        return out


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
