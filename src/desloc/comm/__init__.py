"""Communication: one interface (:class:`Communicator`), one ledger, and its implementations: the
simulator (:class:`SimulatedComm`), torch.distributed (:class:`TorchDistComm`), FSDP2 replica groups
(:mod:`desloc.comm.mesh`) and torchft (:mod:`desloc.comm.torchft_comm`). Everything that touches
``torch.distributed`` lives here, also the replica groups' sharding (:mod:`desloc.comm.fsdp`) and
checkpoints (:mod:`desloc.comm.dcp`)."""

from desloc.comm.base import Communicator
from desloc.comm.ledger import CommLedger
from desloc.comm.simulated import SimulatedComm

__all__ = ["Communicator", "CommLedger", "SimulatedComm", "TorchDistComm"]


def __getattr__(name: str):  # lazy: importing desloc.comm does not import torch.distributed
    if name == "TorchDistComm":
        from desloc.comm.torch_dist import TorchDistComm

        return TorchDistComm
    raise AttributeError(name)
