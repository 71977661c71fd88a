"""desloc: low-communication distributed training (DES-LOC and its baselines).

Public API::

    from desloc import DesLoc, DDP, SimulatedComm, MethodConfig, build_method
    from desloc.comm.torch_dist import TorchDistComm, init_from_env
"""

from desloc.algorithms import DDP, METHODS, DesLoc, SyncedOptimizer, MethodConfig, build_method
from desloc.comm import CommLedger, Communicator, SimulatedComm
from desloc.errors import CheckpointMismatchError, ConfigError
from desloc.optim import ADOPT, InnerConfig

__version__ = "0.1.0"  # the package's version (pyproject.toml reads it; `desloc --version` prints it)
__all__ = [
    "ADOPT", "CheckpointMismatchError", "CommLedger", "Communicator", "ConfigError", "DDP",
    "DesLoc", "InnerConfig", "SyncedOptimizer", "METHODS", "MethodConfig", "SimulatedComm",
    "build_method",
]
