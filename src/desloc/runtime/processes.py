"""The processes engine: one worker per process, launched by torchrun (``--backend gloo|nccl``)."""

from __future__ import annotations

import os

from torch import nn

from desloc.comm.torch_dist import TorchDistComm, init_from_env
from desloc.config import TrainConfig
from desloc.data import Corpus, DataConfig
from desloc.errors import ConfigError
from desloc.runtime.base import Engine
from desloc.workers import ProcessWorkers, Workers


class ProcessEngine(Engine):
    """This process's one worker (:class:`desloc.workers.ProcessWorkers`) over a
    :class:`~desloc.comm.torch_dist.TorchDistComm`; every process writes its own checkpoint file,
    rank 0 the records."""

    comm: TorchDistComm

    def __init__(self, comm: TorchDistComm, device: str, name: str):
        self.comm = comm
        self.device = device
        self.name = name  # "gloo" or "nccl"

    @classmethod
    def launch(cls, cfg: TrainConfig, backend: str, device: str, timeout_s: float) -> ProcessEngine:
        """Join torchrun's process group (``backend``), checking that it started ``cfg.workers``
        processes."""
        init_from_env(backend, timeout_s=timeout_s)
        comm = TorchDistComm()
        if comm.world_size != cfg.workers:
            raise ConfigError(f"--workers {cfg.workers} but torchrun started {comm.world_size} processes; "
                              f"pass --workers {comm.world_size}")
        return cls(comm, device, backend)

    @classmethod
    def launched_as_main(cls) -> bool:
        return int(os.environ.get("RANK", "0")) == 0

    @property
    def is_main(self) -> bool:
        return self.comm.global_rank == 0

    def make_workers(self, model: nn.Module, world_size: int) -> Workers:
        return ProcessWorkers(model, self.comm)

    def prepare_corpus(self, data: DataConfig) -> Corpus:
        """Rank 0 builds the tokenizer and token cache; the other ranks then load it."""
        if not self.is_main:
            self.comm.barrier()
        corpus = super().prepare_corpus(data)
        if self.is_main:
            self.comm.barrier()
        return corpus

    # ---------------------------------------------------------------------- checkpoints
    @classmethod
    def resume_ranks(cls, cfg: TrainConfig) -> list[int]:
        return list(range(cfg.workers * cfg.shard))

    @property
    def checkpoint_rank(self) -> int:
        return self.comm.global_rank

    @property
    def checkpoint_files(self) -> int:
        return self.comm.world_size * self.shards

    def after_save(self) -> None:
        self.comm.barrier()  # every process has written its file before latest.json points at them

    # -------------------------------------------------------------------------- summary
    def per_process(self, workers: Workers, value: float) -> list[int]:
        assert isinstance(workers, ProcessWorkers)
        return [int(v) for v in workers.per_process(value)]

    def shutdown(self) -> None:
        from desloc.comm.torch_dist import shutdown

        self.comm.barrier()
        shutdown()
