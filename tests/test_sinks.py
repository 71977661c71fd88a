"""--tensorboard and --wandb (desloc.sinks): the same rows as metrics.jsonl, read back.

* TensorBoard: the event files of a tiny simulator run, read with TensorBoard's own
  ``EventAccumulator``, hold exactly one scalar per numeric field of every metrics row (bytes per
  state as ``bytes/<state>``), equal as float32, at the row's step, plus the config as text; after a
  crash and ``--resume`` the events logged after the checkpoint are purged and the recomputed rows
  take their place (still exactly metrics.jsonl); ``desloc compare`` writes one per run.
* W&B (skipped when wandb is not installed): without credentials the run is logged offline under
  ``RUN/wandb`` with the same scalars, and ``--resume`` reuses the stored run id.
* Without the package, either flag is refused in one line naming ``pip install ...``, before any work.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from _cli_helpers import TINY, error_line
from desloc.cli import main
from desloc.records import RunDir
from desloc.sinks import scalars


def expected_scalars(rows: list[dict]) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from metrics.jsonl rows: every numeric field but ``step``, nested dicts
    joined with ``/`` and ``bytes_by_state`` as ``bytes``; nulls (no evaluation at that step) absent."""
    out: dict[str, dict[int, float]] = {}

    def add(tag, value, step):
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{tag}/{k}", v, step)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.setdefault(tag, {})[step] = float(value)

    for row in rows:
        for key, value in row.items():
            if key != "step":
                add("bytes" if key == "bytes_by_state" else key, value, row["step"])
    return out


def tensorboard_scalars(log_dir: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    """{tag: {step: value}} as TensorBoard reads ``log_dir`` (a step logged twice fails), and the
    tags of its tensors (text)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out, acc.Tags()["tensors"]


def assert_same_as_metrics(run: Path) -> None:
    rows = RunDir(run).read_metrics()
    want = expected_scalars(rows)
    got, tensors = tensorboard_scalars(run / "tensorboard")
    assert sorted(got) == sorted(want)
    for tag, by_step in want.items():
        assert sorted(got[tag]) == sorted(by_step), tag
        for step, value in by_step.items():
            assert np.float32(got[tag][step]) == np.float32(value), (tag, step, got[tag][step], value)
    assert "config/text_summary" in tensors


def test_rows_become_scalars():
    row = {"step": 4, "train_loss": 2.5, "val_loss": None, "lr": 1e-3, "workers": 2, "bytes_sent": 10,
           "bytes_by_state": {"params": 6, "exp_avg": 4}, "modeled_time_s": 0.5, "flag": True, "nan": math.nan,
           "state_dynamics": {"params": {"rel_change": None, "spread": 0.1}}}
    assert scalars(row) == {"train_loss": 2.5, "lr": 1e-3, "workers": 2.0, "bytes_sent": 10.0, "bytes/params": 6.0,
                            "bytes/exp_avg": 4.0, "modeled_time_s": 0.5, "state_dynamics/params/spread": 0.1}


def test_tensorboard_holds_every_metrics_row(tmp_path, token_cache, no_plots):
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package (pip install tensorboard)")
    out = tmp_path / "run"
    assert main(["train", *TINY, "--state-dynamics", "--tensorboard", "--out", str(out)]) == 0
    assert_same_as_metrics(out)
    got, _ = tensorboard_scalars(out / "tensorboard")
    for tag in ("train_loss", "val_loss", "lr", "grad_norm", "param_norm", "bytes_sent", "bytes/params", "workers",
                "modeled_time_s", "state_dynamics/params/norm"):
        assert tag in got, tag
    assert sorted(got["train_loss"]) == [2, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text) == json.loads((out / "config.json").read_text())  # the resolved config, as text
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")


def test_tensorboard_continues_after_a_crash(tmp_path, token_cache, no_plots, monkeypatch):
    """A crash after step 4 was logged but before its checkpoint: --resume (from step 2) purges the
    logged step 4 and logs the recomputed one; TensorBoard then equals metrics.jsonl again."""
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package (pip install tensorboard)")
    import desloc.loop as loop

    out = tmp_path / "run"
    args = ["train", *TINY, "--steps", "6", "--ckpt-every", "4", "--tensorboard", "--out", str(out)]
    real = loop.checkpoint

    def crash_at_6(s, step, elapsed):
        if step == 6:
            raise RuntimeError("simulated crash")
        real(s, step, elapsed)

    monkeypatch.setattr(loop, "checkpoint", crash_at_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    monkeypatch.setattr(loop, "checkpoint", real)
    got, _ = tensorboard_scalars(out / "tensorboard")
    assert sorted(got["train_loss"]) == [2, 4, 6]  # closed after the crash: nothing lost
    crashed = got["elapsed_s"]
    assert main(["train", "--resume", "--out", str(out)]) == 0  # the saved config keeps --tensorboard
    assert_same_as_metrics(out)
    got, _ = tensorboard_scalars(out / "tensorboard")
    assert got["elapsed_s"][4] == crashed[4] and got["elapsed_s"][6] != crashed[6]  # step 6 is the recomputed one


def test_compare_writes_tensorboard_per_run(tmp_path, token_cache, no_plots, monkeypatch):
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package (pip install tensorboard)")
    monkeypatch.setattr("desloc.compare.plot_compare", lambda *a, **k: None)
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--methods", "ddp,desloc", "--tensorboard", "--out", str(out)]) == 0
    for method in ("ddp", "desloc"):
        assert_same_as_metrics(out / f"{method}-s0")


@pytest.mark.parametrize("flag, module, install", [
    ("--tensorboard", "torch.utils.tensorboard", "pip install tensorboard"), ("--wandb", "wandb", "pip install wandb")])
def test_missing_package_is_one_line_before_any_work(flag, module, install, tmp_path, capsys, monkeypatch, cache):
    monkeypatch.setitem(sys.modules, module, None)  # import of it fails as if it were not installed
    out = tmp_path / "run"
    line = error_line(capsys, ["train", *TINY, flag, "--out", str(out)])
    assert flag in line and install in line, line
    assert not out.exists()  # refused before the run directory was made
    assert not cache.exists() or not any(cache.iterdir())  # nor any data read


def test_wandb_offline_without_credentials(tmp_path, token_cache, no_plots, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="--wandb needs the optional wandb package "
                                "(pip install 'desloc[wandb]' to run this test)")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B settings of this machine
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb-config"))
    logged: list[dict] = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, *args, **kwargs):
        logged.append(dict(data))
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--stop-after", "2", "--wandb", "--out", str(out)]) == 0
    run_id = (out / "wandb" / "desloc-run-id").read_text().strip()
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert (out / "wandb" / "desloc-run-id").read_text().strip() == run_id
    offline = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2, list((out / "wandb").iterdir())  # one per process, the same run id
    data = b"".join(f.read_bytes() for d in offline for f in d.glob("*.wandb"))
    for tag in (b"train_loss", b"bytes/params", b"modeled_time_s"):
        assert tag in data, tag

    rows = RunDir(out).read_metrics()
    assert [entry["step"] for entry in logged] == [row["step"] for row in rows]
    for entry, row in zip(logged, rows):
        assert entry == {"step": row["step"], **scalars(row)}
        assert {k: v for k, v in entry.items() if k != "step"} == {
            tag: by_step[row["step"]] for tag, by_step in expected_scalars([row]).items()}
