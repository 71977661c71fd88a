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
the others. Step hooks (``register_step_pre_hook`` / ``register_step_post_hook``, and torch's
global ones) registered on the wrapper run around the wrapper's ``step``, and they see what a
blocking run shows: when any step hook is registered, overlapped syncs are finished before the
pre-hooks and after the step (so a hook that reads optimizer states reads the averages; the
overlap is given up for such runs only).

Zero-copy syncs (``zero_copy=True``, the default): the tensors of every tag the method
all-reduces (:meth:`_flat_tags`: parameters, synced states, DDP's gradients) are re-homed into
flat buffers (:mod:`desloc.algorithms.flat`) -- parameters at construction, states once they
exist (after the first step, and again after ``load_state_dict``, which allocates fresh
tensors) -- and a sync all-reduces the buffers in place. ``zero_copy=False`` keeps the tensors
where they are and hands lists to ``all_reduce_mean`` (copied into buckets and back): the
reference the zero-copy path is tested against, bit for bit, and the path taken with a
communicator that implements only ``all_reduce_mean``.

Overlapped state syncs (``overlap=True``, the default): a sync whose result is first read by the
next inner step (an optimizer state averaged after step t) is left in flight and waited for at
the start of step t+1's ``step()``, i.e. after step t+1's forward and backward, just before its
inner update. Nothing reads the state in between, so the numbers are those of a blocking sync.
Anything that reads states between steps calls :meth:`wait_for_syncs` first (``state_dict``
does).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch

from desloc.algorithms.flat import FlatGroup
from desloc.algorithms.schedule import SyncSchedule
from desloc.comm.base import Communicator, PendingReduce
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
        zero_copy: bool = True,
        overlap: bool = True,
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
        # A communicator without flat all-reduces (e.g. a user's own, implementing all_reduce_mean
        # only) gets the copying path: tensor lists through all_reduce_mean, blocking.
        self.zero_copy = bool(zero_copy) and comm.has_flat_all_reduce
        self.overlap = bool(overlap) and self.zero_copy
        self._flat: dict[str, FlatGroup] = {}
        self._in_flight: list[PendingReduce] = []  # state syncs to finish before the next inner step
        self._warned_replaced: set[str] = set()
        self._reloading = False  # load_state_dict re-homes fresh state tensors: expected, no warning
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

    def _patch_step_function(self) -> None:
        """torch wraps the class's ``step`` so that the step hooks run around it; desloc wraps that
        once more so that, when hooks exist, overlapped syncs finish before the pre-hooks run."""
        super()._patch_step_function()
        cls = type(self)
        if getattr(cls.step, "_finishes_syncs_before_hooks", False):
            return
        hooked = cls.step

        @functools.wraps(hooked)  # keeps torch's ``hooked`` mark: torch does not wrap it again
        def step(opt: "SyncedOptimizer", *args: Any, **kwargs: Any) -> Any:
            if opt._has_step_hooks("pre"):
                opt._finish_in_flight()
            return hooked(opt, *args, **kwargs)

        step._finishes_syncs_before_hooks = True  # type: ignore[attr-defined]
        cls.step = step  # type: ignore[method-assign]

    def _has_step_hooks(self, when: str) -> bool:
        """Whether step hooks (``when`` = "pre" or "post", on this optimizer or torch's global ones) exist."""
        from torch.optim import optimizer as torch_optimizer

        mine = self.__dict__.get(f"_optimizer_step_{when}_hooks") or {}
        glob = getattr(torch_optimizer, f"_global_optimizer_{when}_hooks", None) or {}
        return bool(mine) or bool(glob)

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
        self._finish_in_flight()  # overlapped state syncs of the previous step: needed from here on
        self._before_local_step()
        if self._skips_inner_step():
            self._advance_counters()
        else:
            self.inner.step()
        self.global_step += 1
        if self.zero_copy and self.global_step == 1:
            self._ensure_flat()  # the states exist now: re-home them once (later: only if replaced)
        self._after_local_step()
        if self._has_step_hooks("post"):
            self._finish_in_flight()  # post-hooks read what a blocking sync leaves
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``set_to_none=False`` zeroes gradients that live in a flat sync buffer (DDP's) with one
        fill, and they stay views of it (DDP's ``gradient_as_bucket_view``); with True they are
        dropped, as torch's contract says, and the next sync copies the new ones in."""
        group = self._flat.get("grads")
        if not set_to_none and group is not None and group.bound([p.grad for p in self.params]):
            for buf in group.buffers:
                buf.zero_()
            return
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        self.wait_for_syncs()
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
        self._in_flight = []
        if self.zero_copy:
            self._reloading = True  # load_state_dict allocated fresh state tensors: back into the buffers
            try:
                self._ensure_flat()
            finally:
                self._reloading = False
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

    # ------------------------------------------------------- flat buffers, syncs
    def _flat_tags(self) -> list[str]:
        """Tags whose tensors live in flat buffers (those the method all-reduces)."""
        return []

    def _tag_tensors(self, tag: str) -> list[torch.Tensor]:
        if tag == "params":
            return self.params
        if tag == "grads":
            return [p.grad for p in self.params]
        return self.state_tensors(tag)

    def _bind(self, tag: str, group: FlatGroup) -> None:
        """Make the tensors of ``tag`` the views of ``group`` (values already in the buffers)."""
        if tag == "params":
            for p, v in zip(self.params, group.views):
                if p.data_ptr() != v.data_ptr() or p.stride() != v.stride():
                    p.data = v
        elif tag == "grads":
            for p, v in zip(self.params, group.views):
                if p.grad is not v:
                    p.grad = v
        else:
            owners = [p for p in self.params if tag in self.inner.state[p]]
            for p, v in zip(owners, group.views):
                self.inner.state[p][tag] = v

    def flat_buffers(self, tag: str) -> list[torch.Tensor]:
        """The flat buffers holding every tensor of ``tag`` (re-homing them first if needed):
        averaging these in place averages the tensors."""
        tensors = self._tag_tensors(tag)
        group = self._flat.get(tag)
        if group is None or not group.matches(tensors):
            group = FlatGroup(tensors, self.comm.world_size if self.comm.stacked else None)
            self._flat[tag] = group
            self._bind(tag, group)
            return group.buffers
        unbound = group.unbound(tensors)
        if unbound:
            if tag not in ("params", "grads") and tag not in self._warned_replaced and not self._reloading:
                self._warned_replaced.add(tag)
                warnings.warn(f"{type(self.inner).__name__} replaced its {tag!r} tensors instead of updating "
                              "them in place; desloc copies them back into the flat sync buffer before each "
                              "sync (results are unchanged, the sync is no longer zero-copy)", stacklevel=3)
            group.refill(tensors, unbound)
            self._bind(tag, group)
        return group.buffers

    def _ensure_flat(self) -> None:
        """Re-home every flat tag's tensors that exist (parameters; states once created)."""
        for tag in self._flat_tags():
            tensors = self._tag_tensors(tag)
            if tensors and all(t is not None for t in tensors):
                self.flat_buffers(tag)

    def _finish_in_flight(self) -> None:
        for pending in self._in_flight:
            pending.wait()
        self._in_flight = []

    def wait_for_syncs(self) -> None:
        """Finish every sync still in flight (overlapped state syncs; DES-LOC's delayed
        parameter sync is received but applied only at its step). Call before reading optimizer
        states between steps; ``state_dict`` does."""
        self._finish_in_flight()

    def finish_syncs(self) -> None:
        """Wait for every sync in flight and apply what is pending (end of training)."""
        self.wait_for_syncs()

    def _sync(self, tags: list[str], hidden: list[int] | None = None,
              extra: list[tuple[str, list[torch.Tensor], int]] = ()) -> dict[str, list[PendingReduce]]:
        """All-reduce every tensor of ``tags`` in one communicator call; returns the handles by tag.

        Zero-copy: the tags' flat buffers in place, ``hidden[i] > 0`` leaving tag i in flight
        (wait on its handles before reading it); ``extra`` adds (tag, flat buffers, hidden) of
        buffers that are not a tag's home (DES-LOC's parameter snapshot). Otherwise (the copying
        reference) the tensor lists go to ``all_reduce_mean``, blocking."""
        if not tags and not extra:
            return {}
        if not self.zero_copy:
            tensors: list[torch.Tensor] = []
            tensor_tags: list[str] = []
            for tag in tags:
                group = self._tag_tensors(tag)
                tensors += group
                tensor_tags += [tag] * len(group)
            if tensors:
                self.comm.all_reduce_mean(tensors, tensor_tags)
            return {}
        hidden = list(hidden) if hidden is not None else [0] * len(tags)
        items = [(tag, self.flat_buffers(tag), k) for tag, k in zip(tags, hidden)] + list(extra)
        buffers = [b for _, bufs, _ in items for b in bufs]
        handles = self.comm.all_reduce_mean_flat(buffers, [tag for tag, bufs, _ in items for _ in bufs],
                                                 [k for _, bufs, k in items for _ in bufs])
        out: dict[str, list[PendingReduce]] = {}
        i = 0
        for tag, bufs, _ in items:
            out.setdefault(tag, []).extend(handles[i : i + len(bufs)])
            i += len(bufs)
        return out

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
        """Bytes one worker sends in ``steps`` steps of all-reduces, from ``schedule`` alone (with
        fragments: each fragment's elements; compressed tags: the codec's encoded bytes)."""
        from desloc.algorithms.fastsync import fragment_bounds

        compression = getattr(self, "compression", {}) or {}

        def kinds(tag: str) -> list[tuple[int, int]]:
            """(elements per worker, element size) of each flat buffer of ``tag``, in buffer order."""
            tensors = self.params if tag in ("params", "grads") else self.state_tensors(tag)
            out: dict[tuple, list[int]] = {}
            for t in tensors:
                out.setdefault((t.dtype, t.device), [0, t.element_size()])[0] += self.comm.worker_numel(t)
            return [tuple(v) for v in out.values()]

        def payload(tag: str, f: int) -> int:
            total = 0
            for n, size in kinds(tag):
                a, b = fragment_bounds(n, self.schedule.fragments, f)
                if tag in compression:
                    from desloc.algorithms.fastsync import encoded_bytes
                    from desloc.comm.codecs import get_codec

                    total += encoded_bytes(get_codec(compression[tag]), b - a, self.comm.world_size)
                else:
                    total += (b - a) * size
            return total

        return sum(self.schedule.fragment_count(tag, f, steps) * payload(tag, f)
                   for tag in self.schedule.tags for f in range(self.schedule.fragments))

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
