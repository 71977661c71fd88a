"""Classes of bad input end in one ``desloc: error:`` line (exit 2), never in a traceback, a silent
acceptance or a non-finite number: every numeric flag of every subcommand (found from the parser,
so a new flag is swept too), the time model's edge values, strict JSON on stdout, write failures
(the OS's and torch's) and damaged records read back."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import desloc.compare
import desloc.ft
import desloc.records
import desloc.toy
import desloc.train
from desloc import cli
from desloc.cli import main
from desloc.errors import ConfigError, RunDirError
from desloc.records import RunDir, writing
from desloc.timing import TimeConfig, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli_helpers import TINY, error_line


class Accepted(Exception):
    """The heavy part of a subcommand was reached: its input was accepted."""


@pytest.fixture
def stubbed(tmp_path, cache, monkeypatch):
    """Every subcommand's work replaced by :class:`Accepted`; an empty data cache (no data is read)."""
    def accept(*a, **k):
        raise Accepted

    for module, name in ((desloc.train, "train"), (desloc.compare, "run_compare"), (desloc.toy, "run_toy"),
                         (desloc.ft, "lighthouse_main")):
        monkeypatch.setattr(module, name, accept)
    return tmp_path


def _numeric_flags() -> list[tuple[str, str, bool]]:
    """(subcommand, flag, is_real) for every numeric flag of every subcommand but sample (tested in
    test_cli_errors.py), read from the parser."""
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    out = []
    for name in ("train", "compare", "plan", "wallclock", "toy", "ft-lighthouse"):
        for action in subs[name]._actions:
            if action.option_strings and action.type in cli._REAL_TYPES + cli._INT_TYPES:
                out.append((name, max(action.option_strings, key=len), action.type in cli._REAL_TYPES))
    return out


FLAGS = _numeric_flags()
_FIELDS = {names[0]: path[-1] for names, _, path in cli._TRAIN_FLAGS}


def _names(flag: str) -> set[str]:
    """How an error may name ``flag``: the flag, or the configuration field it sets (config.json's name,
    which TrainConfig's messages use, e.g. period_x for --kx, step_time_s for --step-time)."""
    return {flag, flag.lstrip("-").replace("-", "_"), _FIELDS.get(flag, flag)}
BASE = {"train": ["train", "--out", "{out}"], "compare": ["compare", "--out", "{out}"],
        "toy": ["toy", "--out", "{out}"], "plan": ["plan"], "wallclock": ["wallclock"],
        "ft-lighthouse": ["ft-lighthouse"]}
# values that are in range for a flag (so not refused); every other sweep value must be
IN_RANGE = {"0": {"--weight-decay", "--beta1", "--beta2", "--param-delay", "--state-delay", "--fragment-alpha",
                  "--warmup", "--min-lr-ratio", "--seed",
                  "--step-time", "--sigma", "--heterogeneity", "--latency-ms", "--gossip-seed", "--mt-betas"},
            "-1": set()}


def test_the_sweep_sees_every_subcommand():
    assert {c for c, _, _ in FLAGS} == {"train", "compare", "plan", "wallclock", "toy", "ft-lighthouse"}
    assert len(FLAGS) > 100


@pytest.mark.parametrize("command,flag,real", FLAGS, ids=[f"{c} {f}" for c, f, _ in FLAGS])
def test_every_numeric_flag_refuses_out_of_range_values(command, flag, real, stubbed, capsys):
    """nan, +-inf, 1e400 (overflows to inf), the subnormal 5e-324, 0 and -1 where out of range, and an
    integer beyond 64 bits: exit 2 with one ``desloc: error:`` line naming the flag, before any data."""
    base = [a.format(out=stubbed / "out") for a in BASE[command]]
    values = ["nan", "inf", "-inf", "1e400", "5e-324"] if real else [str(10**20), "nan"]
    values += [v for v in ("0", "-1") if flag not in IN_RANGE[v]]
    if command == "compare" and flag == "--seed":
        values.append("3")  # compare runs --seeds: --seed is refused whatever its value
    for value in values:
        try:
            line = error_line(capsys, [*base, f"{flag}={value}"])
        except Accepted:
            pytest.fail(f"{command} {flag}={value} was accepted")
        assert any(name in line for name in _names(flag)), (value, line)
    assert not (stubbed / "cache").exists()


