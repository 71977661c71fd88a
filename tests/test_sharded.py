"""Issue 12: a worker is a sharded FSDP2 replica group (``desloc train --shard N``).

* 4 gloo processes as 2 replica groups x 2 shards vs 2 unsharded processes, same method and the
  same data per worker (tests/_sharded_workload.py): final parameters and optimizer states
  allclose when each shard computes on half the group's batch (FSDP's gradient average changes
  the floating-point order), *bitwise equal* when every shard computes on the whole batch (the
  average of equal gradients is exact); the ledger per replica group equals the unsharded one and
  the processes' own ledgers add up to it.
* The CLI: ``torchrun --nproc_per_node 4 -m desloc train --shard 2`` with evaluations and
  checkpoints mid-run matches the unsharded run's metrics, ``summary.json`` says M = 2, and a run
  stopped mid-period and resumed from its DCP checkpoints is bitwise the uninterrupted one.
* Bad meshes and unsupported combinations are refused with errors that say what to do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _cli_helpers import error_line
from _dist_workload import spawn_ranks
from _runs import cli_env

import _sharded_workload as work

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

COMBOS = [("ddp", "adamw"), ("local-adam", "adamw"), ("desloc", "adamw"), ("diloco", "adamw"),
          ("keep-states", "adamw"), ("reset-states", "adamw"), ("desloc+nesterov", "adamw"),
          ("mtdao", "mtdao"), ("local-adam", "adopt"), ("desloc", "sgdm"), ("gasloc@ring", "adamw")]
KEYS = [f"{m}/{i}" for m, i in COMBOS]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    return spawn_ranks(4, {"combos": COMBOS, "whole": True}, tmp_path_factory.mktemp("sharded"),
                       timeout_s=300, target=work.rank_main)


def _pairs(runs, key: str, variant: str):
    """(sharded snapshot of worker r from its shard-0 process, unsharded snapshot of worker r)."""
    for r in (0, 1):
        yield runs[2 * r][f"{key}/{variant}"], runs[r][f"{key}/unsharded"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("key", KEYS)
def test_sharded_whole_batch_is_bitwise_unsharded(sharded_runs, key):
    for sharded, plain in _pairs(sharded_runs, key, "sharded-whole"):
        assert sharded["global_step"] == plain["global_step"] == work.STEPS
        for part in ("params", "states", "scalars"):
            assert sharded[part].keys() == plain[part].keys()
            for name in plain[part]:
                assert torch.equal(sharded[part][name], plain[part][name]), (key, part, name)


@pytest.mark.parametrize("key", KEYS)
def test_sharded_split_batch_matches_unsharded(sharded_runs, key):
    for sharded, plain in _pairs(sharded_runs, key, "sharded"):
        # lr 0.01 per step; FSDP's row split changes the gradient's rounding, which Adam's
        # normalisation amplifies where v is tiny (measured: <= 2.6e-5 in parameters)
        assert _max_diff(sharded["params"], plain["params"]) < 2e-4, key
        assert _max_diff(sharded["states"], plain["states"]) < 2e-5, key
        assert sharded["scalars"].keys() == plain["scalars"].keys()
        assert all(torch.equal(sharded["scalars"][k], plain["scalars"][k]) for k in plain["scalars"])
    if not key.startswith("ddp"):  # the run ends mid-period: the two workers differ, each checked
        a, b = sharded_runs[0][f"{key}/sharded"]["params"], sharded_runs[2][f"{key}/sharded"]["params"]
        assert _max_diff(a, b) > 1e-3


@pytest.mark.parametrize("key", KEYS)
def test_ledger_per_replica_group_equals_unsharded(sharded_runs, key):
    plain = sharded_runs[0][f"{key}/unsharded"]["ledger"]
    for g in range(4):
        snap = sharded_runs[g][f"{key}/sharded"]
        assert snap["ledger"] == plain  # what the replica group sends: the unsharded worker's bytes
    for r in (0, 1):  # what each process sends: its shards; the group's two add up to the group's
        shards = [sharded_runs[2 * r + s][f"{key}/sharded"]["process_ledger"] for s in (0, 1)]
        for tag, nbytes in plain["bytes_by_tag"].items():
            assert sum(p["bytes_by_tag"][tag] for p in shards) == nbytes
            assert all(0 < p["bytes_by_tag"][tag] < nbytes for p in shards)
        assert all(p["syncs_by_tag"] == plain["syncs_by_tag"] for p in shards)


# ------------------------------------------------------------------------------------------ CLI
SRC = Path(__file__).resolve().parents[1] / "src"
COMMON = ["--model", "tiny", "--set", "n_layer=2", "--set", "n_embd=64", "--set", "n_head=2", "--seq-len", "32",
          "--vocab-size", "300", "--steps", "12", "--kx", "2", "--ku", "3", "--kv", "5", "--batch-size", "4",
          "--log-every", "2", "--eval-every", "6", "--eval-batches", "2", "--ckpt-every", "4", "--lr", "3e-3"]


def _torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "desloc", "train", *args]
    return subprocess.run(cmd, env=cli_env(PYTHONPATH=str(SRC)), capture_output=True, text=True, timeout=timeout)


def _why(proc: subprocess.CompletedProcess) -> str:
    """The lines of a failed launch that say why (not the progress lines and warnings)."""
    keep = [line for line in proc.stderr.splitlines()
            if line.strip() and not line.startswith("[desloc]") and "Warning" not in line]
    return "\n".join(keep[-60:])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_cli")
    runs = {"sharded": root / "sharded", "plain": root / "plain", "resumed": root / "resumed"}
    steps = [(4, ["--shard", "2", *COMMON, "--out", str(runs["sharded"])]),
             (2, [*COMMON, "--out", str(runs["plain"])]),
             (4, ["--shard", "2", *COMMON, "--stop-after", "7", "--out", str(runs["resumed"])]),  # mid-period
             (4, ["--out", str(runs["resumed"]), "--resume"])]
    for nproc, args in steps:
        proc = _torchrun(nproc, *args)
        assert proc.returncode == 0, _why(proc)
    return runs


def test_cli_shard_summary(cli_runs):
    summary = json.loads((cli_runs["sharded"] / "summary.json").read_text())
    plain = json.loads((cli_runs["plain"] / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["status"] == "complete"
    assert summary["shard"]["shards"] == 2 and summary["shard"]["processes"] == 4
    assert summary["bytes_by_state"] == plain["bytes_by_state"]
    assert summary["bytes_sent"] == plain["bytes_sent"]
    per_process = summary["shard"]["bytes_sent_per_process"]
    assert len(per_process) == 4 and per_process[0] + per_process[1] == summary["bytes_sent"]
    assert len(summary["peak_memory_per_process"]) == 4 and all(m > 0 for m in summary["peak_memory_per_process"])
    assert summary["params"] == plain["params"]
    assert len(plain["peak_memory_per_process"]) == 2 and all(m > 2**20 for m in plain["peak_memory_per_process"])
    assert plain["peak_memory_per_process"][0] == plain["peak_memory_bytes"]  # rank 0 wrote the summary
    assert "shard" not in plain


def test_cli_shard_matches_unsharded(cli_runs):
    sharded, plain = _metrics(cli_runs["sharded"]), _metrics(cli_runs["plain"])
    assert [r["step"] for r in sharded] == [r["step"] for r in plain]
    for a, b in zip(sharded, plain):  # evaluations at 6 and 12 (FSDP regathers for them) included
        for key in ("train_loss", "param_norm", "grad_norm", "val_loss"):
            if b[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
        assert a["bytes_by_state"] == b["bytes_by_state"]


def test_cli_shard_resume_is_bitwise(cli_runs):
    full, resumed = _metrics(cli_runs["sharded"]), _metrics(cli_runs["resumed"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(full) == strip(resumed)
    a = json.loads((cli_runs["sharded"] / "summary.json").read_text())
    b = json.loads((cli_runs["resumed"] / "summary.json").read_text())
    assert a["final_val_loss"] == b["final_val_loss"] and a["bytes_by_state"] == b["bytes_by_state"]
    assert a["shard"] == b["shard"]  # what each process sent survives the resume too
    # the final checkpoints hold the same bits (each replica group's DCP checkpoint, read offline)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    for r in (0, 1):
        tensors = []
        for run in (cli_runs["sharded"], cli_runs["resumed"]):
            out = run / f"replica{r}.pt"
            dcp_to_torch_save(run / "checkpoints" / "step-00000012" / f"replica{r}", out)
            tensors.append(torch.load(out))
        assert tensors[0].keys() == tensors[1].keys() and len(tensors[0]) > 10
        for k in tensors[0]:
            assert torch.equal(tensors[0][k], tensors[1][k]), k


def test_sample_from_a_sharded_run(cli_runs):
    """`desloc sample` gathers a replica group's DCP checkpoint into whole tensors, in one process."""
    from desloc.comm.dcp import load_sharded_offline
    from desloc.records import RunDir
    from desloc.sample import sample

    run, plain = RunDir(cli_runs["sharded"]), RunDir(cli_runs["plain"])
    skeleton = run.load_checkpoint(2, 12)  # shard 0 of worker 1
    weights = load_sharded_offline(skeleton, run.checkpoint_file(12, 2).parent / "replica1")["model"]["module"]
    reference = plain.load_checkpoint(1, 12)["model"]["module"]
    assert weights.keys() == reference.keys()
    for k in reference:
        assert weights[k].shape == reference[k].shape
        torch.testing.assert_close(weights[k], reference[k], rtol=1e-3, atol=1e-4)
    text = sample(cli_runs["sharded"], "And God said", tokens=8, worker=1)
    assert text.startswith("And God said") and len(text) > len("And God said")


