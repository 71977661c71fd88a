"""Inner optimizers: builders by name, their state roles, and which ones are elementwise."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from desloc.errors import ConfigError, check_finite
from desloc.optim.roles import U, V, StateRole
from desloc.optim.adopt import ADOPT
from desloc.optim.mtdao import MTDAO
from desloc.optim.mtdao import state_roles as mtdao_state_roles

# Optimizers whose update of one coordinate reads only that coordinate (and shared scalars),
# so one instance over worker-stacked tensors equals M independent instances.
_ELEMENTWISE = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta, ADOPT, MTDAO,
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
    """Inner optimizer. ``name``: adamw | sgdm | adopt | mtdao (ADOPT flavour) | mtdao-adam.

    mt_betas, mt_omegas: MT-DAO's first-momentum decays beta_j and mixing weights omega_j
    (N = len(mt_betas)); beta1 is unused by mtdao.
    """

    name: str = "adamw"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float | None = None  # None: 0.999 for adamw, 0.9999 for adopt
    eps: float | None = None  # None: 1e-8 for adamw, 1e-6 for adopt
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgdm only
    mt_betas: tuple[float, ...] = (0.9, 0.99)  # mtdao only
    mt_omegas: tuple[float, ...] = (0.45, 0.45)  # mtdao only

    def __post_init__(self) -> None:
        if self.name not in INNER_OPTIMIZERS:
            raise ConfigError(
                f"unknown inner optimizer {self.name!r}; choose one of {sorted(INNER_OPTIMIZERS)}"
            )
        check_finite("inner lr", self.lr, "lr=3e-3")
        for field in ("beta1", "beta2", "eps", "weight_decay", "momentum"):
            if getattr(self, field) is not None:
                check_finite(f"inner {field}", getattr(self, field))
        if not self.lr > 0:
            raise ConfigError(f"inner lr must be > 0, got {self.lr}")
        if self.eps is not None and not self.eps > 0:
            raise ConfigError(f"inner eps must be > 0, got {self.eps}; e.g. eps=1e-8 (adamw), 1e-6 (adopt)")
        for field, val in (("beta1", self.beta1), ("beta2", self.beta2), ("momentum", self.momentum)):
            if val is not None and not 0.0 <= val < 1.0:
                raise ConfigError(f"inner {field} must be in [0, 1), got {val}")
        if self.weight_decay < 0:
            raise ConfigError(f"inner weight_decay must be >= 0, got {self.weight_decay}")
        adopt_like = self.name in ("adopt", "mtdao")
        if self.beta2 is None:
            self.beta2 = 0.9999 if adopt_like else 0.999
        if self.eps is None:
            self.eps = 1e-6 if adopt_like else 1e-8
        self.mt_betas, self.mt_omegas = tuple(self.mt_betas), tuple(self.mt_omegas)
        if self.name.startswith("mtdao"):
            self.build([torch.zeros(1)])  # MTDAO validates betas/omegas with named errors

    def build(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        if self.name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                                     weight_decay=self.weight_decay)
        if self.name == "adopt":
            return ADOPT(params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                         weight_decay=self.weight_decay)
        if self.name.startswith("mtdao"):
            return MTDAO(params, lr=self.lr, betas=self.mt_betas, omegas=self.mt_omegas, beta2=self.beta2,
                         eps=self.eps, weight_decay=self.weight_decay,
                         flavour="adam" if self.name == "mtdao-adam" else "adopt")
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def state_roles(self) -> dict[str, StateRole]:
        """State name -> role: first moments (u, MT-DAO's u^j) and the second moment (v)."""
        if self.name == "sgdm" and self.momentum == 0:
            return {}  # plain SGD keeps no momentum buffer
        if self.name.startswith("mtdao"):
            return mtdao_state_roles(len(self.mt_betas))
        return dict(INNER_OPTIMIZERS[self.name])


INNER_OPTIMIZERS: dict[str, dict[str, StateRole]] = {
    "adamw": {"exp_avg": U, "exp_avg_sq": V},
    "adopt": {"exp_avg": U, "exp_avg_sq": V},
    "sgdm": {"momentum_buffer": U},
    "mtdao": {},  # roles depend on N: see InnerConfig.state_roles
    "mtdao-adam": {},
}

__all__ = ["ADOPT", "MTDAO", "InnerConfig", "INNER_OPTIMIZERS", "StateRole", "is_elementwise", "register_elementwise"]
