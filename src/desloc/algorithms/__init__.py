"""The registry of methods. Names here are the CLI's ``--method`` values.

Every method is a row of data in :data:`METHODS` (a :class:`Preset`): which class runs it, how
its state periods follow from K_x, whether it zeroes states or takes an outer step by default,
and which inner optimizer it needs. :class:`MethodConfig` resolves a user's settings against
that row, and ``build_method(cfg, inner, comm, roles)`` turns a validated config and an inner
optimizer into the wrapping :class:`~desloc.algorithms.base.SyncedOptimizer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from desloc.algorithms.base import SyncedOptimizer
from desloc.algorithms.ddp import DDP
from desloc.algorithms.desloc import DesLoc
from desloc.algorithms.diloco import DiLoCo
from desloc.algorithms.gasloc import GasLoc
from desloc.algorithms.outer import OuterFactory, default_outer_momentum, nesterov_sgd
from desloc.comm.base import Communicator
from desloc.errors import ConfigError, check_finite, check_period
from desloc.optim.roles import StateRole


@dataclass(frozen=True)
class Preset:
    """One registered method, as data.

    cls: the class that runs it.
    summary: one line for ``desloc methods``.
    state_periods: how K_u and K_v follow from K_x -- "tunable" (default ``u_times`` K_x and
        ``v_times`` K_x, the user may set them), "tied" (always K_x), or "none" (never synced).
    why_fixed: for "tied" / "none", what the method does with its states (for error messages).
    reset_states: zero the states at every parameter sync (reset-states).
    outer: the outer optimizer used unless the config names one (None = plain averaging).
    inner: the inner optimizer family the method needs (MT-DAO), or None for any.
    """

    cls: type
    summary: str
    state_periods: str = "none"
    u_times: int = 0
    v_times: int = 0
    why_fixed: str = ""
    reset_states: bool = False
    outer: str | None = None
    inner: str | None = None

    @property
    def has_sync_period(self) -> bool:
        """False for DDP, which all-reduces the gradient every step."""
        return self.cls is not DDP

    @property
    def gossips(self) -> bool:
        """Exchanges with random peers (topology, local steps) instead of all-reducing."""
        return self.cls is GasLoc


METHODS: dict[str, Preset] = {
    "ddp": Preset(DDP, "all-reduce the gradient every step", why_fixed="syncs every step"),
    "local-adam": Preset(DesLoc, "parameters and all optimizer states every K steps", "tied",
                         why_fixed="syncs every state with the parameters (every K_x)"),
    "desloc": Preset(DesLoc, "parameters every K_x, first moment every K_u, second every K_v", "tunable", 3, 6),
    "keep-states": Preset(DesLoc, "parameters every K_x, optimizer states never (FAVG+OPT)",
                          why_fixed="never syncs optimizer states"),
    "reset-states": Preset(DesLoc, "parameters every K_x, states zeroed at each parameter sync",
                           why_fixed="zeroes optimizer states at each parameter sync", reset_states=True),
    "mtdao": Preset(DesLoc, "MT-DAO: N first momenta, each synced every K_j; x every K_x, v every K_v",
                    "tunable", 1, 1, inner="mtdao"),  # the paper's K = 32 example: every period K_x
    "gasloc": Preset(GasLoc, "gossip with random peers every H steps after a local outer Nesterov step",
                     why_fixed="never syncs optimizer states", outer="nesterov"),
    "diloco": Preset(DiLoCo, "every H = K_x steps an outer Nesterov step on the averaged pseudo-gradient",
                     why_fixed="never syncs optimizer states", outer="nesterov"),
}


AUTO = "auto"  # a period resolved from period_x by the method


@dataclass
class MethodConfig:
    """Which method and its sync periods.

    name: registry name (see :data:`METHODS`).
    period_x: K_x, steps between parameter averages (the K of local-adam / keep-states /
        reset-states).
    period_u: K_u, first-moment period for desloc: ``"auto"`` (default) = 3 * period_x,
        None = never.
    period_v: K_v, second-moment period for desloc: ``"auto"`` (default) = 6 * period_x,
        None = never.
    clip_rho: coordinate-wise gradient clip bound, None = off.
    outer: outer optimizer on the pseudo-gradient at each parameter sync: "nesterov" (SGD with
        Nesterov momentum), "sgd" (plain momentum) or None (plain averaging). diloco defaults to
        "nesterov"; desloc and local-adam accept it too (the paper's "DES-LOC + Nesterov").
    outer_lr, outer_momentum: the outer SGD's learning rate (DiLoCo: 0.7) and momentum; "auto"
        (default) = :func:`~desloc.algorithms.outer.default_outer_momentum` of period_x (0 for
        H <= 50 up to DiLoCo's 0.9 from H = 500).
    topology: gasloc's gossip graph: one-peer | two-peer | ring | complete | none.
    local_steps: gasloc's per-worker local-step counts H_i (<= period_x = H); None = all H;
        "auto" = from the time model (:func:`desloc.timing.auto_local_steps`).
    gossip_seed: seed of gasloc's random matchings (identical on every worker).
    momentum_periods: K_j for each first momentum u^j of an MT-DAO inner optimizer (mtdao,
        desloc); None = every momentum on period_u.
    param_delay: d, apply each parameter average d steps after launching it, overlapping its
        all-reduce with d steps of compute (0 = blocking, the default; 0 <= d < period_x; methods
        that average parameters: the desloc family and diloco). Changes the algorithm
        (:mod:`desloc.algorithms.desloc`).
    overlap: leave state syncs in flight until the next inner step reads them (exact: bitwise
        the blocking result); False = every sync blocks (``--no-overlap``).
    """

    name: str = "desloc"
    period_x: int = 256
    period_u: int | None | str = "auto"
    period_v: int | None | str = "auto"
    clip_rho: float | None = None
    outer: str | None = None
    outer_lr: float = 0.7
    outer_momentum: float | str = "auto"
    topology: str = "one-peer"
    local_steps: list[int] | str | None = None
    gossip_seed: int = 0
    momentum_periods: list[int | None] | None = None
    param_delay: int = 0
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"unknown method {self.name!r}; choose one of {sorted(METHODS)}")
        check_period("period_x (K_x)", self.period_x)
        for field in ("period_u", "period_v"):
            if getattr(self, field) != AUTO:
                check_period(f"{field} (K_{field[-1]})", getattr(self, field), allow_none=True)
        if self.clip_rho is not None:
            check_finite("clip_rho", self.clip_rho, "clip_rho=1.0, or None (off)")
        check_finite("outer_lr", self.outer_lr, "outer_lr=0.7 (DiLoCo)")
        if self.outer_momentum == AUTO:
            self.outer_momentum = default_outer_momentum(self.period_x)
        check_finite("outer_momentum", self.outer_momentum, "outer_momentum=0.9 (DiLoCo at H ~ 500)")
        if self.clip_rho is not None and not self.clip_rho > 0:
            raise ConfigError(f"clip_rho must be > 0 or None (off), got {self.clip_rho}")
        preset = METHODS[self.name]
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"overlap must be true or false, got {self.overlap!r}")
        if isinstance(self.param_delay, bool) or not isinstance(self.param_delay, int) or self.param_delay < 0:
            raise ConfigError(f"param_delay (--param-delay) must be an integer >= 0, got {self.param_delay!r}; "
                              "0 = blocking parameter sync")
        if self.param_delay:
            if not preset.has_sync_period or preset.gossips:
                raise ConfigError(f"--param-delay delays a parameter average; {self.name} "
                                  + ("all-reduces the gradient every step" if not preset.has_sync_period
                                     else "gossips instead of averaging") + ". Drop --param-delay")
            if self.param_delay >= self.period_x:
                raise ConfigError(f"param_delay={self.param_delay} must be < K_x={self.period_x} (one parameter "
                                  f"average in flight at a time); e.g. --param-delay {max(1, self.period_x // 4)}")
        if self.outer is None:
            self.outer = preset.outer
        if self.outer not in (None, "nesterov", "sgd"):
            raise ConfigError(f"outer must be 'nesterov', 'sgd' or None, got {self.outer!r}")
        if self.outer is not None and not preset.has_sync_period:
            raise ConfigError("ddp has no parameter sync to put an outer optimizer on; drop --outer")
        if not self.outer_lr > 0:
            raise ConfigError(f"outer_lr must be > 0, got {self.outer_lr}; DiLoCo uses 0.7")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ConfigError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}; DiLoCo uses 0.9")
        from desloc.topology import TOPOLOGIES

        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"unknown topology {self.topology!r}; choose one of {TOPOLOGIES}")
        if self.local_steps == AUTO:
            if not preset.gossips:
                raise ConfigError(f"local_steps='auto' sizes gasloc's per-worker local steps; {self.name} has none")
        elif self.local_steps is not None:
            self.local_steps = list(self.local_steps)
            if any(isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= self.period_x
                   for h in self.local_steps):
                raise ConfigError(f"local_steps (H_i) must be integers in [1, period_x={self.period_x}], "
                                  f"got {self.local_steps}; e.g. --local-steps {self.period_x},{max(1, self.period_x // 4)}")
        if self.momentum_periods is not None:
            self.momentum_periods = list(self.momentum_periods)
            for j, k in enumerate(self.momentum_periods):
                check_period(f"momentum_periods[{j}] (K_{j})", k, allow_none=True)
            if preset.state_periods != "tunable":
                raise ConfigError(f"momentum_periods apply to {tunable_methods()}, not {self.name}")
        if preset.state_periods == "tunable":
            if self.period_u == AUTO:
                self.period_u = preset.u_times * self.period_x
            if self.period_v == AUTO:
                self.period_v = preset.v_times * self.period_x
        elif preset.state_periods == "tied":
            for field in ("period_u", "period_v"):
                val = getattr(self, field)
                if val != AUTO and val != self.period_x:
                    raise ConfigError(
                        f"{self.name} {preset.why_fixed}, so {field} must equal period_x={self.period_x} "
                        f"(got {val}); use --method desloc for different periods"
                    )
            self.period_u = self.period_v = self.period_x
        else:  # the method never syncs states
            self.period_u = self.period_v = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tunable_methods() -> str:
    return " and ".join(n for n, p in METHODS.items() if p.state_periods == "tunable")


def outer_factory(cfg: MethodConfig) -> OuterFactory | None:
    """The outer optimizer named by ``cfg.outer`` (SGD on the pseudo-gradient), or None."""
    if cfg.outer is None:
        return None
    return nesterov_sgd(cfg.outer_lr, cfg.outer_momentum, nesterov=cfg.outer == "nesterov")


def state_periods(cfg: MethodConfig, roles: dict[str, StateRole]) -> dict[str, int | None]:
    """State name -> period from its role: v -> K_v; u -> K_u, MT-DAO's u^j -> momentum_periods[j]."""
    u, v = cfg.period_u, cfg.period_v
    per_momentum = cfg.momentum_periods if u is not None else None  # states that never sync ignore them
    if per_momentum is not None:
        n_momenta = sum(1 for r in roles.values() if r.index is not None)
        if len(per_momentum) != n_momenta:
            raise ConfigError(f"momentum_periods has {len(per_momentum)} entries but the inner "
                              f"optimizer has {n_momenta} MT-DAO momenta (u0, u1, ...); give one period "
                              "per momentum" + ("" if n_momenta else ", or drop momentum_periods"))
    out: dict[str, int | None] = {}
    for name, role in roles.items():
        if role.moment == 2:
            out[name] = v  # type: ignore[assignment]
        elif role.index is not None and per_momentum is not None:
            out[name] = per_momentum[role.index]
        else:
            out[name] = u  # type: ignore[assignment]
    return out


def parse_method_spec(spec: str) -> dict[str, Any]:
    """``name[+outer][@topology]`` -> MethodConfig fields, e.g. ``desloc+nesterov``, ``gasloc@two-peer``."""
    out: dict[str, Any] = {}
    name = spec
    if "@" in name:
        name, out["topology"] = name.split("@", 1)
    if "+" in name:
        name, out["outer"] = name.split("+", 1)
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} in {spec!r}; choose from {sorted(METHODS)}, "
                          "optionally with +nesterov / +sgd (outer) or @<topology> (gasloc)")
    out["name"] = name
    return out


