"""`desloc train` end to end: records, both engines, resume, crash-safe checkpoints, bad input."""

import json
from pathlib import Path

import pytest
import torch

from desloc.errors import CheckpointMismatchError
from desloc.records import RunDir

from _runs import assert_same, desloc, final_state, stop_and_resume  # noqa: E402
from desloc.train import TrainConfig, train

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

SMALL = ["--workers", "2", "--steps", "12", "--batch-size", "2", "--seq-len", "32", "--kx", "4",
         "--eval-every", "6", "--eval-batches", "2", "--log-every", "2", "--ckpt-every", "5",
         "--tokenizer", "byte", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2",
         "--set", "block_size=32"]
METRIC_FIELDS = {"step", "train_loss", "val_loss", "lr", "grad_norm", "param_norm", "tokens",
                 "bytes_sent", "bytes_by_state", "elapsed_s"}
SUMMARY_FIELDS = {"method", "workers", "steps", "tokens", "final_val_loss", "final_val_ppl", "bytes_sent",
                  "bytes_by_state", "ddp_equivalent_bytes", "ratio_vs_ddp", "wall_time_s"}


def rows(run):
    return [r for r in RunDir(run).read_metrics()]


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = desloc(["train", *SMALL, "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_records_have_every_field(sim_run):
    out, proc = sim_run
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["tokens"] == 12 * 2 * 2 * 32
    assert summary["final_val_ppl"] == pytest.approx(2.718281828 ** summary["final_val_loss"])
    assert summary["bytes_sent"] == sum(summary["bytes_by_state"].values()) > 0
    assert summary["ratio_vs_ddp"] == pytest.approx(summary["ddp_equivalent_bytes"] / summary["bytes_sent"])
    metrics = rows(out)
    assert [r["step"] for r in metrics] == [2, 4, 6, 8, 10, 12]
    assert all(METRIC_FIELDS <= set(r) for r in metrics)
    assert [r["step"] for r in metrics if r["val_loss"] is not None] == [6, 12]
    assert metrics[-1]["val_loss"] == summary["final_val_loss"]
    assert metrics[0]["train_loss"] > metrics[-1]["train_loss"]  # it learns
    config = json.loads((out / "config.json").read_text())
    assert {k: config["method"][k] for k in ("name", "period_x", "period_u", "period_v", "clip_rho", "outer")} == \
        {"name": "desloc", "period_x": 4, "period_u": 12, "period_v": 24, "clip_rho": None, "outer": None}
    for png in ("loss.png", "loss_vs_bytes.png"):
        assert (out / png).stat().st_size > 1000
    assert json.loads(proc.stdout)["method"] == "desloc"


def test_gloo_processes_match_simulator_bitwise(sim_run, tmp_path, env):
    """Same thread count (1) on both sides: the same numbers, bit for bit."""
    out = tmp_path / "gloo"
    proc = desloc(["train", *SMALL, "--out", str(out)], env, torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sim, real = rows(sim_run[0]), rows(out)
    for a, b in zip(sim, real, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
        assert a["bytes_by_state"] == b["bytes_by_state"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert_same(final_state(sim_run[0]), final_state(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "gloo"
    # No lockstep between syncs: the loop itself communicates only at logging steps (one float64
    # all-reduce of loss, grad norm, active share, param norm, [val loss,] non-finite and stop
    # flags: 6 or 7 values) and at checkpoints (one flag). SMALL logs at 2, 4, .., 12 (evals at 6,
    # 12) and checkpoints at 5, 10, 12: 4 * 48 + 2 * 56 + 3 * 8 = 328 bytes. Every step: > 376.
    ledger = RunDir(out).load_checkpoint(0)["optimizer"]["desloc"]["ledger"]
    assert ledger["observer_bytes_by_tag"] == {"metrics": 328}


def test_resume_mid_period_is_bitwise(sim_run, tmp_path, env):
    out = tmp_path / "resumed"
    stop_and_resume(SMALL, env, out, stop_after=7)  # 7: mid-period (K_x=4)
    assert_same(final_state(sim_run[0]), final_state(out))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]
    assert strip(rows(out)) == strip(rows(sim_run[0]))


def test_resume_refuses_changed_settings(sim_run, env):
    proc = desloc(["train", "--out", str(sim_run[0]), "--resume", "--method", "ddp"], env)
    assert proc.returncode == 2 and "--resume keeps the run's settings" in proc.stderr


def _cfg(**kw):
    from desloc.algorithms import MethodConfig

    base = dict(workers=2, steps=10, batch_size=2, seq_len=32, eval_every=5, eval_batches=1, log_every=5,
                ckpt_every=4, model_overrides=dict(n_layer=1, n_embd=32, n_head=2, block_size=32),
                method=MethodConfig("desloc", period_x=4))  # K_x <= steps (TrainConfig refuses a run never averaged)
    base.update(kw)
    from desloc.data import DataConfig

    return TrainConfig.from_dict({**TrainConfig(**{k: v for k, v in base.items()}).to_dict(),
                                  "data": DataConfig(tokenizer="byte").__dict__})


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, token_cache, monkeypatch):
    cfg = _cfg()
    reference = train(cfg, tmp_path / "straight", progress=False)
    import desloc.records as records

    real_save, calls = torch.save, {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-8 checkpoint: write part of it, then "crash"
            Path(f).write_bytes(b"partial")
            raise KeyboardInterrupt("killed mid-write")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(records.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "crashed", progress=False)
    monkeypatch.setattr(records.torch, "save", real_save)
    run = RunDir(tmp_path / "crashed")
    assert run.latest_step() == 4 and not list(run.ckpt_root.rglob("*.tmp"))
    run.load_checkpoint(0)  # loadable
    resumed = train(cfg, run.path, resume=True, progress=False)
    assert resumed["final_val_loss"] == reference["final_val_loss"]
    assert_same(final_state(tmp_path / "straight"), final_state(run.path))


def test_checkpoint_from_other_config_is_rejected(tmp_path, token_cache):
    train(_cfg(steps=4), tmp_path / "a", progress=False)
    with pytest.raises(CheckpointMismatchError, match="different settings"):
        train(_cfg(steps=4, seed=1), tmp_path / "a", resume=True, progress=False)


@pytest.mark.parametrize("args,fragment", [
    (["--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--model", "huge"], "unknown model preset 'huge'"),
    (["--set", "n_layers=3"], "unknown model field"),
    (["--method", "fedavg"], "unknown method 'fedavg'"),
    (["--kx", "0"], "period_x"),
    (["--workers", "0"], "workers"),
    (["--seq-len", "4096"], "seq_len"),
])
def test_bad_input_is_named(args, fragment, env, tmp_path):
    proc = desloc(["train", *args, "--steps", "2", "--out", str(tmp_path / "x")], env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr


def test_resume_without_run_dir_is_named(tmp_path, env):
    proc = desloc(["train", "--resume", "--out", str(tmp_path / "nothing")], env, timeout=60)
    assert proc.returncode == 2 and "config.json" in proc.stderr


def test_sample_generates_text(sim_run, env):
    proc = desloc(["sample", str(sim_run[0]), "--prompt", "In the", "--tokens", "20"], env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("In the") and len(proc.stdout) > len("In the") + 5


def test_compare_writes_table_json_and_plot(tmp_path, env):
    small = [a for a in SMALL if a not in ()]
    small[small.index("--steps") + 1] = "8"
    proc = desloc(["compare", *small, "--methods", "ddp,desloc", "--seeds", "0,1", "--out", str(tmp_path)], env)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "compare.json").read_text())
    assert set(record["methods"]) == {"ddp", "desloc"} and record["seeds"] == [0, 1]
    assert len(record["runs"]["desloc"]) == 2
    assert record["methods"]["desloc"]["ratio_vs_ddp"] > 1 and record["methods"]["ddp"]["ratio_vs_ddp"] == 1
    assert "| desloc |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert "| ddp |" in proc.stdout


def test_bf16_autocast_trains(tmp_path, token_cache):
    import math

    summary = train(_cfg(steps=4, bf16=True), tmp_path / "bf16", progress=False)
    assert math.isfinite(summary["final_val_loss"])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["bf16"] is True


def test_delayed_and_blocking_syncs_from_the_cli_on_both_engines(sim_run, tmp_path, env):
    """--param-delay 2 (K_x 4): the simulator and 2 gloo processes agree bit for bit, a stop with
    the average in flight (after step 5: launched at 4, applied at 6) resumes bitwise, and the
    delay changed the result. --no-overlap under torchrun equals the default run bit for bit."""
    delayed = tmp_path / "delayed"
    proc = desloc(["train", *SMALL, "--param-delay", "2", "--out", str(delayed)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = tmp_path / "delayed_gloo"
    proc = desloc(["train", *SMALL, "--param-delay", "2", "--out", str(real)], env, torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(final_state(delayed), final_state(real))
    resumed = tmp_path / "delayed_resumed"
    stop_and_resume([*SMALL, "--param-delay", "2"], env, resumed, stop_after=5)
    assert_same(final_state(delayed), final_state(resumed))
    (a, _), (b, _) = final_state(delayed), final_state(sim_run[0])
    assert any(not torch.equal(a[0][k], b[0][k]) for k in a[0])
    blocking = tmp_path / "blocking_gloo"
    proc = desloc(["train", *SMALL, "--no-overlap", "--out", str(blocking)], env, torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(final_state(sim_run[0]), final_state(blocking))
