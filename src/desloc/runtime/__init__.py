"""Engines: where a run's workers live, behind one protocol (:class:`Engine`, :mod:`desloc.runtime.base`).

:func:`engine_class` maps a resolved backend to its engine, :func:`start_engine` starts it (joins
torchrun's process group where there is one). The engines of real processes are imported on
demand: importing this package does not import ``torch.distributed``.
"""

from __future__ import annotations

from desloc.comm.base import Communicator
from desloc.config import TrainConfig
from desloc.runtime.base import Engine, Session, checkpoint_state, load_state
from desloc.runtime.simulator import SimEngine

__all__ = ["Engine", "Session", "SimEngine", "checkpoint_state", "engine_class", "engine_for", "load_state",
           "start_engine"]


def engine_class(backend: str, shard: int = 1) -> type[Engine]:
    """The engine of a resolved ``backend`` ("sim", "gloo", "nccl" or "torchft"; ``shard``: --shard)."""
    if backend == "sim":
        return SimEngine
    if backend == "torchft":
        from desloc.runtime.torchft import TorchftEngine

        return TorchftEngine
    if shard > 1:
        from desloc.runtime.sharded import ShardedEngine

        return ShardedEngine
    from desloc.runtime.processes import ProcessEngine

    return ProcessEngine


def start_engine(cfg: TrainConfig, backend: str, device: str, timeout_s: float = 600.0) -> Engine:
    """The engine of a run on ``backend`` ("sim", "gloo" or "nccl"; torchft's is
    :class:`desloc.runtime.torchft.FtRuntime`), its processes joined (``timeout_s``: the collectives'
    timeout)."""
    if backend == "sim":
        return SimEngine(device)
    from desloc.runtime.processes import ProcessEngine

    cls = engine_class(backend, cfg.shard)
    assert issubclass(cls, ProcessEngine), backend
    return cls.launch(cfg, backend, device, timeout_s)


def engine_for(backend: str, device: str, comm: Communicator | None) -> Engine:
    """An engine around an existing communicator ``comm`` (None in the simulator): e.g.
    ``engine_for("torchft", "cpu", comm)``, a torchft worker whose rounds the caller drives (the
    single-process references of tests/test_ft.py)."""
    if backend == "sim":
        return SimEngine(device)
    if backend == "torchft":
        from desloc.runtime.torchft import TorchftEngine

        return TorchftEngine(comm, device)
    from desloc.comm.mesh import MeshComm
    from desloc.runtime.processes import ProcessEngine
    from desloc.runtime.sharded import ShardedEngine

    return ShardedEngine(comm, device, backend) if isinstance(comm, MeshComm) else ProcessEngine(comm, device, backend)
