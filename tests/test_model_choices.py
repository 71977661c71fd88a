"""Model choices decided in issue 18 (item 7), pinned so that a change is deliberate:

* ``--link-speeds`` scales a worker's uplink: an all-reduce is paced by the slowest participant's
  uplink, a gossip message by its sender's; a message *into* a slow-uplink worker is not slowed
  (receiving runs at the profile's rate; README and ``desloc.timing``).
* the DDP reference of a run with ``--events`` counts the workers live at each step, not the
  final count (a bug: it used the final count for every step);
* byte counts print in SI units (kB = 1000 B; they printed 1024-based values as "KB").
"""

from __future__ import annotations

import json

import pytest

from desloc.cli import main
from desloc.loop import human_bytes
from desloc.timing import PROFILES, TimeModel, VirtualClock

NBYTES = 1_000_000


def _model(link_speeds):
    return TimeModel(PROFILES["ethernet"], 0.01, len(link_speeds), link_speeds=link_speeds)


def test_a_slow_uplink_slows_what_it_sends_not_what_it_receives():
    model = _model([1, 1, 1, 0.1])
    full = NBYTES / model.link_bytes_per_s(0)
    alpha = model.network.latency_s
    # worker 0 sends to the slow worker 3: paced by 0's uplink only
    done = model.gossip_finish([0.0] * 4, NBYTES, [(0, 3)])
    assert done[3] == pytest.approx(alpha + full) and done[0] == pytest.approx(alpha + full)
    # worker 3 sends to 0: paced by 3's uplink (10x longer)
    done = model.gossip_finish([0.0] * 4, NBYTES, [(3, 0)])
    assert done[0] == pytest.approx(alpha + 10 * full)
    # an all-reduce over all four: the slowest uplink paces the ring
    assert model.all_reduce_time(NBYTES, [0, 1, 2, 3]) == pytest.approx(6 * alpha + 1.5 * 10 * full)
    assert model.all_reduce_time(NBYTES, [0, 1, 2]) == pytest.approx(4 * alpha + 4 / 3 * full)


def test_gossip_clock_moves_only_the_peers():
    clock = VirtualClock(_model([1, 1, 1, 0.1]))
    clock.local_step([0, 1, 2, 3])
    clock.on_mix(NBYTES, [(0, 3), (3, 0)])
    assert clock.time[1] == clock.time[2] == pytest.approx(0.01)
    assert clock.time[0] == clock.time[3] > 0.01


TINY = ["--workers", "2", "--steps", "12", "--batch-size", "2", "--seq-len", "16", "--eval-every", "6",
        "--eval-batches", "1", "--log-every", "3", "--ckpt-every", "6", "--tokenizer", "byte", "--kx", "2",
        "--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2", "--set", "block_size=16",
        "--network", "ethernet", "--step-time", "0.01"]


@pytest.mark.parametrize("events, live", [("4:add=2", [2] * 4 + [4] * 8), ("4:add=2,8:drop=3", [2] * 4 + [4] * 4 + [1] * 4)])
def test_ddp_reference_follows_the_membership(tmp_path, events, live):
    assert main(["train", *TINY, "--events", events, "--out", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    param_bytes = 4 * summary["params"]  # fp32 gradients
    expected = sum(TimeModel(PROFILES["ethernet"], 0.01, m).ddp_step_time(param_bytes) for m in live)
    assert summary["ddp_modeled_time_s"] == pytest.approx(expected, rel=1e-12)
    final_count_only = 12 * TimeModel(PROFILES["ethernet"], 0.01, live[-1]).ddp_step_time(param_bytes)
    assert summary["ddp_modeled_time_s"] != pytest.approx(final_count_only, rel=1e-6)


@pytest.mark.parametrize("n, text", [(999, "999B"), (1000, "1.0kB"), (1536, "1.5kB"), (2_500_000, "2.5MB"),
                                     (3e9, "3.0GB"), (4e15, "4000.0TB")])
def test_human_bytes_is_si(n, text):
    assert human_bytes(n) == text
