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
equals M independent instances. The math lives in :func:`mtdao_adopt_update` and
:func:`mtdao_adam_update`; the class only validates arguments and holds state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from desloc.errors import ConfigError
from desloc.optim.adopt import adopt_normalize

FLAVOURS = ("adopt", "adam")
_BETA2 = {"adopt": 0.9999, "adam": 0.999}
_EPS = {"adopt": 1e-6, "adam": 1e-8}


def state_roles(num_momenta: int) -> dict[str, str]:
    """State name -> role for an MT-DAO with ``num_momenta`` first momenta."""
    roles = {f"exp_avg_{j}": f"u{j}" for j in range(num_momenta)}
    roles["exp_avg_sq"] = "v"
    return roles


def _mix(current: torch.Tensor, momenta: Sequence[torch.Tensor], weights: Sequence[float],
         rest: float) -> torch.Tensor:
    """rest * current + sum_j weights[j] * momenta[j] in a new tensor. Zero weights are skipped:
    with rest = 0 the current gradient is not read at all, as in the base optimizer."""
    out = current * rest if rest != 0 else torch.zeros_like(current)
    for u, w in zip(momenta, weights):
        if w != 0:
            out.add_(u, alpha=w)
    return out


def mtdao_adopt_update(
    param: torch.Tensor, grad: torch.Tensor, exp_avgs: Sequence[torch.Tensor],
    exp_avg_sq: torch.Tensor, step: int, lr: float, betas: Sequence[float],
    omegas: Sequence[float], beta2: float, eps: float, weight_decay: float,
) -> None:
    """One ADOPT-flavour MT-DAO step in place. ``step`` is the number of earlier calls."""
    if step == 0:
        exp_avg_sq.copy_(grad * grad)
        return
    normed = adopt_normalize(grad, exp_avg_sq, step, eps)
    for u, beta in zip(exp_avgs, betas):
        u.mul_(beta).add_(normed, alpha=1 - beta)
    direction = _mix(normed, exp_avgs, omegas, max(0.0, 1.0 - sum(omegas)))
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.add_(direction, alpha=-lr)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def mtdao_adam_update(
    param: torch.Tensor, grad: torch.Tensor, exp_avgs: Sequence[torch.Tensor],
    exp_avg_sq: torch.Tensor, step: int, lr: float, betas: Sequence[float],
    omegas: Sequence[float], beta2: float, eps: float, weight_decay: float,
) -> None:
    """One Adam-flavour MT-DAO step in place. ``step`` is the number of earlier calls."""
    tau = step + 1
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    for u, beta in zip(exp_avgs, betas):
        u.mul_(beta).add_(grad, alpha=1 - beta)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    corrected = [w / (1 - beta**tau) for w, beta in zip(omegas, betas)]  # omega_j / (1 - beta_j^tau)
    direction = _mix(grad, exp_avgs, corrected, max(0.0, 1.0 - sum(omegas)))
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**tau)).add_(eps)
    param.addcdiv_(direction, denom, value=-lr)


_UPDATES = {"adopt": mtdao_adopt_update, "adam": mtdao_adam_update}


def _check(h: dict) -> None:
    """Validate one group's hyperparameters; raise ConfigError naming the argument and the fix."""
    if h["flavour"] not in FLAVOURS:
        raise ConfigError(f"MTDAO flavour must be one of {FLAVOURS}, got {h['flavour']!r}")
    betas, omegas = h["betas"], h["omegas"]
    if len(betas) < 1:
        raise ConfigError("MTDAO betas must hold at least one momentum decay, got (); e.g. betas=(0.9, 0.99)")
    if len(omegas) != len(betas):
        raise ConfigError(
            f"MTDAO omegas must have one weight per momentum: len(betas) = {len(betas)} but "
            f"omegas = {tuple(omegas)} has {len(omegas)}; pass {len(betas)} weights"
        )
    for j, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ConfigError(f"MTDAO betas[{j}] must be in [0, 1), got {b}; e.g. 0.9 (fast) or 0.99 (slow)")
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
    if not 0.0 <= h["beta2"] < 1.0:
        raise ConfigError(f"MTDAO beta2 must be in [0, 1), got {h['beta2']}; e.g. {_BETA2[h['flavour']]}")
    if not h["lr"] >= 0:
        raise ConfigError(f"MTDAO lr must be >= 0, got {h['lr']}")
    if not h["eps"] > 0:
        raise ConfigError(f"MTDAO eps must be > 0, got {h['eps']}; e.g. {_EPS[h['flavour']]}")
    if not h["weight_decay"] >= 0:
        raise ConfigError(f"MTDAO weight_decay must be >= 0, got {h['weight_decay']}; use 0 to disable")


class MTDAO(torch.optim.Optimizer):
    """MT-DAO with ``len(betas)`` first momenta; see the module docstring for the update."""

    def __init__(
        self, params, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.99),
        omegas: Sequence[float] = (0.45, 0.45), beta2: float | None = None,
        eps: float | None = None, weight_decay: float = 0.0, flavour: str = "adopt",
    ):
        if flavour not in FLAVOURS:
            raise ConfigError(f"MTDAO flavour must be one of {FLAVOURS}, got {flavour!r}")
        defaults = dict(
            lr=lr, betas=tuple(float(b) for b in betas), omegas=tuple(float(w) for w in omegas),
            beta2=_BETA2[flavour] if beta2 is None else beta2,
            eps=_EPS[flavour] if eps is None else eps, weight_decay=weight_decay, flavour=flavour,
        )
        _check(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Validate per-group overrides too (betas, omegas, flavour, ...)."""
        group = {k: v for k, v in param_group.items() if k != "params"}
        for key in ("betas", "omegas"):
            if key in group:
                param_group[key] = group[key] = tuple(float(x) for x in group[key])
        _check({**self.defaults, **group})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            n_momenta = len(group["betas"])
            update = _UPDATES[group["flavour"]]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for j in range(n_momenta):
                        state[f"exp_avg_{j}"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                momenta = [state[f"exp_avg_{j}"] for j in range(n_momenta)]
                update(p, p.grad, momenta, state["exp_avg_sq"], int(state["step"].item()),
                       group["lr"], group["betas"], group["omegas"], group["beta2"], group["eps"],
                       group["weight_decay"])
                state["step"] += 1
        return loss
