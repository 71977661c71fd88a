"""``--stream``'s rule (desloc.stream), by hand, and its record in a run."""

from __future__ import annotations

import json
import math

import pytest

from desloc.algorithms import MethodConfig
from desloc.optim import InnerConfig
from desloc.stream import stream_choice
from desloc.timing import TimeModel, profile

ROLES = InnerConfig("adamw").state_roles()


def test_schedule_only_rule():
    choice = stream_choice(MethodConfig("desloc", period_x=16, stream=True), ROLES, 4000, 1000, None)
    assert choice.fields == {"fragments": 1, "param_delay": 4, "state_delay": 1} and choice.link_busy is None


def test_rule_from_the_time_model_by_hand():
    """M = 4, 1e6 parameters (4 MB fp32), 8 MB/s link (64 Mbit/s), no latency, S = 0.25 s: one ring
    all-reduce W = 2 * 3/4 * 4e6 / 8e6 = 0.75 s. K = 16/48/96: U = 0.75/0.25 * (1/16 + 1/48 + 1/96) =
    0.28125; D_x = min(8, ceil(3) + 1) = 4; D_s = min(47, ceil(2.25 / 0.25) + 1) = 10."""
    model = TimeModel(profile("64mbit:0ms"), 0.25, 4)
    W = model.all_reduce_time(4_000_000, range(4))
    assert W == pytest.approx(0.75)
    choice = stream_choice(MethodConfig("desloc", period_x=16, period_u=48, period_v=96, stream=True), ROLES,
                           4_000_000, 1_000_000, model)
    assert choice.fields == {"fragments": 1, "param_delay": 4, "state_delay": 10}
    assert choice.link_busy == pytest.approx(3 * (1 / 16 + 1 / 48 + 1 / 96))


def test_compression_shortens_the_delays():
    """The same link with int8 on every tag: the two-half compressed all-reduce of 4 chunks of 250,000
    int8 values with their block scales, 4 * (250000 + 4 * 3907) = 1,062,512 bytes: W = 1.5 * 1062512 / 8e6."""
    model = TimeModel(profile("64mbit:0ms"), 0.25, 4)
    choice = stream_choice(MethodConfig("desloc", period_x=16, period_u=48, period_v=96, stream=True,
                                        compression="int8"), ROLES, 4_000_000, 1_000_000, model)
    w = 1.5 * 1_062_512 / 8e6
    assert choice.fields == {"fragments": 1, "param_delay": math.ceil(w / 0.25) + 1,
                             "state_delay": math.ceil(3 * w / 0.25) + 1}


def test_given_fields_are_kept_and_a_free_network_delays_nothing():
    model = TimeModel(profile("64mbit:0ms"), 0.25, 4)
    kept = stream_choice(MethodConfig("desloc", period_x=16, stream=True, param_delay=2, fragments=2), ROLES,
                         4_000_000, 1_000_000, model)
    assert kept.fields["param_delay"] == 2 and kept.fields["fragments"] == 2
    free = stream_choice(MethodConfig("desloc", period_x=16, stream=True), ROLES, 4_000_000, 1_000_000,
                         TimeModel(profile("free"), 0.25, 4))
    assert free.fields == {"fragments": 1, "param_delay": 0, "state_delay": 0}


@pytest.mark.usefixtures("token_cache", "no_plots")
def test_a_stream_run_records_its_choice(tmp_path, capsys):
    from desloc.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--tokenizer", "byte", "--workers", "2", "--steps", "8", "--kx", "4",
                 "--batch-size", "2", "--seq-len", "16", "--eval-every", "8", "--eval-batches", "1", "--stream",
                 "--network", "20mbit", "--step-time", "0.1", "--out", str(out)]) == 0
    assert "--stream chose" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())["method"]
    summary = json.loads((out / "summary.json").read_text())
    assert config["stream"] is True and config["param_delay"] >= 1 and config["state_delay"] >= 1
    assert summary["stream"]["param_delay"] == config["param_delay"] == summary["param_delay"]
    assert summary["state_delay"] == config["state_delay"] and summary["fragments"] == 1
