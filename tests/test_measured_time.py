"""``--step-time measured`` (issue 21 item 4): the modeled time of "this run on M machines like this
one". The rule (desloc.timing.TimeConfig): every local step costs the median of the run's measured
steps, the clock is replayed at that median at the end, and summary.json and every metrics row
carry the replayed time. The recorded samples are read back from the last checkpoint (the clock's
state), and the expected times are computed from them without the replay: in closed form for DDP,
and by a second run that is *given* the median as ``--step-time`` (same events, fixed step time)."""

from __future__ import annotations

import json
import statistics

import pytest

from _cli_helpers import TINY, error_line, without
from desloc.cli import main
from desloc.records import RunDir
from desloc.timing import PROFILES, TimeConfig, TimeModel


def _train(tmp_path, name: str, *args: str) -> tuple[dict, list[dict], RunDir]:
    out = tmp_path / name
    base = without(TINY, "--kx") if "ddp" in args else TINY  # ddp has no sync period
    assert main(["train", *base, "--log-every", "1", "--out", str(out), *args]) == 0
    run = RunDir(out)
    return json.loads((out / "summary.json").read_text()), run.read_metrics(), run


def _samples(run: RunDir, steps: int) -> list[float]:
    return run.load_checkpoint(0, steps)["clock"]["measured"]


def test_ddp_costs_the_median_per_step_plus_the_all_reduce(tmp_path):
    summary, rows, run = _train(tmp_path, "ddp", "--method", "ddp", "--network", "ethernet", "--step-time", "measured")
    samples = _samples(run, 4)
    assert len(samples) == 4 == summary["measured_step_samples"] and all(t > 0 for t in samples)
    median = statistics.median(samples)
    assert summary["step_time_source"] == "measured" and summary["step_time_s"] == median
    param_bytes = 4 * summary["params"]  # fp32 gradients, one all-reduce per step
    step = TimeModel(PROFILES["ethernet"], median, 2).ddp_step_time(param_bytes)
    assert summary["modeled_time_s"] == pytest.approx(4 * step, rel=1e-12)
    assert summary["ddp_modeled_time_s"] == pytest.approx(4 * step, rel=1e-12)
    assert summary["compute_only_time_s"] == pytest.approx(4 * median, rel=1e-12)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:  # every row is rewritten at the run's median, not the running one
        assert r["modeled_time_s"] == pytest.approx(r["step"] * step, rel=1e-12)


def test_the_replay_equals_a_run_given_the_median(tmp_path):
    """desloc with overlapped state syncs on a slow link (hidden transfers, waits): the measured run's
    modeled time equals that of the same run with --step-time set to its median."""
    net = ["--method", "desloc", "--network", "home"]
    measured, rows, run = _train(tmp_path, "measured", *net, "--step-time", "measured")
    median = statistics.median(_samples(run, 4))
    assert measured["step_time_s"] == median
    given, given_rows, _ = _train(tmp_path, "given", *net, "--step-time", repr(median))
    assert given["step_time_source"] == "given" and given["step_time_s"] == median
    for key in ("modeled_time_s", "compute_only_time_s", "ddp_modeled_time_s"):
        assert measured[key] == pytest.approx(given[key], rel=1e-12), key
    assert [r["modeled_time_s"] for r in rows] == pytest.approx([r["modeled_time_s"] for r in given_rows], rel=1e-12)
    assert rows[-1]["modeled_time_s"] == measured["modeled_time_s"]


def test_the_source_of_the_step_time_is_recorded(tmp_path):
    flops, _, _ = _train(tmp_path, "flops", "--method", "desloc")
    assert flops["step_time_source"] == "flops" and "measured_step_samples" not in flops
    assert TimeConfig(step_time_s="measured").step_time_source == "measured"
    assert TimeConfig(step_time_s=0.5).step_time_source == "given"


@pytest.mark.parametrize("args,fragments", [
    (["--step-time", "measured", "--mfu", "0.5"], ["--mfu", "--step-time gives the modeled step time"]),
    (["--step-time", "measured", "--peak-tflops", "100"], ["--peak-tflops"]),
    (["--step-time", "measured", "--events", "2:add=1"], ["--step-time measured with --events"]),
    (["--step-time", "measured", "--method", "gasloc", "--local-steps", "auto"], ["--local-steps auto"]),
    (["--step-time", "fast"], ["--step-time", "'measured'"]),
])
def test_measured_is_refused_where_it_cannot_apply(args, fragments, tmp_path, capsys):
    line = error_line(capsys, ["train", *TINY, *args, "--out", str(tmp_path / "x")])
    assert all(f in line for f in fragments), line


def test_the_plot_of_modeled_time_names_its_model():
    cfg = TimeConfig(network="ethernet", step_time_s="measured")
    label = cfg.describe(TimeModel(PROFILES["ethernet"], 0.031, 2))
    assert label == "ethernet (10 Gb/s, 0.1 ms); measured 31 ms/step (this machine)"
    flops = TimeConfig().describe(TimeModel(PROFILES["datacenter"], 0.0123, 2))
    assert flops == "datacenter (100 Gb/s, 0.01 ms); 312 TFLOP/s x MFU 0.4 = 12.3 ms/step"


def test_version(capsys):
    import desloc

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"desloc {desloc.__version__}"