# ------------------------------------------------------------------------------------ refusals
def test_shard_refused_on_the_simulator(tmp_path, capsys, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    line = error_line(capsys, ["train", "--shard", "2", "--steps", "20", "--out", str(tmp_path / "r")])
    assert "--shard 2" in line and "torchrun --nproc_per_node 8" in line
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_shard_must_divide_the_world(tmp_path):
    proc = _torchrun(3, "--shard", "2", "--steps", "20", "--out", str(tmp_path / "r"), timeout=120)
    assert proc.returncode != 0  # torchrun's own code: every rank exited 2, with the one-line error
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert "world size 3" in proc.stderr and "not divisible by 2" in proc.stderr
    # Every rank that reports says it in one line, with no desloc traceback. Not necessarily all 3: once one
    # rank has exited, torchrun's agent stops the others, and under load a slow rank is stopped before it
    # prints (seen in CI with 2 of 3).
    assert 1 <= proc.stderr.count("desloc: error: --shard 2") <= 3, proc.stderr[-3000:]
    assert "/desloc/" not in proc.stderr


@pytest.mark.parametrize("extra, needle", [
    (dict(shard=0), "--shard must be an integer >= 1"),
    (dict(shard=2, batch_size=5), "--batch-size 5"),
    (dict(shard=2, backend="sim"), "--backend sim"),
    (dict(shard=2, state_dynamics=True), "--state-dynamics"),
    (dict(shard=2, events="2:add=1"), "--events"),
])
def test_shard_config_errors(extra, needle):
    from desloc.errors import ConfigError
    from desloc.train import TrainConfig

    with pytest.raises(ConfigError, match="shard") as err:
        TrainConfig(steps=10, **extra)
    assert needle in str(err.value)


def test_shard_refuses_param_delay():
    from desloc.algorithms import MethodConfig
    from desloc.errors import ConfigError
    from desloc.train import TrainConfig

    with pytest.raises(ConfigError, match="--param-delay 1"):
        TrainConfig(steps=10, shard=2, method=MethodConfig("desloc", period_x=4, param_delay=1))
