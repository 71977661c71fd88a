"""Method specs: everything the runtime needs to know about a method, declared in one place.

A :class:`MethodSpec` sits next to its algorithm (the bottom of ``ddp.py``, ``desloc.py``,
``diloco.py``, ``gasloc.py``) and says:

* how the method is **built** from a :class:`~desloc.algorithms.MethodConfig` and an inner
  optimizer (``build``);
* which config **fields it consumes** (``fields``; :meth:`MethodSpec.unused` adds the conditions
  that depend on the rest of the config, e.g. the outer learning rate is read only when there is
  an outer optimizer), each field it ignores with the reason;
* its **sync schedule** (:meth:`MethodSpec.schedule`: the :class:`SyncSchedule` the built
  optimizer executes, from the config and the inner optimizer's state roles);
* what it is **incompatible with** (``refuses``: membership events, torchft, sharding), with why.

Everything else reads the spec instead of restating the method: flag refusal in the CLI is
"flags given minus fields consumed", ``desloc compare`` projects one set of flags through each
method's spec (:meth:`MethodSpec.project`), ``desloc wallclock`` / ``plan`` and the time model
read :meth:`MethodSpec.schedule`, and :class:`~desloc.config.TrainConfig` asks ``refuses``.
Adding a method = its algorithm file with its spec, :func:`register` (``algorithms/__init__.py``
registers the built-in ones), tests, and a README row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from desloc.algorithms.outer import default_outer_lr, default_outer_momentum
from desloc.algorithms.schedule import SyncSchedule
from desloc.errors import ConfigError, check_finite, check_period
from desloc.optim.roles import StateRole
from desloc.topology import RANDOM_TOPOLOGIES

if TYPE_CHECKING:
    import torch

    from desloc.algorithms.base import SyncedOptimizer
    from desloc.algorithms.outer import OuterFactory
    from desloc.comm.base import Communicator

Builder = Callable[["MethodConfig", "torch.optim.Optimizer", "Communicator", dict[str, StateRole], dict[str, Any]],
                   "SyncedOptimizer"]

# The fields of MethodConfig a spec can consume (``name`` is every method's).
METHOD_FIELDS = ("period_x", "period_u", "period_v", "clip_rho", "outer", "outer_lr", "outer_momentum",
                 "topology", "local_steps", "gossip_seed", "momentum_periods", "param_delay", "overlap",
                 "fragments", "state_delay", "fragment_alpha", "compression", "stream")
# The fast-sync fields (issue 20: README "Fast syncs"): how syncs are cut, delayed and encoded.
FAST_SYNC_FIELDS = ("fragments", "state_delay", "fragment_alpha", "compression", "stream")
# Fields that describe how syncs are executed rather than what the method computes: a compare of
# several methods keeps them as given for every run, so every run records the same engine setting.
EXECUTION_FIELDS = ("overlap",)

REGISTRY: dict[str, "MethodSpec"] = {}


@dataclass(frozen=True)
class MethodSpec:
    """One method, as data plus two functions.

    summary: one line for ``desloc methods``.
    build: ``build(cfg, inner, comm, roles, kwargs) -> SyncedOptimizer`` (``kwargs``: options the
        caller passes through to the class, e.g. ``zero_copy``).
    fields: the MethodConfig fields the method reads (``name`` aside). Conditions on the rest of
        the config are in :meth:`unused`.
    state_periods: how K_u and K_v follow from K_x -- "tunable" (default ``u_times`` K_x and
        ``v_times`` K_x, the user may set them), "tied" (always K_x), or "none" (never synced).
    why_fixed: for "tied" / "none", what the method does with its states (for error messages).
    reset_states: zero the states at every parameter sync (reset-states).
    outer: the outer optimizer used unless the config names one (None = plain averaging).
    inner: the inner optimizer family the method needs ("mtdao"), or None for any.
    syncs_params: False for a method that all-reduces the gradient every step (DDP) instead of
        syncing parameters every K_x steps.
    gossips: exchanges with random peers (topology, local steps) instead of all-reducing.
    refuses: run features the method cannot take ("events", "ft", "shard"), each with the reason.
    """

    summary: str
    build: Builder
    fields: frozenset[str]
    state_periods: str = "none"
    u_times: int = 0
    v_times: int = 0
    why_fixed: str = ""
    reset_states: bool = False
    outer: str | None = None
    inner: str | None = None
    syncs_params: bool = True
    gossips: bool = False
    refuses: Mapping[str, str] = field(default_factory=dict)
    name: str = ""  # set by register()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fields) - set(METHOD_FIELDS))
        if unknown:
            raise ConfigError(f"method spec fields {unknown} are not MethodConfig fields; choose from {METHOD_FIELDS}")
        if self.state_periods not in ("tunable", "tied", "none"):
            raise ConfigError(f"method spec state_periods must be 'tunable', 'tied' or 'none', got "
                              f"{self.state_periods!r}")

    @property
    def has_sync_period(self) -> bool:
        """False for DDP, which all-reduces the gradient every step."""
        return self.syncs_params

    @property
    def averages_params(self) -> bool:
        """Averages the parameters every K_x steps (what ``param_delay`` can delay)."""
        return self.syncs_params and not self.gossips

    # ------------------------------------------------------------------------- the schedule
    def schedule(self, cfg: "MethodConfig", roles: Mapping[str, StateRole | str]) -> SyncSchedule:
        """What the built optimizer sends at which step (tags in send order; None = never)."""
        if not self.syncs_params:
            return SyncSchedule({"grads": 1})
        roles = {name: StateRole.parse(role) for name, role in roles.items()}
        states = state_periods(cfg, roles) if not self.gossips else {}
        return SyncSchedule({"params": cfg.period_x, **states})

    # ----------------------------------------------------------------- fields and their reasons
    def unused(self, cfg: "MethodConfig", inner: str, in_compare: bool = False) -> dict[str, str]:
        """The MethodConfig fields this run of the method ignores, each with the reason.

        ``inner`` is the inner optimizer's name. ``in_compare``: a "tied" method does not take
        K_u / K_v from a comparison's shared flags (train accepts them when they equal K_x)."""
        out: dict[str, str] = {}
        name = self.name
        for f in METHOD_FIELDS:
            if f not in self.fields:
                out[f] = self._why_not(f, cfg, inner)
        if self.state_periods == "tied" and in_compare:
            for f in ("period_u", "period_v"):
                out[f] = self._why_not(f, cfg, inner)
        if "momentum_periods" not in out and not inner.startswith("mtdao"):
            out["momentum_periods"] = f"{name} with inner {inner} has no MT-DAO momenta to give periods"
        if cfg.outer is None:
            hint = "; add --outer nesterov (or sgd) to use one" if self.syncs_params else ""
            for f in ("outer_lr", "outer_momentum"):
                out.setdefault(f, f"{name} runs no outer optimizer here{hint}")
        if "overlap" not in out and not self.syncs_states(cfg, inner):
            out["overlap"] = ("no optimizer state is ever synced here (every state period is 'none'), and only "
                              "state syncs overlap")
        if "state_delay" not in out and not self.syncs_states(cfg, inner):
            out["state_delay"] = "no optimizer state is ever synced here (every state period is 'none')"
        if "gossip_seed" not in out and cfg.topology not in RANDOM_TOPOLOGIES:
            out["gossip_seed"] = (f"the {cfg.topology} topology is the same every round; only the random ones "
                                  f"({', '.join(RANDOM_TOPOLOGIES)}) draw from --gossip-seed")
        return {f: out[f] for f in METHOD_FIELDS if f in out}

    def _why_not(self, f: str, cfg: "MethodConfig", inner: str) -> str:
        name = self.name
        if f == "period_x":
            return f"{name} all-reduces the gradient every step; it has no sync period"
        if f in ("period_u", "period_v"):
            return f"{name} {self.why_fixed}; K_u / K_v apply to {tunable_methods()}"
        if f == "momentum_periods":
            return f"momentum_periods apply to {tunable_methods()}, not {name}"
        if f == "outer":
            return (f"{name} has no parameter sync to put an outer optimizer on" if not self.syncs_params
                    else f"{name} takes no outer optimizer")
        if f in ("outer_lr", "outer_momentum"):
            hint = "; add --outer nesterov (or sgd) to use one" if self.syncs_params else ""
            return f"{name} runs no outer optimizer here{hint}"
        if f in ("topology", "local_steps", "gossip_seed"):
            return f"only {_gossipers()}, not {name}"
        if f == "param_delay":
            return (f"{name} has no parameter average to delay ("
                    + ("it all-reduces the gradient every step)" if not self.syncs_params else "it gossips)"))
        if f in ("fragments", "fragment_alpha", "stream"):
            return (f"{name} has no periodic average to stream ("
                    + ("it all-reduces the gradient every step)" if not self.syncs_params else
                       "it gossips)" if self.gossips else "it zeroes the states at each whole parameter average)"))
        if f == "state_delay":
            return f"{name} never averages an optimizer state, so there is none to delay"
        if f == "compression":
            return (f"{name} gossips point to point; compression applies to all-reduced averages" if self.gossips
                    else f"{name} zeroes the states at each whole parameter average; use keep-states to compress")
        if f == "overlap":
            if self.state_periods == "none":
                return f"{name} never syncs optimizer states, and only state syncs overlap"
            return f"{name} runs no overlapped sync"
        return f"{name} does not use {f}"

    def syncs_states(self, cfg: "MethodConfig", inner: str) -> bool:
        """Whether this run ever averages an optimizer state (a state period that is not None).
        With an MT-DAO inner optimizer its momenta follow ``momentum_periods`` (default: K_u)."""
        if self.state_periods != "tunable":
            return self.state_periods == "tied"
        first = cfg.momentum_periods if cfg.momentum_periods is not None and inner.startswith("mtdao") \
            else [cfg.period_u]
        return any(k is not None for k in [*first, cfg.period_v])  # "auto" (not yet resolved) syncs

    def project(self, fields: Mapping[str, Any], inner: str) -> dict[str, Any]:
        """A comparison's shared method fields as this method takes them: every field it does not
        consume goes back to MethodConfig's default (so a flag meant for another method neither
        errors nor lingers in this run's config), except the execution fields
        (:data:`EXECUTION_FIELDS`), kept as given."""
        defaults = {f: getattr(MethodConfig, f) for f in METHOD_FIELDS}
        out = dict(fields)
        probe = MethodConfig.__new__(MethodConfig)  # the fields as given, unvalidated, to read conditions
        probe.__dict__.update({**defaults, **out})
        if probe.outer is None:
            probe.outer = self.outer
        for f in self.unused(probe, inner, in_compare=True):
            if f not in EXECUTION_FIELDS:
                out[f] = defaults[f]
        return out

    def check_run(self, feature: str) -> None:
        """Raise when the method cannot take run feature ``feature`` (see ``refuses``)."""
        if feature in self.refuses:
            raise ConfigError(self.refuses[feature])


