"""Inner optimizers: builders by name, their state roles, and which ones are elementwise."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from desloc.errors import ConfigError
from desloc.optim.adopt import ADOPT

# Optimizers whose update of one coordinate reads only that coordinate (and shared scalars),
# so one instance over worker-stacked tensors equals M independent instances.
_ELEMENTWISE = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta, ADOPT,
)
_EXTRA_ELEMENTWISE: list[type] = []


def register_elementwise(cls: type) -> type:
    """Declare an optimizer class elementwise (usable in the stacked simulator)."""
    _EXTRA_ELEMENTWISE.append(cls)
    return cls


def is_elementwise(opt: torch.optim.Optimizer) -> bool:
    return isinstance(opt, _ELEMENTWISE + tuple(_EXTRA_ELEMENTWISE))


@dataclass
class InnerConfig:
    """Inner optimizer. ``name``: adamw | sgdm | adopt."""

    name: str = "adamw"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float | None = None  # None: 0.999 for adamw, 0.9999 for adopt
    eps: float | None = None  # None: 1e-8 for adamw, 1e-6 for adopt
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgdm only

    def __post_init__(self) -> None:
        if self.name not in INNER_OPTIMIZERS:
            raise ConfigError(
                f"unknown inner optimizer {self.name!r}; choose one of {sorted(INNER_OPTIMIZERS)}"
            )
        if not self.lr > 0:
            raise ConfigError(f"inner lr must be > 0, got {self.lr}")
        for field, val in (("beta1", self.beta1), ("beta2", self.beta2), ("momentum", self.momentum)):
            if val is not None and not 0.0 <= val < 1.0:
                raise ConfigError(f"inner {field} must be in [0, 1), got {val}")
        if self.weight_decay < 0:
            raise ConfigError(f"inner weight_decay must be >= 0, got {self.weight_decay}")
        if self.beta2 is None:
            self.beta2 = 0.9999 if self.name == "adopt" else 0.999
        if self.eps is None:
            self.eps = 1e-6 if self.name == "adopt" else 1e-8

    def build(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        if self.name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                                     weight_decay=self.weight_decay)
        if self.name == "adopt":
            return ADOPT(params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                         weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def state_roles(self) -> dict[str, str]:
        """Which states are first moments (``u``) and second moments (``v``)."""
        if self.name == "sgdm" and self.momentum == 0:
            return {}  # plain SGD keeps no momentum buffer
        return INNER_OPTIMIZERS[self.name]


INNER_OPTIMIZERS: dict[str, dict[str, str]] = {
    "adamw": {"exp_avg": "u", "exp_avg_sq": "v"},
    "adopt": {"exp_avg": "u", "exp_avg_sq": "v"},
    "sgdm": {"momentum_buffer": "u"},
}

__all__ = ["ADOPT", "InnerConfig", "INNER_OPTIMIZERS", "is_elementwise", "register_elementwise"]
