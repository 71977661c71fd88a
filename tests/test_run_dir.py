"""Runs never lose, mix or misreport results: --out / --resume / --overwrite, the run lock,
verified checkpoints, torn metrics, divergence, and Ctrl-C / SIGTERM.

Most cases call ``desloc.cli.main`` in this process (fast); signals and the lock's release on
SIGKILL need real subprocesses.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from desloc.cli import main
from desloc.records import RunDir, atomic_write_json, dumps

from _runs import cli_env

TINY = ["--workers", "2", "--steps", "8", "--batch-size", "2", "--seq-len", "16", "--kx", "2",
        "--eval-every", "4", "--eval-batches", "1", "--log-every", "1", "--ckpt-every", "2",
        "--tokenizer", "byte", "--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2",
        "--set", "block_size=16"]


pytestmark = pytest.mark.usefixtures("token_cache")


def run(*args):
    return main(["train", *TINY, *args])


def final_params(out):
    state = RunDir(out).load_checkpoint(0)["model"]["stacked"]
    return {k: v.clone() for k, v in state.items()}


def same_params(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def strip(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, token_cache_dir):
    """An uninterrupted 8-step run: the reference every resumed run must equal bit for bit."""
    os.environ["DESLOC_CACHE"] = str(token_cache_dir)
    torch.set_num_threads(1)  # module fixtures run before token_cache
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- --out
def test_non_empty_out_is_refused_without_resume_or_overwrite(straight, tmp_path, capsys):
    before = {p: p.read_bytes() for p in straight.rglob("*") if p.is_file()}
    assert run("--out", str(straight), "--lr", "0.01") == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in straight.rglob("*") if p.is_file()} == before  # nothing touched


def test_users_own_files_are_never_overwritten(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "own config"}')
    (mine / "notes.txt").write_text("keep me")
    assert run("--out", str(mine)) == 2
    assert run("--out", str(mine), "--overwrite") == 2  # holds files desloc did not write
    assert "notes.txt" in capsys.readouterr().err
    assert (mine / "config.json").read_text() == '{"my": "own config"}'


def test_overwrite_replaces_a_desloc_run(tmp_path):
    out = tmp_path / "run"
    assert run("--out", str(out), "--steps", "4") == 0
    assert run("--out", str(out), "--overwrite") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and RunDir(out).checkpoint_steps() == [6, 8]
    assert [r["step"] for r in RunDir(out).read_metrics()] == list(range(1, 9))


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert run("--out", str(f)) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err


# -------------------------------------------------------------------------- --resume
def test_resume_of_a_finished_run_changes_nothing(straight, capsys):
    before = {p: p.read_bytes() for p in straight.rglob("*") if p.is_file()}
    assert main(["train", "--out", str(straight), "--resume"]) == 0
    assert "is complete" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in straight.rglob("*") if p.is_file()} == before
    assert json.loads((straight / "summary.json").read_text())["final_val_loss"] is not None


def test_lost_latest_json_resumes_from_newest_checkpoint(straight, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--out", str(out), "--stop-after", "5") == 0  # checkpoints at 4 and 5
    (out / "checkpoints" / "latest.json").unlink()
    rows_before = RunDir(out).read_metrics()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "newest valid checkpoint" in capsys.readouterr().err
    rows = RunDir(out).read_metrics()
    assert strip(rows[:5]) == strip(rows_before[:5])  # progress kept, not wiped
    assert strip(rows) == strip(RunDir(straight).read_metrics())
    assert same_params(final_params(out), final_params(straight))


def test_resume_without_any_checkpoint_keeps_the_records(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--out", str(out), "--stop-after", "3") == 0
    import shutil

    shutil.rmtree(out / "checkpoints")
    metrics = (out / "metrics.jsonl").read_bytes()
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert "no valid checkpoint" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "no-checksum"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(damage, straight, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--out", str(out), "--stop-after", "6") == 0  # checkpoints at 4 and 6
    f = RunDir(out).checkpoint_file(6, 0)
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "garbage":  # 4 KB of garbage inside the file, size unchanged
        mid = len(data) // 2
        f.write_bytes(data[:mid] + os.urandom(4096) + data[mid + 4096:])
    else:
        f.with_suffix(".sha256").unlink()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "skipping the checkpoint of step 6" in err and "falling back to the checkpoint of step 4" in err
    assert same_params(final_params(out), final_params(straight))
    assert strip(RunDir(out).read_metrics()) == strip(RunDir(straight).read_metrics())


def test_checkpoints_load_with_weights_only(tmp_path):
    """A checkpoint holding arbitrary pickled objects is refused even with a matching checksum."""
    rd = RunDir(tmp_path)
    rd.save_checkpoint(1, 0, {"step": 1, "evil": Path("/")})  # not an allowed weights-only type
    rd.publish_checkpoint(1)
    from desloc.errors import RunDirError

    with pytest.raises(RunDirError, match="cannot load"):
        rd.load_checkpoint(0)


def test_torn_last_metrics_line_is_dropped(straight, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--out", str(out), "--stop-after", "4") == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_lo')  # the crash happened mid-append
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "torn last line" in capsys.readouterr().err
    assert strip(RunDir(out).read_metrics()) == strip(RunDir(straight).read_metrics())


# ---------------------------------------------------------------------------- lock
def test_second_writer_gets_the_holders_pid(tmp_path, capsys):
    out = tmp_path / "run"
    holder = RunDir(out)
    holder.lock()  # flock is per open file: a second open in this process conflicts too
    try:
        assert run("--out", str(out)) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "in use" in err
    finally:
        holder.unlock()
    assert run("--out", str(out)) == 0  # free again


def test_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "run"
    code = (f"from desloc.records import RunDir; import time; r = RunDir({str(out)!r}); r.lock(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        from desloc.errors import RunDirError

        with pytest.raises(RunDirError, match=f"pid {proc.pid}"):
            RunDir(out).lock()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    rd = RunDir(out)
    rd.lock()  # SIGKILL released it
    rd.unlock()


# ---------------------------------------------------------------------- divergence
def test_divergence_stops_with_the_step_and_never_checkpoints_nan(tmp_path, capsys):
    out = tmp_path / "run"
    code = run("--out", str(out), "--lr", "1e3", "--warmup", "0", "--ckpt-every", "1", "--steps", "30")
    err = capsys.readouterr().err
    assert code == 3, err
    assert "diverged at step" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["status"] == "diverged" and f"step {summary['diverged_at_step']}" in err
    rd = RunDir(out)
    for step in rd.checkpoint_steps():
        ck = rd.load_checkpoint(0, step)
        for t in list(ck["model"]["stacked"].values()):
            assert torch.isfinite(t).all(), f"non-finite checkpoint at step {step}"
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    assert main(["train", "--out", str(out), "--resume"]) == 2  # resuming would repeat it
    assert "diverged" in capsys.readouterr().err


def test_diverge_factor_stops_at_the_first_logged_loss_rise(tmp_path, capsys):
    """--diverge-factor F: diverged at the first logged step whose training loss exceeds F x the lowest
    logged before it (rule re-derived here from metrics.jsonl); a large F changes nothing."""
    out, factor = tmp_path / "rise", 1.02
    code = run("--out", str(out), "--diverge-factor", repr(factor), "--steps", "30")
    err = capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["train_loss"]) for r in rows]
    first = next((s for i, (s, x) in enumerate(losses) if i and x > factor * min(y for _, y in losses[:i])), None)
    assert first is not None, f"no logged rise above {factor} x in {losses}; pick a smaller factor"
    assert code == 3 and "--diverge-factor" in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == first == losses[-1][0]
    assert "exceeds --diverge-factor 1.02" in summary["reason"]

    base, loose = tmp_path / "base", tmp_path / "loose"
    assert run("--out", str(base)) == 0 and run("--out", str(loose), "--diverge-factor", "100") == 0
    read = lambda d: [{k: v for k, v in json.loads(x).items() if k in ("step", "train_loss", "val_loss")}
                      for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert read(base) == read(loose)


@pytest.mark.parametrize("bad", ["1.0", "0.5", "nan"])
def test_diverge_factor_must_exceed_one(tmp_path, capsys, bad):
    assert run("--out", str(tmp_path / "r"), "--diverge-factor", bad) == 2
    assert "diverge_factor" in capsys.readouterr().err


def test_records_are_strict_json(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -math.inf}})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5], "c": {"d": None}}
    assert dumps({"r": float("inf")}) == '{"r": null}'


def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {})
        RunDir(tmp_path).save_checkpoint(1, 0, {"step": 1})
        os.umask(0o077)
        atomic_write_json(tmp_path / "b.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert RunDir(tmp_path).checkpoint_file(1, 0).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------------- compare
def test_compare_never_reports_stale_runs(tmp_path, capsys):
    base = ["compare", *TINY, "--methods", "ddp", "--out", str(tmp_path)]
    base[base.index("--steps") + 1] = "4"
    assert main(base) == 0
    metrics = (tmp_path / "ddp-s0" / "metrics.jsonl").read_bytes()
    assert main(base) == 0  # identical request: the finished run is reused, not retrained
    assert (tmp_path / "ddp-s0" / "metrics.jsonl").read_bytes() == metrics
    longer = list(base)
    longer[longer.index("--steps") + 1] = "6"
    capsys.readouterr()
    assert main(longer) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "steps: 4 -> 6" in err
    assert json.loads((tmp_path / "compare.json").read_text())["runs"]["ddp"][0]["steps"] == 4
    assert main(longer + ["--overwrite"]) == 0
    record = json.loads((tmp_path / "compare.json").read_text())
    assert record["runs"]["ddp"][0]["steps"] == 6 and record["methods"]["ddp"]["tokens"] == 6 * 2 * 2 * 16


# ------------------------------------------------------------------------- signals
def _spawn(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "desloc", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_rows(out, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"finished before the signal: {proc.stderr.read()[-2000:]}")
        f = out / "metrics.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    pytest.fail("no progress")


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_checkpoints_and_resumes_bitwise(signum, code, tmp_path):
    env = cli_env()
    long = list(TINY)
    long[long.index("--steps") + 1] = "300"
    long[long.index("--ckpt-every") + 1] = "1000"
    long[long.index("--log-every") + 1] = "10"
    long[long.index("--eval-every") + 1] = "100"
    straight = tmp_path / "straight"
    assert main(["train", *long, "--out", str(straight)]) == 0
    out = tmp_path / "run"
    proc = _spawn([*long, "--out", str(out)], env)
    _wait_for_rows(out, 2, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "--resume" in err
    step = RunDir(out).latest_step()
    assert step is not None and 20 <= step < 300 and f"after step {step}" in err
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert same_params(final_params(out), final_params(straight))
    assert strip(RunDir(out).read_metrics()) == strip(RunDir(straight).read_metrics())


def test_ctrl_c_under_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    env = cli_env()
    long = list(TINY)
    long[long.index("--steps") + 1] = "400"
    long[long.index("--ckpt-every") + 1] = "1000"
    long[long.index("--log-every") + 1] = "10"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "desloc",
           "train", *long, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's Ctrl-C sees it
    _wait_for_rows(out, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    step = RunDir(out).latest_step()
    assert step is not None and 0 < step < 400, err[-3000:]
    assert RunDir(out).verify_checkpoint(step, [0, 1]) is None  # both ranks saved the same step
    assert err.count(f"stopped after step {step} of 400") == 1, err[-3000:]  # said once, by rank 0


def test_a_run_from_before_checksums_and_new_fields_still_resumes(straight, tmp_path, capsys):
    """A run directory written by the previous desloc (no .sha256 files, latest.json without
    "ranks", config.json without the fields added since) resumes, with a warning."""
    out = tmp_path / "old"
    assert run("--out", str(out), "--stop-after", "4") == 0
    for f in (out / "checkpoints").rglob("*.sha256"):
        f.unlink()
    (out / "checkpoints" / "latest.json").write_text('{"step": 4}')
    config = json.loads((out / "config.json").read_text())
    del config["time"], config["state_dynamics"]
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "older desloc without checksums" in capsys.readouterr().err
    assert same_params(final_params(out), final_params(straight))
