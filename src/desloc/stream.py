r"""``--stream``: delays (and fragments, when asked) chosen so that syncs hide behind compute.

The rule (README "Fast syncs"), for a method that averages parameters every K_x steps and
states j every K_j steps, each tag's bytes B_j per worker (the codec's encoded bytes when
compressed), a one-step compute time S and the wire time W(B) of one sync of B bytes (the
collective desloc uses: ring all-reduce, or the compressed all-reduce), from the run's time
model:

    D_x = min(K_x // 2, ceil(W(B_x) / S) + 1)                 a parameter average is in flight for
                                                              its wire time plus a step to spare
    D_s = min(min_j K_j - 1, ceil((W(B_x) + sum_j W(B_j)) / S) + 1)
                                                              a state average may queue behind the
                                                              parameters and every other state
    F   = 1 (whole buffers) unless --fragments is given

The caps come from measurements, not from the wire: delaying the parameter average by up to
K_x / 4 costs at most 0.5% of final loss on the tiny GPT and K_x / 2 about 1%
(benchmarks/README.md, delay_quality.py), while the state delay's rule is exact for an EMA given
the same contributions (:mod:`desloc.algorithms.fastsync`) and cost nothing measurable.
Fragments are not chosen: with plain averaging, F = 4 staggered fragments cost 5-8% of final
loss on the tiny GPT (benchmarks/README.md, fast_sync_quality.py), so they stay an explicit
choice (``--fragments``). U = sum_j W(B_j) / (K_j S), the link's busy share, is reported: with
U >= 1 no schedule hides the wire. Without ``--network`` / ``--step-time`` (no time information
the user gave) the rule reads the schedule alone: D_x = max(1, K_x // 4), D_s = 1. Fields the user
set (``--fragments``, ``--param-delay``, ``--state-delay``) are kept. The choice is printed and
recorded in config.json (the resolved fields) and summary.json (``stream``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

from desloc.algorithms.spec import REGISTRY, MethodConfig, state_periods
from desloc.optim.roles import StateRole


@dataclass
class StreamChoice:
    fields: dict[str, int]
    link_busy: float | None  # U (None: no time information)
    reason: str

    def record(self) -> dict[str, Any]:
        return {**self.fields, "link_busy": self.link_busy, "rule": self.reason}


def stream_choice(method: MethodConfig, roles: Mapping[str, StateRole], param_bytes: int, numel: int,
                  time_model=None) -> StreamChoice:
    """The fragments and delays ``--stream`` picks (module docstring). ``time_model``: the run's
    :class:`desloc.timing.TimeModel` when the user gave ``--network`` or ``--step-time``, else None."""
    spec = REGISTRY[method.name]
    periods = {"params": method.period_x,
               **({} if "state_delay" not in spec.fields else
                  {k: v for k, v in state_periods(method, roles).items() if v is not None})}
    kx = method.period_x
    states = [k for tag, k in periods.items() if tag != "params"]
    if time_model is None:
        dx, ds, U = max(1, kx // 4), 1, None
        reason = "schedule only (no --network / --step-time given): D_x = K_x // 4, D_s = 1, F = 1"
    else:
        from desloc.comm.codecs import get_codec

        M = time_model.world_size
        S = time_model.step_time_s
        compression = method.compression or {}
        wire = {}
        for tag in periods:
            codec = compression.get(tag, compression.get("*", "none"))
            if codec == "none":
                wire[tag] = time_model.all_reduce_time(param_bytes, list(range(M)))
            else:
                from desloc.algorithms.fastsync import encoded_bytes, two_stage

                p = encoded_bytes(get_codec(codec), numel, M)
                wire[tag] = (time_model.all_reduce_time if two_stage(M) else time_model.all_gather_time)(
                    p, list(range(M)))
        if S <= 0 or wire["params"] <= 0:
            return StreamChoice({"fragments": method.fragments, "param_delay": method.param_delay,
                                 "state_delay": method.state_delay}, 0.0,
                                "the modeled wire time is 0: nothing to hide, syncs stay undelayed")
        U = sum(wire[tag] / (k * S) for tag, k in periods.items())
        dx = min(max(1, kx // 2), math.ceil(wire["params"] / S) + 1)
        ds = math.ceil(sum(wire.values()) / S) + 1
        reason = (f"link busy U = {U:.2f} of the compute; D_x = min(K_x // 2, ceil(W_x / S) + 1), D_s = "
                  "min(K_s - 1, ceil(sum W / S) + 1), F = 1" + (" -- U >= 1: the wire cannot hide" if U >= 1 else ""))
    fields = {"fragments": method.fragments,
              "param_delay": min(kx - 1, dx) if method.param_delay == 0 else method.param_delay}
    if states and "state_delay" in spec.fields:
        fields["state_delay"] = min(min(states) - 1, ds) if method.state_delay == 0 else method.state_delay
    if "fragments" not in spec.fields or (spec.reset_states):
        fields.pop("fragments", None)
    if "param_delay" not in spec.fields:
        fields.pop("param_delay", None)
    return StreamChoice(fields, U, reason)


def apply_stream(method: MethodConfig, choice: StreamChoice) -> MethodConfig:
    """``method`` with the chosen fields (validated again)."""
    return replace(method, **choice.fields)
