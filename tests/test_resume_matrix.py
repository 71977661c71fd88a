"""A resume is bitwise the uninterrupted run for every combination of ``--events`` (add, drop,
both), ``--join-states`` (average, zeros, checkpoint) and ``--param-delay`` (0, 2) on the simulator.

The method is DES-LOC + Nesterov (K_x = 3, K_u = 2, K_v = 4, outer momentum 0.9, overlapped state
syncs), so parameters, both Adam states, the outer anchor and momentum and, with a delay, a
parameter average in flight all cross the stops. M = 3 at the start: a mean of 3 equal rows is
not the row, so a joiner's replicated outer state must be copied (issue 18, item 2). Steps
1..12, scheduled checkpoints after steps 4, 8, 12; parameter syncs launched after 3, 6, 9 (with
``--param-delay 2`` applied after 5, 8, 11, or at the next event).

Each combination runs once uninterrupted and once as a chain stopped (``stop_after``) after the
steps in ``STOPS`` and resumed each time in a fresh session:

    5   before the events at 7, off the --ckpt-every schedule: the ``checkpoint`` joiners at 7
        must still get the averages of the checkpoint of step 4, not those of the stop at 5
    6   a delayed parameter average in flight (launched after 6; the event at 7 lands it)
    7   right after an event (the checkpoint holds the new workers)
    10  "add" / "drop": an average in flight after the event (launched after 9);
        "both": right after the second event

After the stops at 5 and 6 only those two checkpoints are kept (``publish_checkpoint`` keeps
two), so the step-4 averages reach step 7 only through the checkpoints themselves. The last
checkpoints (model, optimizer with ledger and outer state, schedule, clock) must be equal bit
for bit, and so must the summaries' numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from desloc.algorithms import MethodConfig
from desloc.data import DataConfig
from desloc.records import RunDir
from desloc.train import TrainConfig, train

EVENTS = {"add": "7:add=2", "drop": "7:drop=1", "both": "7:add=2,10:drop=3"}
STOPS = (5, 6, 7, 10)
STEPS = 12
SUMMARY_NUMBERS = ("workers_final", "steps", "tokens", "final_val_loss", "bytes_sent", "bytes_by_state",
                   "ddp_equivalent_bytes", "modeled_time_s", "compute_only_time_s")

pytestmark = pytest.mark.usefixtures("token_cache", "no_plots")  # one token cache; no matplotlib (slow)


def _config(events: str, join: str, delay: int) -> TrainConfig:
    method = MethodConfig("desloc", period_x=3, period_u=2, period_v=4, outer="nesterov", outer_momentum=0.9,
                          param_delay=delay)
    return TrainConfig(method=method, workers=3, steps=STEPS, batch_size=2, seq_len=16, eval_every=STEPS,
                       eval_batches=1, log_every=4, ckpt_every=4, data=DataConfig(tokenizer="byte"),
                       model_overrides=dict(n_layer=1, n_embd=16, n_head=2, block_size=16), events=events,
                       join_states=join)


def _assert_equal(a: Any, b: Any, where: str) -> None:
    """``a`` and ``b`` equal bit for bit: tensors with ``torch.equal``, floats with ``==``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), f"{where}: keys differ"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: layout differs"
        diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else None
        assert torch.equal(a, b), f"{where}: differs after resume (max |diff| {diff})"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def train_in_stops(cfg: TrainConfig, out: Path, stops: tuple[int, ...]) -> dict[str, Any]:
    """Train ``cfg`` into ``out`` stopped after each step of ``stops`` and resumed each time in a
    fresh session, then to the end; returns the last summary."""
    done = 0
    for stop in stops:
        partial = train(cfg, out, resume=done > 0, stop_after=stop - done, progress=False)
        assert partial["status"] == "partial" and RunDir(out).latest_step() == stop
        done = stop
    return train(cfg, out, resume=True, progress=False)


def _last_checkpoint(out: Path) -> dict[str, Any]:
    ckpt = RunDir(out).load_checkpoint(0)
    assert ckpt["step"] == STEPS
    ckpt.pop("elapsed_s")  # wall clock
    return ckpt


@pytest.mark.timeout(240)
@pytest.mark.parametrize("delay", [0, 2], ids=lambda d: f"delay{d}")
@pytest.mark.parametrize("join", ["average", "zeros", "checkpoint"])
@pytest.mark.parametrize("events", list(EVENTS))
def test_resume_is_bitwise_for_events_join_states_and_param_delay(tmp_path, events, join, delay):
    cfg = _config(EVENTS[events], join, delay)
    straight = train(cfg, tmp_path / "straight", progress=False)
    chained = tmp_path / "chained"
    resumed = train_in_stops(cfg, chained, STOPS)
    _assert_equal(_last_checkpoint(tmp_path / "straight"), _last_checkpoint(chained), f"{events}/{join}/delay{delay}")
    for key in SUMMARY_NUMBERS:
        assert resumed[key] == straight[key], f"summary {key}: {resumed[key]!r} vs {straight[key]!r}"
    written = json.loads((chained / "summary.json").read_text())
    assert written["workers_final"] == {"add": 5, "drop": 2, "both": 2}[events]
