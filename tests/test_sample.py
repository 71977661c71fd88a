"""`desloc sample` after ``--events`` changed the worker count: ``--worker`` is checked against the
workers in the checkpoint it reads (a run that grew has more, one that shrank fewer than
``--workers``), with one line naming the range."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from desloc.data import DataConfig
from desloc.errors import ConfigError
from desloc.records import RunDir
from desloc.sample import sample
from desloc.algorithms import MethodConfig
from desloc.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli_helpers import error_line  # noqa: E402

EVENTS = {"grew": (2, "3:add=1", 3), "shrank": (3, "3:drop=1", 2)}  # workers at the start, events, at the end

pytestmark = pytest.mark.usefixtures("token_cache", "no_plots")


def _run(tmp_path: Path, name: str) -> Path:
    """A 4-step simulator run whose ``--events`` are ``EVENTS[name]``."""
    workers, events, _ = EVENTS[name]
    cfg = TrainConfig(workers=workers, steps=4, method=MethodConfig("desloc", period_x=4), batch_size=2, seq_len=16,
                      eval_every=4, eval_batches=1,
                      log_every=2, ckpt_every=2, data=DataConfig(tokenizer="byte"), events=events,
                      model_overrides=dict(n_layer=1, n_embd=16, n_head=2, block_size=16))
    train(cfg, tmp_path / "run", progress=False)
    return tmp_path / "run"


@pytest.mark.parametrize("name", list(EVENTS))
def test_worker_is_checked_against_the_checkpoint(tmp_path, name, capsys):
    start, _, final = EVENTS[name]
    run = _run(tmp_path, name)
    stacked = RunDir(run).load_checkpoint(0)["model"]["stacked"]
    assert next(iter(stacked.values())).shape[0] == final
    for w in range(final):  # every worker of the final checkpoint (the grown run's last was refused)
        assert sample(run, "In the", tokens=4, worker=w).startswith("In the")
    with pytest.raises(ConfigError) as info:  # one past the last (the shrunk run's raised IndexError)
        sample(run, "In the", tokens=4, worker=final)
    assert str(info.value) == (f"--worker must be in [0, {final}): the checkpoint of step 4 in {run} holds "
                               f"{final} worker(s), --events changed them from {start}; got {final}")
    line = error_line(capsys, ["sample", str(run), "--worker", str(final), "--tokens", "4"])
    assert f"--worker must be in [0, {final})" in line
    with pytest.raises(ConfigError, match="--worker must be an integer >= 0, got -1"):
        sample(run, "In the", tokens=4, worker=-1)