# ------------------------------------------------------------------- the time model's edge values
def test_a_rate_that_overflows_is_not_an_infinite_link(stubbed, capsys):
    line = error_line(capsys, ["train", *TINY, "--network", "1e400gbit", "--out", str(stubbed / "o")])
    assert "--network 1e400gbit" in line and "finite" in line and "--network free" in line
    for bad in ("1e400gbit", "0bit", "0.5bit", "20mbit:1e400s"):
        with pytest.raises(ConfigError, match="--network"):
            TimeConfig(network=bad)
    assert profile("free").bandwidth_bps == math.inf  # the free network is still infinite, by name


@pytest.mark.parametrize("argv,fragment", [
    (["plan", "--bandwidth-gbps", "5e-324"], "--bandwidth-gbps"),  # was OverflowError
    (["plan", "--bandwidth-gbps", "1e-300"], "--bandwidth-gbps"),
    (["wallclock", "--bandwidth-gbps", "1e-300"], "--bandwidth-gbps"),  # was a table of inf/nan
    (["plan", "--target-overhead", "5e-324"], "--target-overhead"),  # was OverflowError
    (["plan", "--peak-tflops", "1e300"], "compute time per step is 0"),  # was ZeroDivisionError
    (["plan", "--bytes-per-param", "1e300"], "is inf"),  # was OverflowError
    (["wallclock", "--latency-ms", "1e308", "--bandwidth-gbps", "10", "--json"], "--latency-ms"),  # not JSON compliant
    (["wallclock", "--models", "1e300", "--steps", str(10**18), "--json"], "rows[0].total_time_s is inf"),
    (["wallclock", "--workers", str(10**12)], "--workers"),  # was OverflowError / hours of work
])
def test_time_model_edge_values_are_one_line(argv, fragment, capsys):
    assert fragment in error_line(capsys, argv)


