"""The registry of methods. Names here are the CLI's ``--method`` values.

Every method is a :class:`~desloc.algorithms.spec.MethodSpec` declared next to its algorithm
(``ddp.py``, ``desloc.py``, ``diloco.py``, ``gasloc.py``) and registered here, in the order
``desloc methods`` lists them; :func:`register` adds one of your own. :class:`MethodConfig`
resolves a user's settings against the spec, and ``build_method(cfg, inner, comm, roles)`` turns
a validated config and an inner optimizer into the wrapping
:class:`~desloc.algorithms.base.SyncedOptimizer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from desloc.algorithms import ddp, desloc, diloco, gasloc
from desloc.algorithms.base import SyncedOptimizer
from desloc.algorithms.ddp import DDP
from desloc.algorithms.desloc import DesLoc
from desloc.algorithms.diloco import DiLoCo
from desloc.algorithms.gasloc import GasLoc
from desloc.algorithms.spec import (AUTO, REGISTRY, MethodConfig, MethodSpec, outer_factory, register, state_periods,
                                    tunable_methods, unregister)
from desloc.comm.base import Communicator
from desloc.errors import ConfigError
from desloc.optim.roles import StateRole

METHODS: dict[str, MethodSpec] = REGISTRY  # name -> spec, live: register() adds to it
for _name, _spec in (("ddp", ddp.SPEC), *desloc.SPECS.items(), ("gasloc", gasloc.SPEC), ("diloco", diloco.SPEC)):
    register(_name, _spec)
del _name, _spec


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
    total_steps: int | None = None,
    **kwargs: Any,
) -> SyncedOptimizer:
    """Wrap ``inner`` in the method ``cfg.name``. ``state_roles`` maps state names to their role
    (:class:`~desloc.optim.roles.StateRole`, or its text "u", "u<j>", "v"). ``total_steps``: the
    run's last step T, when known -- a state average nobody would read (launched at t with
    t + delay >= T) is then not sent (:mod:`desloc.algorithms.schedule`)."""
    spec = METHODS[cfg.name]
    if total_steps is not None and "fragments" in spec.fields:
        kwargs.setdefault("total_steps", total_steps)
    roles = {name: StateRole.parse(role) for name, role in state_roles.items()}
    if spec.inner == "mtdao":
        from desloc.optim import MTDAO

        if not isinstance(inner, MTDAO):
            raise ConfigError(f"method {cfg.name} needs the MT-DAO inner optimizer (--inner mtdao or "
                              f"mtdao-adam), got {type(inner).__name__}")
    kwargs.setdefault("clip_rho", cfg.clip_rho)
    opt = spec.build(cfg, inner, comm, roles, kwargs)
    opt.algorithm = cfg.name
    return opt


__all__ = ["AUTO", "parse_method_spec", "DDP", "DesLoc", "DiLoCo", "GasLoc", "METHODS", "MethodConfig", "MethodSpec",
           "SyncedOptimizer", "build_method", "outer_factory", "register", "state_periods", "tunable_methods",
           "unregister"]
