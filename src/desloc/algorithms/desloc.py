r"""DES-LOC: parameters and each optimizer state averaged on independent periods.

Update (DES-LOC, Iacob et al. 2025; averaging after the local step, Local-SGD convention)::

    for t = 0 .. T-1:
        every worker m:   g = clip(grad F(x^m; xi^m), rho)
                          (x^m, s^m) = OPT.step(x^m, s^m, g, lr_t)          # local
        if (t+1) % K_x == 0:  x^m   <- E_m[x]      for all m                 # tag "params"
        for each state j:
            if (t+1) % K_j == 0:  s^{j,m} <- E_m[s^j]   for all m            # tag = state name

States s^j are the names in ``state_periods`` (Adam: ``exp_avg`` = u, ``exp_avg_sq`` = v; SGD:
``momentum_buffer``; ``build_method`` takes them from the inner optimizer's declared state roles),
looked up by name in the inner optimizer's per-parameter state -- never guessed from shapes,
which cannot tell a 0-dim parameter's moments from a scalar counter. After the first step a
declared name the inner optimizer lacks is a ``ConfigError``, and so is a per-coordinate state
(a tensor with the parameter's shape, >= 1 dimension) nobody declared. Scalar counters (Adam's
``step``) are never communicated; every worker's counter is identical because all workers step
together. Sync decisions use the global step, so workers cannot disagree about what to send.

Symbols -> arguments: K_x -> ``period_x``; K_u, K_v (K_j) -> ``state_periods[name]``
(None = never); rho -> ``clip_rho``. Paper defaults K_u = 3 K_x, K_v = 6 K_x.

Communication, per step, in model-sized tensors: 1/K_x + sum_j 1/K_j. At (256, 768, 1536) this
is 1.5/256, i.e. 170.67x less than DDP and 2x less than Local Adam at K = 256.

Settings of the same class (the registry's names):
    local-adam    K_x = K_u = K_v = K                   (Cheng & Glasgow 2025)
    keep-states   K_u = K_v = None                       (FAVG+OPT: states stay local)
    reset-states  K_u = K_v = None, ``reset_states_on_param_sync``: at every parameter sync
                  the state tensors are zeroed (scalar counters such as Adam's ``step`` are
                  kept, so bias correction does not restart -- our reading of "reset to zero").
    diloco        K_u = K_v = None and an outer optimizer, K_x = H (diloco.py).
Reductions (tests/test_reductions.py): M = 1 or identical data -> plain OPT; sgdm with
K_x = K_u = 1 -> DDP-SGDM exactly; Adam with all K = 1 is *not* DDP-Adam (E[g^2] != E[g]^2).

Outer optimizer ("DES-LOC + Nesterov"): with ``outer`` given, a parameter sync does not
overwrite x with E_m[x^m] but takes DiLoCo's outer step on the pseudo-gradient
xbar - E_m[x^m] (:mod:`desloc.algorithms.outer`; DiLoCo itself is :mod:`desloc.algorithms.diloco`).
Communication is unchanged: one model-sized all-reduce per parameter sync.

Overlapped state syncs (``overlap=True``, default): a state averaged after step t is first read
by step t+1's inner update, so its all-reduce is left in flight and waited for just before that
update (after step t+1's forward and backward): bitwise the blocking result
(:class:`~desloc.algorithms.base.SyncedOptimizer`). Parameters are read by the very next forward,
so their sync blocks -- unless delayed.

Delayed parameter sync (``param_delay = d``, 0 <= d < K_x; off by default because it changes the
algorithm; overlapped Local SGD, Streaming DiLoCo's delayed outer step, Douillard et al. 2025)::

    if t % K_x == 0:       x_snap = x^m;  launch E_m[x_snap]           (in flight for d steps)
    if t == t_0 + d:       x^m <- x^m + (E_m[x_snap] - x_snap)        (local progress since t_0 kept)
      with an outer optimizer:
                           xbar <- OUTER.step(xbar, xbar - E_m[x_snap])
                           x^m  <- x^m + (xbar - x_snap)

d = 0 is the blocking sync exactly (the code path is the blocking one, bit for bit); the rule with
d >= 1 is tested against a float64 reference (tests/test_flat.py). A checkpoint taken while
the snapshot is in flight waits for its all-reduce and stores E_m[x_snap] and x_snap with the
step to apply them, so a resumed run applies the same update at the same step.

The schedule is :class:`~desloc.algorithms.schedule.SyncSchedule` ``{"params": K_x, <state>: K_j}``.
``add_param_group`` (on every worker alike): the inner optimizer steps the new parameters and
they are averaged with the others; with an outer optimizer their anchor starts at their current
value (xbar_0 = x_0) and joins the outer optimizer as a new group of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from desloc.algorithms import fastsync
from desloc.algorithms.base import SyncedOptimizer
from desloc.algorithms.outer import OuterFactory, OuterStep
from desloc.algorithms.schedule import SyncSchedule
from desloc.algorithms.spec import MethodSpec, fast_sync_kwargs, outer_factory, state_periods
from desloc.comm.base import Communicator, PendingReduce
from desloc.errors import ConfigError, check_period


class _Finishes:
    """Waits for ``handles``, then runs ``finish`` once (a compressed sync's decode and write-back)."""

    handles: list[Any]
    finish: Callable[[], None] | None

    def wait(self) -> None:
        for h in self.handles:
            h.wait()
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish()


@dataclass
class DelayedSync(_Finishes):
    """One average in flight: fragment ``fragment`` of ``tag``, launched from the snapshot
    ``original`` (x_snap / s_snap); its average arrives in ``mean`` once ``handles`` are done (and
    ``finish``, for a compressed sync, has decoded it there); applied after step ``apply_step``.
    ``n_params``: parameters that existed at the snapshot (a group added while it is in flight has
    no average in flight; it is averaged from the next sync on)."""

    apply_step: int
    handles: list[Any]
    mean: list[torch.Tensor]
    original: list[torch.Tensor]
    n_params: int
    tag: str = "params"
    fragment: int = 0
    finish: Callable[[], None] | None = None


DelayedParams = DelayedSync  # its name when only parameter averages could be delayed


@dataclass
class _Job(_Finishes):
    """One (tag, fragment) of a step's syncs while it is being launched."""

    tag: str
    fragment: int
    delay: int
    hidden: int
    slices: list[torch.Tensor]
    snap: list[torch.Tensor] | None
    target: list[torch.Tensor]
    handles: list[Any] = field(default_factory=list)
    finish: Callable[[], None] | None = None
    reducers: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)  # two halves: per payload

    @property
    def done(self) -> bool:
        return self.finish is None and all(h.done for h in self.handles)