def build_method(
    cfg: MethodConfig,
    inner: torch.optim.Optimizer,
    comm: Communicator,
    state_roles: Mapping[str, StateRole | str],
    **kwargs: Any,
) -> SyncedOptimizer:
    """Wrap ``inner`` in the method ``cfg.name``. ``state_roles`` maps state names to their role
    (:class:`~desloc.optim.roles.StateRole`, or its text "u", "u<j>", "v")."""
    preset = METHODS[cfg.name]
    roles = {name: StateRole.parse(role) for name, role in state_roles.items()}
    if preset.inner == "mtdao":
        from desloc.optim import MTDAO

        if not isinstance(inner, MTDAO):
            raise ConfigError(f"method {cfg.name} needs the MT-DAO inner optimizer (--inner mtdao or "
                              f"mtdao-adam), got {type(inner).__name__}")
    kwargs.setdefault("clip_rho", cfg.clip_rho)
    if preset.cls is DDP:
        opt: SyncedOptimizer = DDP(inner, comm, **kwargs)
    elif preset.cls is DiLoCo:
        kwargs.setdefault("param_delay", cfg.param_delay)
        kwargs.setdefault("overlap", cfg.overlap)
        opt = DiLoCo(inner, comm, cfg.period_x, list(roles), outer=kwargs.pop("outer", outer_factory(cfg)), **kwargs)
    elif preset.cls is GasLoc:
        kwargs.setdefault("state_names", list(roles))
        opt = GasLoc(inner, comm, cfg.period_x, topology=cfg.topology, outer_lr=cfg.outer_lr,
                     outer_momentum=cfg.outer_momentum, nesterov=cfg.outer == "nesterov",
                     local_steps=cfg.local_steps, seed=cfg.gossip_seed, **kwargs)
    else:
        kwargs.setdefault("outer", outer_factory(cfg))
        kwargs.setdefault("param_delay", cfg.param_delay)
        kwargs.setdefault("overlap", cfg.overlap)
        opt = DesLoc(inner, comm, cfg.period_x, state_periods(cfg, roles),
                     reset_states_on_param_sync=preset.reset_states, **kwargs)
    opt.algorithm = cfg.name
    return opt


__all__ = ["parse_method_spec", "DDP", "DesLoc", "DiLoCo", "GasLoc", "METHODS", "MethodConfig", "Preset",
           "SyncedOptimizer", "build_method"]