AUTO = "auto"  # a period resolved from period_x by the method


@dataclass
class MethodConfig:
    """Which method and its sync periods.

    name: registry name (see :data:`REGISTRY`, ``desloc.algorithms.METHODS``).
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
    outer_lr, outer_momentum: the outer SGD's learning rate and momentum; "auto" (default) =
        :func:`~desloc.algorithms.outer.default_outer_lr` and
        :func:`~desloc.algorithms.outer.default_outer_momentum` of period_x (lr 1, momentum 0 --
        plain averaging -- for H <= 50, up to DiLoCo's lr 0.7, momentum 0.9 from H = 500).
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
    fragments: F, cut every synced buffer into F slices synced at staggered steps of each period
        (1 = whole buffers, the default; :mod:`desloc.algorithms.schedule`).
    state_delay: D_s, apply each state average D_s steps after launching it with the EMA rule
        s <- s + beta^D_s (E[s_snap] - s_snap) (0 = at once; < the smallest state period).
    fragment_alpha: alpha in [0, 1), keep that share of the local parameters when an average is
        applied (torchft's ``fragment_update_alpha``; 0 = take the average, the default).
    compression: {tag: codec} (``"*"`` = every tag), e.g. ``{"params": "int4", "*": "int8"}``, or
        the flag's text ``"params=int4,exp_avg=int8"``; None = full precision. Codecs:
        :mod:`desloc.comm.codecs`; the error-feedback rule: :mod:`desloc.algorithms.fastsync`.
    stream: choose fragments and delays by the rule of :func:`desloc.stream.stream_choice`
        (resolved by :class:`~desloc.config.TrainConfig`, from the schedule and the time model).
    """

    name: str = "desloc"
    period_x: int = 256
    period_u: int | None | str = "auto"
    period_v: int | None | str = "auto"
    clip_rho: float | None = None
    outer: str | None = None
    outer_lr: float | str = "auto"
    outer_momentum: float | str = "auto"
    topology: str = "one-peer"
    local_steps: list[int] | str | None = None
    gossip_seed: int = 0
    momentum_periods: list[int | None] | None = None
    param_delay: int = 0
    overlap: bool = True
    fragments: int = 1
    state_delay: int = 0
    fragment_alpha: float = 0.0
    compression: dict[str, str] | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        if self.name not in REGISTRY:
            raise ConfigError(f"unknown method {self.name!r}; choose one of {sorted(REGISTRY)}")
        spec = REGISTRY[self.name]
        self._check_numbers()
        self._check_param_delay(spec)
        self._check_fast_syncs(spec)
        self._resolve_outer(spec)
        self._check_gossip(spec)
        self._resolve_state_periods(spec)

    def _check_numbers(self) -> None:
        check_period("period_x (K_x)", self.period_x)
        for field in ("period_u", "period_v"):
            if getattr(self, field) != AUTO:
                check_period(f"{field} (K_{field[-1]})", getattr(self, field), allow_none=True)
        if self.clip_rho is not None:
            check_finite("clip_rho", self.clip_rho, "clip_rho=1.0, or None (off)")
        if self.outer_lr == AUTO:
            self.outer_lr = default_outer_lr(self.period_x)
        check_finite("outer_lr", self.outer_lr, "outer_lr=0.7 (DiLoCo)")
        if self.outer_momentum == AUTO:
            self.outer_momentum = default_outer_momentum(self.period_x)
        check_finite("outer_momentum", self.outer_momentum, "outer_momentum=0.9 (DiLoCo at H ~ 500)")
        if self.clip_rho is not None and not self.clip_rho > 0:
            raise ConfigError(f"clip_rho must be > 0 or None (off), got {self.clip_rho}")
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"overlap must be true or false, got {self.overlap!r}")
        if not self.outer_lr > 0:
            raise ConfigError(f"outer_lr must be > 0, got {self.outer_lr}; DiLoCo uses 0.7")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ConfigError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}; DiLoCo uses 0.9")

    def _check_param_delay(self, spec: MethodSpec) -> None:
        if isinstance(self.param_delay, bool) or not isinstance(self.param_delay, int) or self.param_delay < 0:
            raise ConfigError(f"param_delay (--param-delay) must be an integer >= 0, got {self.param_delay!r}; "
                              "0 = blocking parameter sync")
        if not self.param_delay:
            return
        if "param_delay" not in spec.fields:
            raise ConfigError(f"--param-delay delays a parameter average; {self.name} "
                              + ("all-reduces the gradient every step" if not spec.syncs_params
                                 else "gossips instead of averaging" if spec.gossips
                                 else "has none to delay") + ". Drop --param-delay")
        if self.param_delay >= self.period_x:
            raise ConfigError(f"param_delay={self.param_delay} must be < K_x={self.period_x} (one parameter "
                              f"average in flight at a time); e.g. --param-delay {max(1, self.period_x // 4)}")

    def _check_fast_syncs(self, spec: MethodSpec) -> None:
        """Types and ranges of the fast-sync fields (what depends on the inner optimizer's states
        is checked when the method is built); a field the method cannot take is refused."""
        from desloc.comm.codecs import format_compression, parse_compression

        if isinstance(self.fragments, bool) or not isinstance(self.fragments, int) or self.fragments < 1:
            raise ConfigError(f"fragments (--fragments) must be an integer >= 1, got {self.fragments!r}; e.g. 4")
        if self.fragments > self.period_x and spec.syncs_params:
            raise ConfigError(f"fragments={self.fragments} > K_x={self.period_x}: a fragment would be synced less "
                              f"than once per period; use --fragments {self.period_x} or fewer")
        if isinstance(self.state_delay, bool) or not isinstance(self.state_delay, int) or self.state_delay < 0:
            raise ConfigError(f"state_delay (--state-delay) must be an integer >= 0, got {self.state_delay!r}")
        if isinstance(self.fragment_alpha, bool) or not isinstance(self.fragment_alpha, (int, float)) \
                or not 0.0 <= self.fragment_alpha < 1.0:
            raise ConfigError(f"fragment_alpha (--fragment-alpha) must be in [0, 1), got {self.fragment_alpha!r}")
        self.fragment_alpha = float(self.fragment_alpha)
        if not isinstance(self.stream, bool):
            raise ConfigError(f"stream must be true or false, got {self.stream!r}")
        if isinstance(self.compression, str) or self.compression:
            text = self.compression if isinstance(self.compression, str) else format_compression(dict(self.compression))
            self.compression = parse_compression(text) or None
        else:
            self.compression = None
        given = {"fragments": self.fragments != 1, "state_delay": self.state_delay != 0,
                 "fragment_alpha": self.fragment_alpha != 0.0, "compression": self.compression is not None,
                 "stream": self.stream}
        for f, on in given.items():
            if on and f not in spec.fields:
                flag = "--" + {"compression": "compress"}.get(f, f).replace("_", "-")
                raise ConfigError(f"{flag}: {spec._why_not(f, self, '')}; drop {flag}")

    def _resolve_outer(self, spec: MethodSpec) -> None:
        if self.outer is None:
            self.outer = spec.outer
        if self.outer not in (None, "nesterov", "sgd"):
            raise ConfigError(f"outer must be 'nesterov', 'sgd' or None, got {self.outer!r}")
        if self.outer is not None and "outer" not in spec.fields:
            why = "has no parameter sync to put an outer optimizer on" if not spec.syncs_params \
                else "takes no outer optimizer"
            raise ConfigError(f"{self.name} {why}; drop --outer")

    def _check_gossip(self, spec: MethodSpec) -> None:
        from desloc.topology import TOPOLOGIES

        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"unknown topology {self.topology!r}; choose one of {TOPOLOGIES}")
        if self.local_steps == AUTO:
            if "local_steps" not in spec.fields:
                raise ConfigError(f"local_steps='auto' sizes gasloc's per-worker local steps; {self.name} has none")
        elif self.local_steps is not None:
            self.local_steps = list(self.local_steps)
            if any(isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= self.period_x
                   for h in self.local_steps):
                raise ConfigError(f"local_steps (H_i) must be integers in [1, period_x={self.period_x}], "
                                  f"got {self.local_steps}; e.g. --local-steps {self.period_x},{max(1, self.period_x // 4)}")

    def _resolve_state_periods(self, spec: MethodSpec) -> None:
        if self.momentum_periods is not None:
            self.momentum_periods = list(self.momentum_periods)
            for j, k in enumerate(self.momentum_periods):
                check_period(f"momentum_periods[{j}] (K_{j})", k, allow_none=True)
            if "momentum_periods" not in spec.fields:
                raise ConfigError(f"momentum_periods apply to {tunable_methods()}, not {self.name}")
        if spec.state_periods == "tunable":
            if self.period_u == AUTO:
                self.period_u = spec.u_times * self.period_x
            if self.period_v == AUTO:
                self.period_v = spec.v_times * self.period_x
        elif spec.state_periods == "tied":
            for field in ("period_u", "period_v"):
                val = getattr(self, field)
                if val != AUTO and val != self.period_x:
                    raise ConfigError(
                        f"{self.name} {spec.why_fixed}, so {field} must equal period_x={self.period_x} "
                        f"(got {val}); use --method desloc for different periods"
                    )
            self.period_u = self.period_v = self.period_x
        else:  # the method never syncs states
            self.period_u = self.period_v = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def register(name: str, spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` the method ``name`` (the CLI's ``--method`` value); returns the named spec."""
    if not name or any(c in name for c in ",+@ "):
        raise ConfigError(f"a method name must be non-empty without ',', '+', '@' or spaces, got {name!r}")
    named = MethodSpec(**{**spec.__dict__, "name": name})
    REGISTRY[name] = named
    return named


def unregister(name: str) -> None:
    """Remove method ``name`` (tests that register a method of their own)."""
    REGISTRY.pop(name, None)


def tunable_methods() -> str:
    return " and ".join(n for n, p in REGISTRY.items() if p.state_periods == "tunable")


def _gossipers() -> str:
    names = [n for n, p in REGISTRY.items() if p.gossips]
    return " and ".join(names) + (" gossips" if len(names) == 1 else " gossip")


def fast_sync_kwargs(cfg: "MethodConfig", kwargs: dict[str, Any]) -> dict[str, Any]:
    """The builder's keyword arguments for the fast-sync fields of ``cfg`` (the desloc family and
    diloco; a field the method does not consume is never passed)."""
    spec = REGISTRY[cfg.name]
    for f in ("fragments", "state_delay", "fragment_alpha", "compression"):
        if f in spec.fields:
            kwargs.setdefault(f, getattr(cfg, f))
    return kwargs


def outer_factory(cfg: "MethodConfig") -> "OuterFactory | None":
    """The outer optimizer named by ``cfg.outer`` (SGD on the pseudo-gradient), or None."""
    if cfg.outer is None:
        return None
    from desloc.algorithms.outer import nesterov_sgd

    return nesterov_sgd(cfg.outer_lr, cfg.outer_momentum, nesterov=cfg.outer == "nesterov")


def state_periods(cfg: "MethodConfig", roles: Mapping[str, StateRole]) -> dict[str, int | None]:
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
