"""The simulator engine: all M workers in this process (``desloc train`` without torchrun)."""

from __future__ import annotations

from torch import nn

from desloc.runtime.base import Engine
from desloc.workers import SimWorkers


class SimEngine(Engine):
    """M workers stacked in one process (:class:`desloc.workers.SimWorkers`), each with its own
    :class:`~desloc.comm.SimulatedComm`; one checkpoint file per run directory."""

    name = "sim"
    holds_all_workers = True

    def __init__(self, device: str):
        self.device = device

    @property
    def is_main(self) -> bool:
        return True

    def make_workers(self, model: nn.Module, world_size: int) -> SimWorkers:
        workers = SimWorkers(model, world_size)
        self.comm = workers.comm  # membership events make new workers, and with them a new communicator
        return workers