class DesLoc(SyncedOptimizer):
    algorithm = "desloc"

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        comm: Communicator,
        period_x: int,
        state_periods: Mapping[str, int | None],
        reset_states_on_param_sync: bool = False,
        clip_rho: float | None = None,
        assume_elementwise: bool = False,
        outer: OuterFactory | None = None,
        param_delay: int = 0,
        overlap: bool = True,
        zero_copy: bool = True,
        fragments: int = 1,
        state_delay: int = 0,
        fragment_alpha: float = 0.0,
        compression: Mapping[str, str] | str | None = None,
        total_steps: int | None = None,
    ):
        check_period("period_x", period_x)
        if isinstance(param_delay, bool) or not isinstance(param_delay, int) or not 0 <= param_delay < period_x:
            raise ConfigError(f"param_delay (--param-delay) must be an integer in [0, K_x={period_x}), got "
                              f"{param_delay!r}; 0 = blocking parameter sync, e.g. {min(4, period_x - 1)}")
        for name, period in state_periods.items():
            check_period(f"state_periods[{name!r}]", period, allow_none=True)
        super().__init__(inner, comm, clip_rho=clip_rho, assume_elementwise=assume_elementwise,
                         zero_copy=zero_copy, overlap=overlap)
        if param_delay and not self.zero_copy:
            raise ConfigError("param_delay needs the zero-copy sync path (zero_copy=True and a communicator with "
                              "flat all-reduces, as SimulatedComm and TorchDistComm)")
        self.state_periods = dict(state_periods)
        self.reset_states_on_param_sync = bool(reset_states_on_param_sync)
        self.compression = self._check_fast_options(fragments, state_delay, fragment_alpha, compression, total_steps)
        self.param_delay = param_delay
        self.state_delay = int(state_delay)
        self.fragments = int(fragments)
        self.fragment_alpha = float(fragment_alpha)
        self.total_steps = total_steps
        self.delayed_syncs: list[DelayedSync] = []
        self.period_x = period_x
        delays = {"params": param_delay, **{name: self.state_delay for name in self.state_periods}}
        self.schedule = SyncSchedule({"params": period_x, **self.state_periods}, fragments=self.fragments,
                                     delays=delays, total_steps=total_steps,
                                     final_all=self.fragment_alpha > 0)
        self._states_checked = False
        self._flushed_at: int | None = None
        self._decay: dict[str, list[torch.Tensor]] = {}
        self._compressed: dict[str, fastsync.CompressedTag] = {}
        if self.fragments > 1 or self.compression:  # parameters live in their flat buffers from the start
            self.flat_buffers("params")
        if outer is None:
            self.outer = None
        else:  # with fragments: one outer "parameter" per fragment slice of the flat parameter buffers
            self.outer = OuterStep(self.params if self.fragments == 1 else self._units(), outer)
        if "params" in self.compression:
            self._check_same_start()
            self._compressed["params"] = fastsync.CompressedTag(self._codec("params"), self.flat_buffers("params"),
                                                                "current")

    # --------------------------------------------------------------- the options
    @property
    def delayed(self) -> DelayedSync | None:
        """The first average in flight (the one parameter average of a run without fragments)."""
        return self.delayed_syncs[0] if self.delayed_syncs else None

    def _check_fast_options(self, fragments, state_delay, alpha, compression, total_steps) -> dict[str, str]:
        """Fragments, state delay, mixing and compression, each checked with the fix; returns
        {tag: codec} for the compressed tags."""
        if isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 1:
            raise ConfigError(f"fragments (--fragments) must be an integer >= 1, got {fragments!r}; "
                              "1 = whole-buffer syncs, e.g. 4")
        synced = [k for k in self.state_periods.values() if k is not None]
        top = min(synced) if synced else None
        if isinstance(state_delay, bool) or not isinstance(state_delay, int) or state_delay < 0 or \
                (state_delay and (top is None or state_delay >= top)):
            fix = "no state is ever synced here, use 0" if top is None else f"e.g. {max(1, top // 4)}"
            raise ConfigError(f"state_delay (--state-delay) must be an integer in [0, smallest state period"
                              f"{'' if top is None else f' = {top}'}), got {state_delay!r}; {fix}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
            raise ConfigError(f"fragment_alpha (--fragment-alpha) must be in [0, 1), got {alpha!r}; 0 = take the "
                              "average (plus own progress since the snapshot), 0.5 = halfway between local and average")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ConfigError(f"total_steps must be an integer >= 1 or None (unknown), got {total_steps!r}")
        tags = ["params", *[n for n, k in self.state_periods.items() if k is not None]]
        spec: dict[str, str] = {}
        if compression:
            from desloc.comm.codecs import format_compression, parse_compression

            spec = parse_compression(format_compression(dict(compression)) if isinstance(compression, Mapping)
                                     else compression)
        unknown = [t for t in spec if t != "*" and t not in tags]
        if unknown:
            raise ConfigError(f"compression names {unknown}, which this run never syncs; the synced tags are {tags}")
        resolved = {tag: spec.get(tag, spec.get("*", "none")) for tag in tags}
        resolved = {tag: codec for tag, codec in resolved.items() if codec != "none"}
        if (fragments > 1 or state_delay or resolved) and not self.zero_copy:
            raise ConfigError("fragments, state_delay and compression need the zero-copy sync path (zero_copy=True "
                              "and a communicator with flat all-reduces, as SimulatedComm and TorchDistComm)")
        if resolved and not self.comm.has_all_gather:
            raise ConfigError(f"compression sends encoded payloads with an all-gather, which {type(self.comm).__name__} "
                              "does not provide (a sharded replica group, torchft); drop --compress")
        if self.reset_states_on_param_sync and (fragments > 1 or resolved):
            raise ConfigError("reset-states zeroes the states at each whole parameter average; it takes no "
                              "--fragments > 1 or --compress. Use keep-states, or drop those flags")
        return resolved

    def _codec(self, tag: str):
        from desloc.comm.codecs import get_codec

        return get_codec(self.compression[tag])

    def _units(self) -> list[torch.Tensor]:
        """With fragments, the outer optimizer's parameters: fragment f of every flat parameter
        buffer, fragment-major (fragment f is units [f B, (f + 1) B) for B buffers)."""
        return [s for f in range(self.fragments) for s in self._slices("params", f)]

    def _unit_indices(self, f: int) -> list[int]:
        b = len(self.flat_buffers("params"))
        return list(range(f * b, (f + 1) * b))

    def _slices(self, tag: str, f: int) -> list[torch.Tensor]:
        return fastsync.fragment_slices(self.flat_buffers(tag), self.fragments, f, self.comm.stacked)

    def _on_param_group_added(self, params: list[torch.Tensor]) -> None:
        if self.fragments > 1 or self.compression or self.state_delay:
            raise ConfigError("add_param_group with fragments > 1, compression or a state delay: fragments, shared "
                              "values and state snapshots are laid out at construction; give every group to the "
                              "optimizer first")
        self._decay.clear()
        if self.outer is not None:
            self.outer.add(params)

    # -------------------------------------------------------------------- sync
    def _flat_tags(self) -> list[str]:
        return list(self.schedule.tags)

    def _after_local_step(self) -> None:
        if not self._states_checked:
            self._check_declared_states(list(self.state_periods), "state_periods")
            self._states_checked = True
            self._start_states()
        for delayed in self.delayed_syncs:  # compressed all-reduces in flight: their second half now
            for h in delayed.handles:
                if hasattr(h, "advance"):
                    h.advance()
        due = [d for d in self.delayed_syncs if self.global_step >= d.apply_step]
        if due:  # in launch order; a parameter average with a longer delay does not hold back a state one
            self.delayed_syncs = [d for d in self.delayed_syncs if self.global_step < d.apply_step]
            for delayed in due:
                self._apply_delayed(delayed)
        self._launch(self.schedule.due_fragments(self.global_step))

    def _start_states(self) -> None:
        """Once the states exist: their compressed-sync buffers, and the delay rule's decays."""
        for tag in self.compression:
            if tag != "params" and tag not in self._compressed:
                self._compressed[tag] = fastsync.CompressedTag(self._codec(tag), self.flat_buffers(tag), "zeros")
        if self.state_delay:
            for tag in self.schedule.tags:
                if tag != "params":
                    self._decay_buffers(tag)

    def _decay_buffers(self, tag: str) -> list[torch.Tensor]:
        """beta^D per element of ``tag``'s flat buffers (beta of each parameter's group)."""
        if tag not in self._decay:
            group_of = {id(p): g for g in self.inner.param_groups for p in g["params"]}
            buffers = self.flat_buffers(tag)
            layout = self._flat[tag]
            out = [torch.empty_like(b) for b in buffers]
            owners = [p for p in self.params if tag in self.inner.state[p]]
            for p, view in zip(owners, layout.views_of(out)):
                beta = fastsync.state_decay(group_of[id(p)], tag)
                if beta is None:
                    raise ConfigError(f"--state-delay needs each synced state to be an exponential moving average "
                                      f"with a known decay; {type(self.inner).__name__}'s {tag!r} is not known to be "
                                      "one (known: Adam/AdamW/ADOPT/MT-DAO moments, SGD momentum); use --state-delay 0")
                view.fill_(beta ** self.state_delay)
            self._decay[tag] = out
        return self._decay[tag]

    def _launch(self, items: list[tuple[str, int]], final: bool = False) -> None:
        """Send every (tag, fragment) of ``items``: one all-reduce call for the uncompressed ones
        and one all-gather call for the compressed ones; then delayed syncs queue up, overlapped
        state syncs stay in flight, and blocking parameter fragments are finished (outer step,
        mixing, reset-states). ``final``: the end-of-run parameter average (blocking)."""
        if not items:
            return
        if not self.zero_copy:  # the copying reference: whole tags, blocking (no fast-sync option is set)
            tags = [tag for tag, _ in items]
            self._sync(tags)
            if "params" in tags:
                self._finish_param_sync()
                self._reset_states()
            return
        jobs = [self._job(tag, f, final) for tag, f in items]
        reduce = [(j, t) for j in jobs if j.tag not in self._compressed for t in j.target]
        gather = [(j, self._encode(j)) for j in jobs if j.tag in self._compressed]
        if reduce:
            handles = self.comm.all_reduce_mean_flat([t for _, t in reduce], [j.tag for j, _ in reduce],
                                                     [j.hidden for j, _ in reduce])
            for (j, _), h in zip(reduce, handles):
                j.handles.append(h)
        if gather:
            payloads = [(j, p) for j, ps in gather for p in ps]
            args = ([p for _, p in payloads], [j.tag for j, _ in payloads], [j.hidden for j, _ in payloads])
            if fastsync.two_stage(self.comm.world_size):  # reduce-scatter of encoded chunks, then all-gather
                handles = [fastsync.TwoStageReduce(self.comm, j.tag, first, reduce)
                           for (j, _), first, reduce in zip(payloads, self.comm.all_to_all_flat(*args),
                                                            [r for j, _ in gather for r in j.reducers])]
            else:
                handles = self.comm.all_gather_flat(*args)
            for (j, _), h in zip(payloads, handles):
                j.handles.append(h)
                if j.hidden == 0 and hasattr(h, "advance"):
                    h.advance(in_flight=False)
        params_synced = False
        for j in jobs:
            if j.delay:
                self.delayed_syncs.append(DelayedSync(self.global_step + j.delay, j.handles, j.target, j.snap,
                                                      len(self.params), j.tag, j.fragment, j.finish))
            elif j.tag != "params":
                if j.hidden:  # the handles themselves when there is nothing to finish after them
                    self._in_flight += [j] if j.finish is not None else j.handles
                else:
                    j.wait()
            else:
                j.wait()
                self._finish_params(j.fragment, j.slices, j.snap)
                params_synced = True
        if params_synced:
            self._reset_states()  # waits for this step's state averages first

    def _job(self, tag: str, f: int, final: bool) -> _Job:
        delay = 0 if final else (self.param_delay if tag == "params" else self.state_delay)
        hidden = delay or (1 if tag != "params" and self.overlap else 0)
        slices = self._slices(tag, f)
        keep_local = tag == "params" and self.fragment_alpha > 0 and not final  # the last average: no mixing
        snap = [s.clone() for s in slices] if delay or keep_local else None
        target = [s.clone() for s in snap] if delay else slices
        return _Job(tag, f, delay, hidden, slices, snap, target)

    def _encode(self, job: _Job) -> list[torch.Tensor]:
        """The payloads of a compressed job (from its snapshot when delayed); sets ``job.finish``
        to write the new shared value into ``job.target`` once every payload is in."""
        comp = self._compressed[job.tag]
        stacked = self.comm.stacked
        shared = comp.slices("shared", self.fragments, job.fragment, stacked)
        error = comp.slices("error", self.fragments, job.fragment, stacked)
        source = job.snap if job.delay else job.slices
        nonneg = self._nonnegative(job.tag)
        handles = job.handles  # filled by _launch with one handle per payload
        m = self.comm.world_size
        if not fastsync.two_stage(m):
            payloads = [comp.message(x, s, e) for x, s, e in zip(source, shared, error)]

            def finish() -> None:
                for pending, t, s in zip(handles, job.target, shared):
                    value = comp.combine(pending.wait(), t.shape[-1], s, nonneg)
                    t.copy_(value.expand_as(t))
        else:
            payloads = [comp.chunked_message(x, s, e, m) for x, s, e in zip(source, shared, error)]
            job.reducers = [functools.partial(comp.reduce_chunk, n=x.shape[-1], world_size=m,
                                              key=f"{job.fragment}:{b}") for b, x in enumerate(source)]

            def finish() -> None:
                for pending, t, s in zip(handles, job.target, shared):
                    value = comp.combine_chunks(pending.wait(), t.shape[-1], s, nonneg)
                    t.copy_(value.expand_as(t))
        job.finish = finish
        return payloads

    @staticmethod
    def _nonnegative(tag: str) -> bool:
        """Second moments (v, ``exp_avg_sq`` in every inner optimizer desloc knows) are >= 0."""
        return tag == "exp_avg_sq"

    def _finish_params(self, f: int, slices: list[torch.Tensor], local: list[torch.Tensor] | None) -> None:
        """A blocking parameter average of fragment ``f`` has landed in ``slices``: the outer step
        on it, then x <- alpha x_local + (1 - alpha) X."""
        if self.fragments == 1 and local is None:
            self._finish_param_sync()
            self._share_anchor(f)
            return
        if self.outer is not None:
            if self.fragments == 1:
                self._check_common_start()
                self.outer.step(self.params)
                new = self.outer.anchor
                targets = self.params
            else:
                idx = self._unit_indices(f)
                self.outer.step(slices, idx)
                new = [self.outer.anchor[i] for i in idx]
                targets = slices
            for x, xbar, own in zip(targets, new, local if local is not None else [None] * len(new)):
                if own is None:
                    x.copy_(xbar)
                else:
                    x.copy_(own).mul_(self.fragment_alpha).add_(xbar, alpha=1.0 - self.fragment_alpha)
                xbar.grad = None
            self._share_anchor(f)
        elif local is not None:
            for x, own in zip(slices, local):
                x.mul_(1.0 - self.fragment_alpha).add_(own, alpha=self.fragment_alpha)

    @torch.no_grad()
    def _share_anchor(self, f: int) -> None:
        """With compressed parameters and an outer optimizer: the new anchor xbar (the same on every
        worker) becomes the shared value S of fragment ``f``, so the next message carries the
        round's progress only, not the outer step's displacement."""
        comp = self._compressed.get("params")
        if comp is None or self.outer is None:
            return
        if self.fragments == 1:
            for view, xbar in zip(self._flat["params"].views_of(comp.shared), self.outer.anchor):
                view.copy_(xbar)
        else:
            for shared, i in zip(comp.slices("shared", self.fragments, f, self.comm.stacked), self._unit_indices(f)):
                shared.copy_(self.outer.anchor[i])

    def _reset_states(self) -> None:
        if self.reset_states_on_param_sync:
            self._finish_in_flight()  # a state average still in flight would land on the zeros
            for name in self.state_periods:
                for s in self.state_tensors(name):
                    s.zero_()

    @torch.no_grad()
    def _apply_delayed(self, delayed: DelayedSync) -> None:
        """Parameters: x <- x + (1 - alpha)(X - x_snap), X = E[x_snap] or the outer step's anchor;
        states: s <- s + beta^D (E[s_snap] - s_snap) (module docstring, :mod:`fastsync`)."""
        delayed.wait()
        if delayed.tag != "params":
            decay = fastsync.fragment_slices(self._decay_buffers(delayed.tag), self.fragments, delayed.fragment,
                                             self.comm.stacked)
            for s, mean, original, d in zip(self._slices(delayed.tag, delayed.fragment), delayed.mean,
                                            delayed.original, decay):
                fastsync.apply_delayed_state(s, mean, original, d, self._nonnegative(delayed.tag))
            return
        if self.fragments > 1:
            slices = self._slices("params", delayed.fragment)
            if self.outer is None:
                for x, mean, original in zip(slices, delayed.mean, delayed.original):
                    fastsync.apply_delayed_params(x, mean, original, self.fragment_alpha)
            else:
                idx = self._unit_indices(delayed.fragment)
                self.outer.step(delayed.mean, idx)
                for x, i, original in zip(slices, idx, delayed.original):
                    fastsync.apply_delayed_params(x, self.outer.anchor[i], original, self.fragment_alpha)
                    self.outer.anchor[i].grad = None
                self._share_anchor(delayed.fragment)
            return
        buffers = self.flat_buffers("params")  # re-homed if a group was added since the snapshot
        layout, n = self._flat["params"], delayed.n_params
        if self.outer is None and n == len(self.params):
            for x, mean, original in zip(buffers, delayed.mean, delayed.original):
                fastsync.apply_delayed_params(x, mean, original, self.fragment_alpha)
        elif self.outer is None:  # elementwise, so the same numbers as the flat update
            for x, mean, original in zip(self.params, layout.views_of(delayed.mean, n),
                                         layout.views_of(delayed.original, n)):
                fastsync.apply_delayed_params(x, mean, original, self.fragment_alpha)
        else:  # the outer step sees the snapshot's parameters only (newer anchors get no gradient)
            self._check_common_start()
            self.outer.step(layout.views_of(delayed.mean, n))
            for x, xbar, original in zip(self.params, self.outer.anchor, layout.views_of(delayed.original, n)):
                fastsync.apply_delayed_params(x, xbar, original, self.fragment_alpha)
                xbar.grad = None
            self._share_anchor(0)
        self._reset_states()

    def finish_syncs(self) -> None:
        """End of training: apply every average in flight now (instead of its delay later), and
        with fragments average once more the parameter fragments not averaged at this step, so
        the final model is every worker's average, as a blocking run's. (With ``total_steps``
        unknown, a state average still in flight is applied now with its full beta^D; nothing
        reads the states after the end. With it known, such averages are never sent.)"""
        self.wait_for_syncs()
        while self.delayed_syncs:
            self._apply_delayed(self.delayed_syncs.pop(0))
        done = self.global_step
        if self.schedule.final(done) and self._flushed_at != done and self.total_steps in (None, done):
            self._flushed_at = done
            self._launch(self.schedule.final(done), final=True)

    def wait_for_syncs(self) -> None:
        super().wait_for_syncs()
        for delayed in self.delayed_syncs:
            delayed.wait()

    def _finish_param_sync(self) -> None:
        """After the parameter all-reduce: the outer step on Delta = xbar - E[x], if any."""
        if self.outer is None:
            return
        self._check_common_start()
        self.outer.step(self.params)  # self.params hold E_m[x^m] now
        self.outer.copy_to(self.params)

    def _check_same_start(self) -> None:
        """Compressed parameters start their shared value S at x_0, which must be the same on every
        worker: a CRC32 of each worker's parameter bytes, compared across workers (two float64
        observer all-reduces under torch.distributed, not method traffic)."""
        import zlib

        def crc(t: torch.Tensor) -> float:
            return float(zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()))

        workers = self.comm.local_workers
        sums = [sum(crc(self.comm.worker_view(b, w)) for b in self.flat_buffers("params")) for w in workers]
        if self.comm.stacked:
            differ = len(set(sums)) > 1
        else:
            mine = torch.tensor([sums[0]], dtype=torch.float64)
            mean = mine.clone()
            self.comm.all_reduce_mean([mean], ["metrics"])
            spread = (mine - mean).pow(2)
            self.comm.all_reduce_mean([spread], ["metrics"])
            differ = bool(spread.item() > 0)
        if differ:
            raise ConfigError("compressed parameter syncs start their shared value at x_0, so every worker must start "
                              "from the same parameters; initialise the replicas identically (desloc train and "
                              "StackedReplicas do), or drop params from --compress")

    def _check_common_start(self) -> None:
        # xbar_0 = x_0 needs every worker to start from the same parameters (as DDP does).
        first, *others = self.comm.local_workers
        if others and not all(torch.equal(self.comm.worker_view(a, w), self.comm.worker_view(a, first))
                              for a in self.outer.anchor for w in others):
            raise ConfigError("an outer optimizer needs every worker to start from the same "
                              "parameters; initialise the replicas identically (StackedReplicas does)")

    def _extra_state(self) -> dict[str, Any]:
        out = {} if self.outer is None else self.outer.state_dict()
        saved = [{"tag": d.tag, "fragment": d.fragment, "apply_step": d.apply_step, "n_params": d.n_params,
                  "mean": [t.detach().clone() for t in d.mean],
                  "original": [t.detach().clone() for t in d.original]} for d in self.delayed_syncs]
        if len(saved) == 1 and saved[0]["tag"] == "params" and self.fragments == 1:
            out["delayed_params"] = saved[0]  # received (state_dict waited for it), not yet applied
        elif saved:
            out["delayed_syncs"] = saved
        if self._compressed:
            out["compressed"] = {tag: comp.state_dict() for tag, comp in self._compressed.items()}
        return out

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if self.outer is not None:
            self.outer.load_state_dict(state)
        self.delayed_syncs = []
        saved = state.get("delayed_syncs") or ([state["delayed_params"]] if state.get("delayed_params") else [])
        for item in saved:
            tag, f = item.get("tag", "params"), int(item.get("fragment", 0))
            homes = self._slices(tag, f)  # on the buffers' devices (a checkpoint is read onto the CPU)
            mean = [t.to(home.device, copy=True) for t, home in zip(item["mean"], homes)]
            original = [t.to(home.device, copy=True) for t, home in zip(item["original"], homes)]
            self.delayed_syncs.append(DelayedSync(int(item["apply_step"]), [PendingReduce(t) for t in mean], mean,
                                                  original, int(item.get("n_params", len(self.params))), tag, f))
        if self.compression:
            self._start_states()
            for tag, comp in state.get("compressed", {}).items():
                self._compressed[tag].load_state_dict(comp)

    # ------------------------------------------------------------------ record
    def config_dict(self) -> dict[str, Any]:
        return {
            **super().config_dict(),
            "period_x": self.period_x,
            "state_periods": dict(self.state_periods),
            "reset_states_on_param_sync": self.reset_states_on_param_sync,
            **({"param_delay": self.param_delay} if self.param_delay else {}),  # older checkpoints: 0
            **({"fragments": self.fragments} if self.fragments > 1 else {}),
            **({"state_delay": self.state_delay} if self.state_delay else {}),
            **({"fragment_alpha": self.fragment_alpha} if self.fragment_alpha else {}),
            **({"compression": dict(self.compression)} if self.compression else {}),
            "outer": None if self.outer is None else {
                "optimizer": type(self.outer.optimizer).__name__, **self.outer.hyperparameters(),
            },
        }

    @property
    def anchor(self) -> list[torch.Tensor] | None:
        """The outer optimizer's anchor xbar (None without an outer optimizer)."""
        return None if self.outer is None else self.outer.anchor


