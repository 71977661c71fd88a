"""Communication: one interface (:class:`Communicator`), two implementations, one ledger."""

from desloc.comm.base import Communicator
from desloc.comm.ledger import CommLedger
from desloc.comm.simulated import SimulatedComm

__all__ = ["Communicator", "CommLedger", "SimulatedComm", "TorchDistComm"]


def __getattr__(name: str):  # lazy: importing desloc.comm does not import torch.distributed
    if name == "TorchDistComm":
        from desloc.comm.torch_dist import TorchDistComm

        return TorchDistComm
    raise AttributeError(name)
