r"""MT-DAO inner optimizer (Iacob et al., ICLR 2026): N first momenta on different timescales.

N first momenta u^j (decay beta_j), one second moment v, mixing weights omega_j >= 0 with
sum_j omega_j <= 1. ``step`` t counts earlier calls (0 on the first).

ADOPT flavour (``flavour="adopt"``; QHADOPT for N = 1)::

    t = 0:     v <- g^2                                  (no parameter update, no decay)
    t >= 1:    n   = clamp(g / max(sqrt(v), eps), -t^(1/4), t^(1/4))   (v from step t - 1)
               u^j <- beta_j u^j + (1 - beta_j) n                       for each j
               x   <- x (1 - lr wd) - lr ((1 - sum_j omega_j) n + sum_j omega_j u^j)
               v   <- beta2 v + (1 - beta2) g^2

Adam flavour (``flavour="adam"``; bias-corrected, tau = t + 1 counts from 1 on the first call)::

    u^j <- beta_j u^j + (1 - beta_j) g;   v <- beta2 v + (1 - beta2) g^2
    x   <- x (1 - lr wd)
           - lr ((1 - sum_j omega_j) g + sum_j omega_j u^j / (1 - beta_j^tau))
                / (sqrt(v / (1 - beta2^tau)) + eps)

Symbols -> arguments and state names: beta_j -> ``betas[j]``, omega_j -> ``omegas[j]``,
u^j -> state ``exp_avg_{j}`` (role ``u{j}``), v -> state ``exp_avg_sq`` (role ``v``), beta2 ->
``beta2``, wd -> ``weight_decay`` (decoupled). :func:`state_roles` gives the role map.

Sync rule (run under DES-LOC): x every K_x steps, u^j every K_j steps, v every K_v steps; each
state is averaged, never reset, and the scalar ``step`` is never sent (identical on all workers).
Communication per step, in model-sized tensors: 1/K_x + sum_j 1/K_j + 1/K_v (K = 32 for all
with N = 1 gives 3/32, ~10.7x less than DDP).

Reductions (tests/test_mtdao.py): sum omega = 0 -> the un-mixed normalized-gradient step
(ADOPT: x <- x - lr n; Adam: x <- x - lr g / (sqrt(vhat) + eps)); N = 1, omega = (1,) -> the
base optimizer (desloc ADOPT bitwise; torch AdamW to rounding). Momenta with omega_j = 0 are
kept and synced but do not move x.

Defaults [open: the paper's exact values are not known to us] -- chosen from half-lives
tau_0.5(beta) = ln 0.5 / ln beta:
  * betas = (0.9, 0.99). The fast momentum is the usual beta1 = 0.9 (tau 6.6 steps): it tracks
    the local, recent direction. The slow one, 0.99 (tau 69 steps), spans a sync round: at
    K = 32 (the paper's communication example) it still holds 0.99^32 = 72% of its value from
    the last sync at the end of the round, whereas 0.9 keeps 0.9^32 = 3%. We stop at 0.99 rather
    than 0.995 / 0.999 because the ADOPT flavour, like ADOPT, is not bias-corrected: u^j starts
    at 0 and reaches 1 - beta_j^t of its mass, i.e. 63% after 1 / (1 - beta_j) steps -- 100 steps
    for 0.99, within a usual LR warmup, but 1000 for 0.999, which would quietly shrink the step
    for a long time. For rounds much longer than 69 steps (DES-LOC's K_x = 256) pass a slower
    beta, e.g. betas=(0.9, 0.999) (tau 693, 0.999^256 = 77% kept).
  * omegas = (0.45, 0.45). sum omega = 0.9 < 1, so the current normalized gradient enters
    directly with weight 0.1 -- the (1 - beta1) share a plain beta1 = 0.9 momentum gives it --
    and the step still reacts to new curvature; the rest is split equally between the local
    (fast) and the global, round-spanning (slow) direction. Every EMA has unit mass, so the
    update's total weight stays 1 and lr transfers from ADOPT / AdamW unchanged.
  * beta2 = 0.9999 (adopt, as the papers use ADOPT) or 0.999 (adam); eps = 1e-6 / 1e-8.

Every operation is elementwise (scalars shared), so one instance over worker-stacked tensors
equals M independent instances. The update body is shared with ADOPT in
:mod:`desloc.optim.elementwise`; :func:`mtdao_adopt_update` and :func:`mtdao_adam_update` apply it
to one tensor, and the class only validates arguments and names the states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from desloc.errors import ConfigError
from desloc.optim.roles import StateRole
from desloc.optim.elementwise import (
    ElementwiseOptimizer, Rule, adam_flavour_step, adopt_flavour_step, check_decay, check_lr_eps_wd,
)

FLAVOURS = ("adopt", "adam")
_BETA2 = {"adopt": 0.9999, "adam": 0.999}
_EPS = {"adopt": 1e-6, "adam": 1e-8}


def momentum_names(num_momenta: int) -> tuple[str, ...]:
    """State names of the first momenta u^0 .. u^(N-1)."""
    return tuple(f"exp_avg_{j}" for j in range(num_momenta))


def state_roles(num_momenta: int) -> dict[str, StateRole]:
    """State name -> role for an MT-DAO with ``num_momenta`` first momenta (u^j is ``u<j>``)."""
    roles = {name: StateRole(1, j) for j, name in enumerate(momentum_names(num_momenta))}
    roles["exp_avg_sq"] = StateRole(2)
    return roles


def mtdao_adopt_update(
    param: torch.Tensor, grad: torch.Tensor, exp_avgs: Sequence[torch.Tensor],
    exp_avg_sq: torch.Tensor, step: int, lr: float, betas: Sequence[float],
    omegas: Sequence[float], beta2: float, eps: float, weight_decay: float,
) -> None:
    """One ADOPT-flavour MT-DAO step in place. ``step`` is the number of earlier calls."""
    adopt_flavour_step([param], [grad], [[u] for u in exp_avgs], [exp_avg_sq], step, lr, betas, omegas,
                       beta2, eps, weight_decay)


def mtdao_adam_update(
    param: torch.Tensor, grad: torch.Tensor, exp_avgs: Sequence[torch.Tensor],
    exp_avg_sq: torch.Tensor, step: int, lr: float, betas: Sequence[float],
    omegas: Sequence[float], beta2: float, eps: float, weight_decay: float,
) -> None:
    """One Adam-flavour MT-DAO step in place. ``step`` is the number of earlier calls."""
    adam_flavour_step([param], [grad], [[u] for u in exp_avgs], [exp_avg_sq], step, lr, betas, omegas,
                      beta2, eps, weight_decay)


class MTDAO(ElementwiseOptimizer):
    """MT-DAO with ``len(betas)`` first momenta; see the module docstring for the update."""

    def __init__(
        self, params, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.99),
        omegas: Sequence[float] = (0.45, 0.45), beta2: float | None = None,
        eps: float | None = None, weight_decay: float = 0.0, flavour: str = "adopt",
    ):
        if flavour not in FLAVOURS:
            raise ConfigError(f"MTDAO flavour must be one of {FLAVOURS}, got {flavour!r}")
        super().__init__(params, dict(
            lr=lr, betas=tuple(float(b) for b in betas), omegas=tuple(float(w) for w in omegas),
            beta2=_BETA2[flavour] if beta2 is None else beta2,
            eps=_EPS[flavour] if eps is None else eps, weight_decay=weight_decay, flavour=flavour,
        ))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate per-group overrides too (betas, omegas, flavour, ...), as tuples of floats."""
        for key in ("betas", "omegas"):
            if key in param_group:
                param_group[key] = tuple(float(x) for x in param_group[key])
        super().add_param_group(param_group)

    def _validate(self, hyper: dict[str, Any]) -> None:
        """Validate one group's hyperparameters; raise ConfigError naming the argument and the fix."""
        if hyper["flavour"] not in FLAVOURS:
            raise ConfigError(f"MTDAO flavour must be one of {FLAVOURS}, got {hyper['flavour']!r}")
        betas, omegas = hyper["betas"], hyper["omegas"]
        if len(betas) < 1:
            raise ConfigError("MTDAO betas must hold at least one momentum decay, got (); e.g. betas=(0.9, 0.99)")
        if len(omegas) != len(betas):
            raise ConfigError(
                f"MTDAO omegas must have one weight per momentum: len(betas) = {len(betas)} but "
                f"omegas = {tuple(omegas)} has {len(omegas)}; pass {len(betas)} weights"
            )
        for j, b in enumerate(betas):
            check_decay("MTDAO", f"betas[{j}]", b, "; e.g. 0.9 (fast) or 0.99 (slow)")
        for j, w in enumerate(omegas):
            if not w >= 0.0:
                raise ConfigError(
                    f"MTDAO omegas[{j}] must be >= 0, got {w}; use 0 to leave momentum {j} out of the step"
                )
        if not sum(omegas) <= 1.0 + 1e-12:
            raise ConfigError(
                f"MTDAO omegas must sum to <= 1, got sum{tuple(omegas)} = {sum(omegas)}; "
                "scale them down (1 - sum is the weight of the current gradient)"
            )
        check_decay("MTDAO", "beta2", hyper["beta2"], f"; e.g. {_BETA2[hyper['flavour']]}")
        check_lr_eps_wd("MTDAO", hyper, eps_hint=_EPS[hyper["flavour"]])

    def _rule(self, group: dict[str, Any]) -> Rule:
        return Rule(group["flavour"], momentum_names(len(group["betas"])), group["betas"], group["omegas"],
                    group["beta2"])
