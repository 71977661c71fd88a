"""Orchestration shared by every algorithm: wrap a ``torch.optim`` optimizer, keep the global
step, clip, delegate the local step, and save/restore everything in ``state_dict``.

A subclass implements two hooks around the inner step: ``_before_local_step`` (e.g. DDP's
gradient all-reduce) and ``_after_local_step`` (e.g. DES-LOC's periodic averaging).

The wrapper is itself a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and
``defaults`` *are* the inner optimizer's (properties reading and writing ``self.inner``'s, never
copies), so LR schedulers built on the wrapper drive the inner optimizer, before and after
``load_state_dict`` (which replaces the inner's group dicts), and ``add_param_group`` on the
wrapper adds the group to the inner optimizer. Methods that keep per-parameter state of their own
extend it in ``_on_param_group_added`` (DES-LOC's outer-optimizer anchor, GASLoC's anchor): a
group added on every worker, in the same order, is stepped by the inner optimizer and synced like
the others. Step hooks (``register_step_pre_hook`` / ``register_step_post_hook``) registered on
the wrapper run around the wrapper's ``step``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from desloc.algorithms.schedule import SyncSchedule
from desloc.comm.base import Communicator
from desloc.errors import CheckpointMismatchError, ConfigError
from desloc.optim import is_elementwise


class SyncedOptimizer(torch.optim.Optimizer):
    """An inner optimizer plus a method's syncs (the base of DDP, DES-LOC and GASLoC alike).

    ``algorithm`` names the method in checkpoints and errors; ``schedule`` says what is sent
    when (:mod:`desloc.algorithms.schedule`).
    """

    algorithm = "base"

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        comm: Communicator,
        clip_rho: float | None = None,
        assume_elementwise: bool = False,
    ):
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"inner must be a torch.optim.Optimizer, got {type(inner).__name__}")
        if not isinstance(comm, Communicator):
            raise TypeError(f"comm must be a desloc.comm.Communicator, got {type(comm).__name__}")
        if clip_rho is not None and not (float(clip_rho) > 0):
            raise ConfigError(
                f"clip_rho must be > 0 (coordinate-wise clip bound) or None for no clipping, got {clip_rho!r}"
            )
        if comm.stacked and not (assume_elementwise or is_elementwise(inner)):
            raise ConfigError(
                f"the simulator runs one {type(inner).__name__} over parameters stacked across "
                "workers, which is only exact for elementwise optimizers (SGD, Adam, AdamW, ADOPT, "
                "MT-DAO, ...); use the torch.distributed backend, or pass assume_elementwise=True "
                "if the optimizer treats every coordinate independently"
            )
        self.inner = inner
        self.comm = comm
        self.clip_rho = None if clip_rho is None else float(clip_rho)
        self.global_step = 0
        self.schedule = SyncSchedule()
        # Optimizer.__init__ sets up the hook machinery; it also assigns ``state`` and
        # ``param_groups`` and adds the groups, which must not touch the inner optimizer: while
        # constructing, the setters and add_param_group below ignore it.
        self._constructing = True
        try:
            super().__init__(inner.param_groups, inner.defaults)
        finally:
            self._constructing = False

    # ------------------------------------------------- the inner's groups and state
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if not self.__dict__.get("_constructing", False):
            self.inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        if not self.__dict__.get("_constructing", False):
            self.inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if not self.__dict__.get("_constructing", False):
            self.inner.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add ``param_group`` to the inner optimizer (with its defaults), then let the method
        extend its own per-parameter state. Do it on every worker alike, as at construction."""
        if self.__dict__.get("_constructing", False):
            return  # Optimizer.__init__ re-adding the inner's own groups
        n_before = len(self.inner.param_groups)
        self.inner.add_param_group(param_group)
        new = [p for group in self.inner.param_groups[n_before:] for p in group["params"]]
        self._on_param_group_added(new)

    def _on_param_group_added(self, params: list[torch.Tensor]) -> None:
        """Hook: ``params`` were just added to the inner optimizer (after the existing ones)."""

    # ----------------------------------------------------------------- contract
    @property
    def params(self) -> list[torch.Tensor]:
        return [p for group in self.inner.param_groups for p in group["params"]]

    def state_tensors(self, name: str) -> list[torch.Tensor]:
        """The named state of every parameter that has it, in parameter order."""
        return [self.inner.state[p][name] for p in self.params if name in self.inner.state[p]]

    def discover_states(self) -> list[str]:
        """Names of the tensor states the inner optimizer keeps per coordinate, as far as shapes
        tell: a tensor with at least one dimension and its parameter's shape. Only used to
        *report* states nobody declared; what is synced comes from the declared names (a 0-dim
        parameter's states are indistinguishable from scalar counters such as Adam's ``step``)."""
        names: list[str] = []
        for p in self.params:
            for name, value in self.inner.state[p].items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape == p.shape and name not in names:
                    names.append(name)
        return names

    def _check_declared_states(self, declared: list[str], where: str) -> None:
        """After the first local step: every declared state exists, and no per-coordinate state
        is left undeclared. ``where`` names the argument that declares them, for the error."""
        present = {name for p in self.params for name, v in self.inner.state[p].items() if torch.is_tensor(v)}
        found = self.discover_states()
        unknown = [n for n in declared if n not in present]
        if unknown:
            raise ConfigError(
                f"{where} names {unknown} but {type(self.inner).__name__} has states {found or sorted(present)}; "
                "use those names (None = never sync)"
            )
        missing = [n for n in found if n not in declared]
        if missing:
            fix = ("have no sync period; add them to state_periods (None keeps them local)"
                   if where == "state_periods" else f"are not declared; add them to {where}")
            raise ConfigError(f"{type(self.inner).__name__} state(s) {missing} {fix}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._before_local_step()
        if self._skips_inner_step():
            self._advance_counters()
        else:
            self.inner.step()
        self.global_step += 1
        self._after_local_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "desloc": {
                "algorithm": self.algorithm,
                "world_size": self.comm.world_size,
                "stacked": self.comm.stacked,
                "global_step": self.global_step,
                "ledger": self.comm.ledger.state_dict(),
                "config": self.config_dict(),
                "extra": self._extra_state(),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = state_dict.get("desloc")
        if meta is None:
            raise CheckpointMismatchError(
                "state_dict has no 'desloc' entry: it was not written by a desloc optimizer; "
                "load a plain optimizer checkpoint into the inner optimizer instead"
            )
        if meta["world_size"] != self.comm.world_size:
            raise CheckpointMismatchError(
                f"checkpoint was written with world_size={meta['world_size']} workers but this run "
                f"has world_size={self.comm.world_size}; resume with {meta['world_size']} workers "
                "(--workers / --nproc_per_node)"
            )
        if meta["algorithm"] != self.algorithm:
            raise CheckpointMismatchError(
                f"checkpoint was written by method {meta['algorithm']!r} but this optimizer is "
                f"{self.algorithm!r}; resume with --method {meta['algorithm']}"
            )
        if meta.get("stacked", self.comm.stacked) != self.comm.stacked:
            engines = {True: "the simulator", False: "torch.distributed (one worker per process)"}
            raise CheckpointMismatchError(
                f"checkpoint was written by {engines[meta['stacked']]} but this run uses "
                f"{engines[self.comm.stacked]}; resume on the same engine (--backend)"
            )
        saved, ours = meta.get("config", {}), self.config_dict()
        changed = {k: (saved.get(k), ours.get(k)) for k in set(saved) | set(ours) if saved.get(k) != ours.get(k)}
        if changed:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(changed.items()))
            raise CheckpointMismatchError(
                f"checkpoint's {self.algorithm} settings differ from this run's ({detail}); "
                "resume with the checkpoint's settings"
            )
        self.inner.load_state_dict(state_dict["inner"])
        self.global_step = int(meta["global_step"])
        self.comm.ledger.load_state_dict(meta["ledger"])
        self._load_extra_state(meta.get("extra", {}))

    # ------------------------------------------------------------------- hooks
    def _before_local_step(self) -> None:
        self._clip()

    def _after_local_step(self) -> None:
        pass

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def config_dict(self) -> dict[str, Any]:
        return {"clip_rho": self.clip_rho}

    # ----------------------------------------------------------------- helpers
    def _clip(self) -> None:
        if self.clip_rho is None:
            return
        for p in self.params:
            if p.grad is not None:
                p.grad.clamp_(-self.clip_rho, self.clip_rho)

    def sitting_out(self) -> list[int]:
        """All workers (not only this process's) that sit out the coming step: they compute no
        forward, backward or inner step (GASLoC's H_i < H). None by default."""
        return []

    def idle_workers(self) -> list[int]:
        """This process's workers among :meth:`sitting_out`."""
        out = set(self.sitting_out())
        return [w for w in self.comm.local_workers if w in out]

    def _skips_inner_step(self) -> bool:
        """True when every worker of this process sits out: the inner step is skipped."""
        local = self.comm.local_workers
        return bool(local) and len(self.idle_workers()) == len(local)

    def _advance_counters(self) -> None:
        """What a skipped inner step still does: advance scalar counters (Adam's ``step``), so an
        idle worker's bias correction matches a worker whose step was run and undone."""
        declared = set(self._declared_state_names())
        for p in self.params:
            for name, value in self.inner.state[p].items():
                if torch.is_tensor(value) and value.dim() == 0 and name not in declared:
                    value += 1

    def _declared_state_names(self) -> list[str]:
        """The per-coordinate states the method knows by name (overridden by the methods)."""
        return []

    def expected_bytes(self, steps: int) -> int:
        """Bytes one worker sends in ``steps`` steps of all-reduces, from ``schedule`` alone."""
        def payload(tag: str) -> int:
            tensors = self.params if tag in ("params", "grads") else self.state_tensors(tag)
            return sum(self.comm.payload_bytes(t) for t in tensors)

        return sum(self.schedule.count(tag, steps) * payload(tag) for tag in self.schedule.tags)

    def ddp_equivalent_bytes(self, steps: int | None = None) -> int:
        """Bytes one worker would have sent had DDP all-reduced every gradient for ``steps``."""
        steps = self.global_step if steps is None else steps
        per_step = sum(self.comm.payload_bytes(p) for p in self.params)
        return steps * per_step

    def comm_summary(self) -> dict[str, Any]:
        ledger = self.comm.ledger
        ddp = self.ddp_equivalent_bytes()
        summary = {
            "bytes_sent": ledger.total_bytes,
            "bytes_by_state": ledger.method_bytes_by_tag,
            "collectives": ledger.collectives,
            "ddp_equivalent_bytes": ddp,
            "ratio_vs_ddp": (ddp / ledger.total_bytes) if ledger.total_bytes else float("inf"),
        }
        if ledger.bytes_by_link:  # gossip: point-to-point traffic (every link of the run)
            summary["bytes_by_link"] = dict(ledger.bytes_by_link)
            summary["bytes_by_worker"] = ledger.bytes_by_worker()
        return summary