# ------------------------------------------------------------------------------ method specs
_FIELDS = frozenset({"period_x", "period_u", "period_v", "clip_rho", "outer", "outer_lr", "outer_momentum",
                     "momentum_periods", "param_delay", "overlap", "fragments", "state_delay", "fragment_alpha",
                     "compression", "stream"})
_NO_STATE_SYNC = _FIELDS - {"period_u", "period_v", "momentum_periods", "overlap", "state_delay"}


def _builder(reset_states: bool):
    def build(cfg, inner, comm, roles, kwargs) -> DesLoc:
        kwargs.setdefault("outer", outer_factory(cfg))
        kwargs.setdefault("param_delay", cfg.param_delay)
        kwargs.setdefault("overlap", cfg.overlap)
        fast_sync_kwargs(cfg, kwargs)
        return DesLoc(inner, comm, cfg.period_x, state_periods(cfg, roles), reset_states_on_param_sync=reset_states,
                      **kwargs)
    return build


SPECS = {
    "local-adam": MethodSpec("parameters and all optimizer states every K steps", _builder(False),
                             _FIELDS - {"momentum_periods"}, "tied",
                             why_fixed="syncs every state with the parameters (every K_x)"),
    "desloc": MethodSpec("parameters every K_x, first moment every K_u, second every K_v", _builder(False), _FIELDS,
                         "tunable", 3, 6),
    "keep-states": MethodSpec("parameters every K_x, optimizer states never (FAVG+OPT)", _builder(False),
                              _NO_STATE_SYNC, why_fixed="never syncs optimizer states"),
    "reset-states": MethodSpec("parameters every K_x, states zeroed at each parameter sync", _builder(True),
                               _NO_STATE_SYNC - {"fragments", "fragment_alpha", "compression", "stream"},
                               why_fixed="zeroes optimizer states at each parameter sync",
                               reset_states=True),
    # the MT-DAO paper's K = 32 example: every period K_x
    "mtdao": MethodSpec("MT-DAO: N first momenta, each synced every K_j; x every K_x, v every K_v", _builder(False),
                        _FIELDS, "tunable", 1, 1, inner="mtdao"),
}