def test_a_one_parameter_model_is_modeled(capsys):
    """``--models 1``: the sensitivity table halved the model to 0 parameters (ZeroDivisionError)."""
    assert main(["wallclock", "--models", "1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert record["assumptions"]["models"] == {"1": 1}
    assert all(math.isfinite(r["speedup_if_halved"]) for r in record["sensitivity"]["rows"])


def test_toy_json_is_strict_when_a_method_diverges(tmp_path, capsys):
    """lr 1e200 sends the iterates to inf/NaN: --json printed NaN (not JSON); toy.json too."""
    out = tmp_path / "toy"
    assert main(["toy", "--workers", "2", "--steps", "3", "--lr", "1e200", "--methods", "ddp", "--json",
                 "--out", str(out)]) == 0
    strict = {"parse_constant": lambda c: pytest.fail(f"non-strict JSON: {c}")}
    printed = json.loads(capsys.readouterr().out, **strict)
    assert printed["methods"]["ddp"]["final_distance"] is None  # NaN: the trajectory is not finite
    assert json.loads((out / "toy.json").read_text(), **strict)["methods"]["ddp"]["min_distance"] is None


# ----------------------------------------------------------------------------- write failures
def test_writing_names_the_file(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    with pytest.raises(OSError) as err, writing(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # e.g. write(2) on a full disk: no filename
    assert err.value.filename == str(target) and err.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as err, writing(target):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert err.value.errno == errno.EIO and "file write failed" in err.value.strerror
    monkeypatch.setattr(desloc.records.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(OSError) as err, writing(target):
        raise RuntimeError("basic_ios::clear: iostream error")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    with pytest.raises(desloc.errors.DivergenceError), writing(target):  # not a write failure
        raise desloc.errors.DivergenceError("loss is nan", 3)


def _to_dev_full(monkeypatch) -> None:
    """torch.save really fails: its serializer writes to /dev/full (ENOSPC from the kernel) and raises
    its own RuntimeError, as on a full disk."""
    real = torch.save
    monkeypatch.setattr(desloc.records.torch, "save", lambda obj, f, *a, **k: real(obj, "/dev/full"))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("disk_full", [True, False])
def test_a_checkpoint_write_that_fails_is_one_line(disk_full, tmp_path, token_cache, capsys, monkeypatch):
    _to_dev_full(monkeypatch)
    if disk_full:
        monkeypatch.setattr(desloc.records.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    out = tmp_path / "run"
    line = error_line(capsys, ["train", *TINY, "--out", str(out)])
    ckpt = str(RunDir(out).checkpoint_file(2, 0))
    if disk_full:
        assert line.startswith(f"desloc: error: no space left on device while writing {ckpt}") and "--resume" in line
    else:
        assert line.startswith(f"desloc: error: cannot write {ckpt}: torch could not write it (")
    assert not list(out.rglob("*.tmp")) and not (out / "checkpoints" / "latest.json").exists()


def test_a_plot_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    def fail(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    out = tmp_path / "toy"
    line = error_line(capsys, ["toy", "--workers", "2", "--steps", "2", "--methods", "ddp", "--out", str(out)])
    assert f"no space left on device while writing {out / 'toy.png'}" in line
    assert (out / "toy.json").exists() and not list(out.glob(".*.tmp"))


# ----------------------------------------------------------------------------- records read back
def test_compare_recomputes_a_run_whose_summary_is_truncated(tmp_path, token_cache, capsys):
    argv = ["compare", *TINY, "--methods", "ddp", "--out", str(tmp_path)]
    assert main(argv) == 0
    summary = tmp_path / "ddp-s0" / "summary.json"
    good = json.loads(summary.read_text())
    summary.write_bytes(summary.read_bytes()[:100])  # a truncated summary of a finished run
    capsys.readouterr()
    assert main(argv) == 0  # was: TypeError in statistics.fmean (the resume wrote final_val_loss null)
    err = capsys.readouterr().err
    assert f"desloc: warning: {summary} is damaged" in err and "recomputing the run" in err
    again = json.loads(summary.read_text())
    assert again["final_val_loss"] == good["final_val_loss"]  # deterministic: the same run
    assert json.loads((tmp_path / "compare.json").read_text())["runs"]["ddp"][0]["final_val_loss"] == \
        good["final_val_loss"]


@pytest.mark.parametrize("damage", ["truncated", "no-loss", "a list"])
def test_resume_of_a_finished_run_with_a_bad_summary_is_refused(damage, tmp_path, token_cache, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    f = out / "summary.json"
    good = json.loads(f.read_text())
    text = {"truncated": f.read_text()[:100], "no-loss": json.dumps({**good, "final_val_loss": None}),
            "a list": "[1, 2]"}[damage]
    f.write_text(text)
    capsys.readouterr()
    line = error_line(capsys, ["train", "--out", str(out), "--resume"])  # was: exit 0, final_val_loss null
    assert str(f) in line and "--overwrite" in line
    assert f.read_text() == text  # nothing was changed


@pytest.mark.parametrize("write,fragment", [
    (lambda d: (d / "config.json").write_text("[1, 2]"), "holds a JSON list"),
    (lambda d: (d / "metrics.jsonl").write_text('{"loss": 1}\n{"step": 2}\n'), "line 1 is not a metrics row"),
])
def test_bad_records_are_refused_naming_the_file(write, fragment, tmp_path):
    write(tmp_path)
    with pytest.raises(RunDirError, match=fragment):
        RunDir(tmp_path).read_config() if "config" in fragment or "list" in fragment else RunDir(tmp_path).read_metrics()


@pytest.mark.parametrize("latest", ['{"step": 1e400}', '{"step": -2}', '{"step": true}', '[2]', '{"step": "2"}'])
def test_a_malformed_latest_json_falls_back_to_scanning(latest, tmp_path, capsys):
    run = RunDir(tmp_path)
    run.save_checkpoint(2, 0, {"step": 2})
    (run.ckpt_root / "latest.json").write_text(latest)  # 1e400 was an OverflowError
    assert run.latest_step() is None and run.resume_step([0]) == 2
    assert "latest.json is malformed" in capsys.readouterr().err


@pytest.mark.parametrize("meta", ['{"sha256": "ab", "bytes": 1e400}', '{"sha256": 3, "bytes": 10}', '[]'])
def test_a_malformed_checksum_file_skips_the_checkpoint(meta, tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint(2, 0, {"step": 2})
    run.checkpoint_file(2, 0).with_suffix(".sha256").write_text(meta)  # 1e400 was an OverflowError
    assert run.verify_checkpoint(2, [0]) == "rank0.sha256 is malformed"


def test_a_checkpoint_of_another_step_is_refused(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint(4, 0, {"step": 2})  # e.g. a directory renamed by hand
    with pytest.raises(RunDirError, match=r"rank0.pt is not the checkpoint of step 4 \(it holds 2\)"):
        run.load_checkpoint(0, 4)
