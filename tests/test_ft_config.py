"""``desloc train --ft`` / ``desloc ft-lighthouse``: every bad setting is refused up front, with the
field, the value and the fix, before any data is read, any run directory is made, or torchft is
needed; a restarted worker may reach a Lighthouse that moved (its connection settings are not part of
its run's identity). Nothing here trains or starts a Lighthouse (where a test needs ``desloc train`` to
get past its checks, ``desloc.train.train`` is replaced by a stub that records its config), and every
test passes with and without torchft installed (where torchft must be missing,
``sys.modules["torchft"] = None`` makes its import fail)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from desloc import cli
from desloc.algorithms import MethodConfig
from desloc.cli import main
from desloc.errors import CheckpointMismatchError, ConfigError
from desloc.ft import (
    CONNECTION_FIELDS,
    DEFAULT_LIGHTHOUSE,
    MAX_TIMEOUT_S,
    FtConfig,
    identity,
    parse_address,
    replica_dir,
)
from desloc.records import RunDir
from desloc.train import TrainConfig, _check_run_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli_helpers import TINY, error_line, without

# were a refusal ever to go missing, the worker would give up on the (absent) Lighthouse within seconds
FAST_FAIL = ["--lighthouse", "127.0.0.1:9", "--ft-timeout", "1", "--ft-quorum-timeout", "1"]
TIMEOUT_FLAGS = {"timeout_s": "--ft-timeout", "quorum_timeout_s": "--ft-quorum-timeout"}
# what `desloc train` prints from train()'s summary (cli._cmd_train)
SUMMARY_KEYS = ("method", "workers", "steps", "tokens", "final_val_loss", "final_val_ppl", "bytes_sent",
                "ratio_vs_ddp", "wall_time_s", "network", "modeled_time_s", "speedup_vs_ddp_modeled")
FT_ENV = ("REPLICA_GROUP_ID", "TORCHFT_LIGHTHOUSE")

K4 = MethodConfig("desloc", period_x=4)  # K_x <= steps: TrainConfig refuses a run that never averages


@pytest.fixture
def cache(cache, monkeypatch) -> Path:
    """conftest's empty cache folder of this test (still empty afterwards = no data was read, no
    torchrun variables), and: no torchft variables from the environment the tests run in; no training."""
    for k in FT_ENV:
        monkeypatch.delenv(k, raising=False)

    def refuse(*args, **kwargs):  # were a refusal ever to go missing, the test fails here instead of training
        raise AssertionError("training started")

    monkeypatch.setattr("desloc.loop.build", refuse)
    monkeypatch.setattr("desloc.runtime.torchft.FtRuntime", refuse)
    return cache


@pytest.fixture
def no_torchft(monkeypatch):
    """``import torchft`` fails, as where the optional extra is not installed."""
    monkeypatch.setitem(sys.modules, "torchft", None)
    with pytest.raises(ImportError):
        import torchft  # noqa: F401


@pytest.fixture
def no_lighthouse(monkeypatch):
    """A test that reached the real Lighthouse would fail here instead of starting one."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a Lighthouse was started: lighthouse_main{args}")

    monkeypatch.setattr("desloc.ft.lighthouse_main", refuse)


def refused_early(capsys, cache: Path, tmp_path: Path, argv: list[str], *fragments: str) -> str:
    """The CLI refuses ``argv`` with every fragment in its one error line, having read no data and made no
    run directory."""
    line = error_line(capsys, argv)
    for f in fragments:
        assert f in line, line
    assert not cache.exists() or not any(cache.iterdir()), "data was read before the error"
    assert not (tmp_path / "run").exists(), "a run directory was made before the error"
    return line


def train_args(tmp_path: Path, *extra: str, base: list[str] = TINY) -> list[str]:
    return ["train", *base, *extra, "--out", str(tmp_path / "run")]


# ------------------------------------------------------------------ 1. FtConfig.check
@pytest.mark.parametrize("replica_id,workers", [(2, 2), (3, 2), (-1, 4), (True, 2), (False, 2), (1.0, 2), ("0", 2)])
def test_replica_id_outside_the_workers_is_refused(replica_id, workers):
    with pytest.raises(ConfigError) as err:
        FtConfig(replica_id=replica_id).check(workers)
    msg = str(err.value)
    assert "--replica-id" in msg and f"got {replica_id!r}" in msg, msg
    assert f"[0, --workers={workers})" in msg, msg  # the fix: the range it must be in
    assert "its own index" in msg, msg


def test_timeout_bound():
    assert MAX_TIMEOUT_S == 1e6  # torchft turns timeouts into timedeltas and Rust durations


@pytest.mark.parametrize("field", ["timeout_s", "quorum_timeout_s"])
@pytest.mark.parametrize("value", [0, 0.0, -1.5, float("nan"), float("inf"), -float("inf"), 1e20, MAX_TIMEOUT_S + 1,
                                   True, "60", None])
def test_timeouts_must_be_seconds_in_range(field, value):
    with pytest.raises(ConfigError) as err:
        FtConfig(**{field: value}).check(2)
    msg = str(err.value)
    flag = TIMEOUT_FLAGS[field]
    assert msg.startswith(f"{flag} must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]"), msg  # the CLI flag
    assert f"got {value!r}" in msg and f"e.g. {flag} 60" in msg, msg
    assert field not in msg, msg  # the flag, not the config field


@pytest.mark.parametrize("field", ["timeout_s", "quorum_timeout_s"])
@pytest.mark.parametrize("value", [1e-3, 1, 60.0, MAX_TIMEOUT_S, int(MAX_TIMEOUT_S)])
def test_timeouts_up_to_the_bound_pass(field, value):
    FtConfig(**{field: value}).check(2)


@pytest.mark.parametrize("value,workers", [(0, 4), (-2, 4), (True, 4), (1.5, 4), ("2", 4), (5, 4), (3, 2), (2, 1)])
def test_min_replicas_must_be_between_one_and_the_workers(value, workers):
    with pytest.raises(ConfigError) as err:
        FtConfig(min_replicas=value).check(workers)
    msg = str(err.value)
    assert "--ft-min-replicas" in msg and f"got {value!r}" in msg, msg
    assert f"integer in [1, --workers={workers}]" in msg and "more participants than workers" in msg, msg


@pytest.mark.parametrize("value,workers", [(1, 1), (1, 4), (4, 4), (2, 3)])
def test_min_replicas_up_to_the_workers_pass(value, workers):
    FtConfig(min_replicas=value).check(workers)


@pytest.mark.parametrize("lighthouse", [
    "", "localhost", "http://localhost", "10.0.0.1",  # no port
    "host:", "host:abc", "h:-1", "h:65536", "http://h:1:2",  # not a port
    "https://host:1", "ftp://h:1",  # another scheme: desloc talks http to the Lighthouse
    "host:1/path", "http://host:1/lighthouse",  # a path
])
def test_lighthouse_must_be_host_port(lighthouse):
    with pytest.raises(ConfigError) as err:
        FtConfig(lighthouse=lighthouse).check(2)
    msg = str(err.value)
    assert msg == f"--lighthouse must be HOST:PORT (e.g. {DEFAULT_LIGHTHOUSE}), got {lighthouse!r}", msg
    with pytest.raises(ConfigError, match="^--bind must be HOST:PORT"):
        parse_address(lighthouse, "--bind")  # the message names the flag it is given


@pytest.mark.parametrize("address,host,port", [
    ("127.0.0.1:29510", "127.0.0.1", 29510),
    ("http://127.0.0.1:29510", "127.0.0.1", 29510),
    ("http://127.0.0.1:29510/", "127.0.0.1", 29510),
    ("lighthouse.example:1234", "lighthouse.example", 1234),
    (DEFAULT_LIGHTHOUSE, "127.0.0.1", 29510),
])
def test_lighthouse_host_port_is_accepted(address, host, port):
    assert parse_address(address, "--lighthouse") == (host, port)
    FtConfig(lighthouse=address).check(2)
    assert FtConfig(lighthouse=address).lighthouse_url == f"http://{host}:{port}"


@pytest.mark.parametrize("ft,workers", [
    (FtConfig(), 1),
    (FtConfig(replica_id=3, lighthouse="10.0.0.1:29510", timeout_s=0.5, quorum_timeout_s=30, min_replicas=2), 4),
    (FtConfig(lighthouse="http://lighthouse.example:1234"), 2),
    (FtConfig(timeout_s=MAX_TIMEOUT_S, quorum_timeout_s=MAX_TIMEOUT_S, min_replicas=3), 3),
])
def test_good_ft_configs_pass(ft, workers):
    ft.check(workers)


def test_lighthouse_url_adds_http_only_when_missing():
    assert FtConfig(lighthouse="10.0.0.1:29510").lighthouse_url == "http://10.0.0.1:29510"
    assert FtConfig(lighthouse="http://h:1").lighthouse_url == "http://h:1"


def test_lighthouse_url_keeps_ipv6_brackets():
    assert FtConfig(lighthouse="[::1]:29510").lighthouse_url == "http://[::1]:29510"


# ------------------------------------------------------------------ identity(): what a restart may change
def test_connection_fields_are_the_ft_settings_a_restart_may_change():
    assert set(CONNECTION_FIELDS) == {"lighthouse", "timeout_s", "quorum_timeout_s", "min_replicas"}
    assert set(CONNECTION_FIELDS) | {"replica_id"} == {f.name for f in dataclasses.fields(FtConfig)}


def test_identity_drops_exactly_the_connection_fields():
    cfg = TrainConfig(workers=3, steps=8, method=K4, ft=FtConfig(replica_id=2, lighthouse="10.0.0.1:1", timeout_s=5.0,
                                                      quorum_timeout_s=30.0, min_replicas=2)).to_dict()
    before = json.loads(json.dumps(cfg))
    ident = identity(cfg)
    assert ident["ft"] == {"replica_id": 2}  # the replica id stays: it is the worker's data shard
    assert {k: v for k, v in ident.items() if k != "ft"} == {k: v for k, v in cfg.items() if k != "ft"}
    assert cfg == before  # the config itself is untouched
    moved = TrainConfig(workers=3, steps=8, method=K4, ft=FtConfig(replica_id=2, lighthouse="10.9.9.9:7")).to_dict()
    assert identity(moved) == ident
    assert identity(TrainConfig(workers=3, steps=8, method=K4, ft=FtConfig(replica_id=1)).to_dict()) != ident
    assert identity(TrainConfig(workers=3, steps=9, method=K4, ft=FtConfig(replica_id=2)).to_dict()) != ident


def test_identity_of_a_config_without_ft_is_the_config():
    cfg = TrainConfig(workers=2, steps=8, method=K4).to_dict()
    assert identity(cfg) == cfg
    older = dict(cfg)
    del older["ft"]  # a config.json from before --ft
    assert identity(older) == older


# ------------------------------------------------------------------ 2. TrainConfig(ft=...)
@pytest.mark.parametrize("kwargs,fragments", [
    ({"events": "8:add=1"}, ["--events", "join and leave for real"]),
    ({"method": MethodConfig("gasloc", period_x=4)}, ["gasloc", "gossips"]),
    ({"method": MethodConfig("desloc", period_x=8, param_delay=2)}, ["--param-delay 2", "use --param-delay 0"]),
    ({"backend": "nccl"}, ["--backend nccl", "drop --backend"]),
    ({"backend": "sim"}, ["--backend sim", "drop --backend"]),
    ({"device": "cuda"}, ["--device cuda", "use --device cpu"]),
    ({"device": "cuda:1"}, ["--device cuda:1", "use --device cpu"]),
])
def test_train_config_refuses_what_ft_cannot_run(kwargs, fragments):
    with pytest.raises(ConfigError) as err:
        TrainConfig(workers=2, ft=FtConfig(replica_id=1), **kwargs)
    msg = str(err.value)
    assert msg.startswith("--ft: "), msg
    for f in fragments:
        assert f in msg, msg


@pytest.mark.parametrize("kwargs", [{}, {"backend": "gloo"}, {"device": "cpu"},
                                    {"method": MethodConfig("desloc", period_x=8, param_delay=0)},
                                    {"method": MethodConfig("ddp")}])
def test_train_config_accepts_what_ft_runs(kwargs):
    assert TrainConfig(workers=2, ft=FtConfig(replica_id=1), **kwargs).ft == FtConfig(replica_id=1)


def test_train_config_checks_its_ft_against_the_workers():
    with pytest.raises(ConfigError, match=r"--replica-id must be an integer in \[0, --workers=2\), got 2"):
        TrainConfig(workers=2, ft=FtConfig(replica_id=2))
    with pytest.raises(ConfigError, match="--ft-min-replicas"):
        TrainConfig(workers=2, ft={"replica_id": 0, "min_replicas": 0})  # a dict (config.json) is checked too


def test_ft_dict_becomes_an_ft_config():
    cfg = TrainConfig(workers=2, ft={"replica_id": 1, "lighthouse": "h:1"})
    assert cfg.ft == FtConfig(replica_id=1, lighthouse="h:1")


def test_ft_config_round_trips_through_config_json():
    ft = FtConfig(replica_id=2, lighthouse="10.0.0.1:29511", timeout_s=5.0, quorum_timeout_s=30.0, min_replicas=2)
    cfg = TrainConfig(workers=3, steps=20, method=MethodConfig("desloc", period_x=4), ft=ft)
    d = json.loads(json.dumps(cfg.to_dict()))  # as written to and read from config.json
    assert d["ft"] == dataclasses.asdict(ft)
    back = TrainConfig.from_dict(d)
    assert isinstance(back.ft, FtConfig) and back.ft == cfg.ft
    assert back.to_dict() == cfg.to_dict()


def test_config_without_ft_round_trips_with_ft_none():
    cfg = TrainConfig(workers=2, steps=20, method=MethodConfig("desloc", period_x=4))
    assert cfg.ft is None and cfg.to_dict()["ft"] is None
    assert TrainConfig.from_dict(cfg.to_dict()).ft is None
    older = cfg.to_dict()
    del older["ft"]  # a config.json from before --ft
    assert TrainConfig.from_dict(older).ft is None


# ------------------------------------------------------------------ 3. desloc train --ft (CLI)
@pytest.mark.parametrize("extra,named", [
    (["--replica-id", "0"], ["--replica-id"]),
    (["--lighthouse", "h:1"], ["--lighthouse"]),
    (["--ft-timeout", "5"], ["--ft-timeout"]),
    (["--ft-quorum-timeout", "5"], ["--ft-quorum-timeout"]),
    (["--ft-min-replicas", "2"], ["--ft-min-replicas"]),
    (["--replica-id", "1", "--ft-min-replicas", "2"], ["--replica-id", "--ft-min-replicas"]),
])
def test_ft_flags_without_ft_are_refused(extra, named, tmp_path, cache, capsys):
    line = refused_early(capsys, cache, tmp_path, train_args(tmp_path, *extra), "add --ft", "fault-tolerant")
    for flag in named:
        assert flag in line, line


def test_ft_needs_a_replica_id(tmp_path, cache, capsys):
    refused_early(capsys, cache, tmp_path, train_args(tmp_path, "--ft", *FAST_FAIL),
                  "--ft needs --replica-id", "REPLICA_GROUP_ID")


@pytest.mark.parametrize("env", ["", "one", "-1", "1.0"])
def test_ft_refuses_a_replica_group_id_that_is_not_an_index(env, tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setenv("REPLICA_GROUP_ID", env)
    refused_early(capsys, cache, tmp_path, train_args(tmp_path, "--ft", *FAST_FAIL), "--replica-id",
                  "REPLICA_GROUP_ID")


def test_replica_id_beyond_the_workers_is_refused(tmp_path, cache, capsys):
    refused_early(capsys, cache, tmp_path,
                  train_args(tmp_path, "--ft", "--replica-id", "5", "--workers", "3", *FAST_FAIL,
                             base=without(TINY, "--workers")),
                  "--replica-id", "got 5", "--workers=3")


def test_replica_group_id_beyond_the_workers_is_refused(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setenv("REPLICA_GROUP_ID", "2")
    refused_early(capsys, cache, tmp_path, train_args(tmp_path, "--ft", *FAST_FAIL),
                  "--replica-id", "got 2", "--workers=2")


@pytest.mark.parametrize("extra,fragments", [
    (["--method", "gasloc"], ["--ft: gasloc", "gossips"]),
    (["--backend", "nccl"], ["--ft: --backend nccl"]),
    (["--param-delay", "1"], ["--ft: --param-delay 1", "use --param-delay 0"]),
    (["--ft-timeout", "0"], ["--ft-timeout must be a number of seconds in (0, 1e+06]", "got 0.0", "e.g. --ft-timeout 60"]),
    (["--ft-quorum-timeout", "-5"], ["--ft-quorum-timeout must be a number of seconds in (0, 1e+06]", "got -5.0"]),
    (["--ft-timeout", "inf"], ["--ft-timeout must be", "(0, 1e+06]", "got inf"]),
    (["--ft-quorum-timeout", "inf"], ["--ft-quorum-timeout must be", "(0, 1e+06]", "got inf"]),
    (["--ft-timeout", "1e20"], ["--ft-timeout must be", "(0, 1e+06]", "got 1e+20"]),
    (["--ft-quorum-timeout", "1e20"], ["--ft-quorum-timeout must be", "(0, 1e+06]", "got 1e+20"]),
    (["--ft-timeout", "nan"], ["--ft-timeout must be", "got nan"]),
    (["--ft-min-replicas", "0"], ["--ft-min-replicas", "got 0", "[1, --workers=2]"]),
    (["--ft-min-replicas", "3"], ["--ft-min-replicas", "got 3", "[1, --workers=2]", "more participants than workers"]),
    (["--lighthouse", "localhost"], ["--lighthouse must be HOST:PORT", "'localhost'"]),
    (["--lighthouse", "https://host:1"], ["--lighthouse must be HOST:PORT", "'https://host:1'"]),
    (["--lighthouse", "host:"], ["--lighthouse must be HOST:PORT", "'host:'"]),
    (["--lighthouse", "host:abc"], ["--lighthouse must be HOST:PORT", "'host:abc'"]),
    (["--lighthouse", "host:1/path"], ["--lighthouse must be HOST:PORT", "'host:1/path'"]),
])
def test_ft_worker_settings_are_refused_before_anything_runs(extra, fragments, tmp_path, cache, capsys):
    argv = train_args(tmp_path, "--ft", "--replica-id", "0", *FAST_FAIL, *extra)
    line = refused_early(capsys, cache, tmp_path, argv, *fragments)
    assert "timeout_s" not in line, line  # the CLI flag, not the config field


@pytest.fixture
def fake_train(monkeypatch) -> list:
    """``desloc.train.train`` (which ``desloc train`` calls) records ``(cfg, out, kwargs)`` and returns a
    summary of zeros instead of training."""
    calls = []

    def fake(cfg, out, **kwargs):
        calls.append((cfg, Path(out), kwargs))
        return dict.fromkeys(SUMMARY_KEYS, 0)

    monkeypatch.setattr("desloc.train.train", fake)
    return calls


@pytest.mark.parametrize("lighthouse", ["127.0.0.1:29510", "http://127.0.0.1:29510"])
def test_ft_worker_with_a_good_lighthouse_reaches_train(lighthouse, tmp_path, cache, capsys, fake_train):
    argv = train_args(tmp_path, "--ft", "--replica-id", "1", *FAST_FAIL, "--lighthouse", lighthouse,
                      "--ft-timeout", str(MAX_TIMEOUT_S), "--ft-min-replicas", "2")
    assert main(argv) == 0, capsys.readouterr().err
    [(cfg, out, kwargs)] = fake_train
    assert cfg.ft == FtConfig(replica_id=1, lighthouse=lighthouse, timeout_s=MAX_TIMEOUT_S, quorum_timeout_s=1.0,
                              min_replicas=2)
    assert cfg.ft.lighthouse_url == "http://127.0.0.1:29510"
    assert out == tmp_path / "run" and kwargs["resume"] is False


def test_ft_without_torchft_names_the_extra(tmp_path, cache, capsys, no_torchft):
    argv = ["train", "--ft", "--replica-id", "0", "--workers", "2", "--steps", "4", "--out", str(tmp_path / "run"),
            *without(TINY, "--workers", "--steps"), *FAST_FAIL]
    refused_early(capsys, cache, tmp_path, argv, "--ft needs torchft", "pip install -e '.[ft]'")


def _ft(argv: list[str]) -> dict | None:
    return cli._ft_config(cli.build_parser().parse_args(argv))


def test_replica_group_id_is_honoured_without_replica_id(cache, monkeypatch):
    monkeypatch.setenv("REPLICA_GROUP_ID", "1")
    ft = _ft(["train", "--ft"])
    assert ft == {**dataclasses.asdict(FtConfig()), "replica_id": 1}
    assert _ft(["train", "--ft", "--replica-id", "0"])["replica_id"] == 0  # the flag wins over the environment
    assert FtConfig(**ft) == FtConfig(replica_id=1)


def test_torchft_lighthouse_env_is_the_default_lighthouse(cache, monkeypatch):
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://10.1.2.3:29600")
    assert _ft(["train", "--ft", "--replica-id", "0"])["lighthouse"] == "http://10.1.2.3:29600"
    assert _ft(["train", "--ft", "--replica-id", "0", "--lighthouse", "h:1"])["lighthouse"] == "h:1"  # flag wins
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE")
    assert _ft(["train", "--ft", "--replica-id", "0"])["lighthouse"] == DEFAULT_LIGHTHOUSE


def test_ft_flags_reach_the_ft_config(cache):
    ft = _ft(["train", "--ft", "--replica-id", "2", "--lighthouse", "h:7", "--ft-timeout", "3",
              "--ft-quorum-timeout", "40", "--ft-min-replicas", "2"])
    assert FtConfig(**ft) == FtConfig(replica_id=2, lighthouse="h:7", timeout_s=3.0, quorum_timeout_s=40.0,
                                      min_replicas=2)
    assert _ft(["train"]) is None


# ------------------------------------------------------------------ 4. a restarted worker (train._check_run_dir)
def ft_cfg(replica_id: int = 0, steps: int = 8, **connection) -> TrainConfig:
    return TrainConfig(workers=2, steps=steps, method=K4, ft=FtConfig(replica_id=replica_id, **connection))


def ft_run_dir(tmp_path: Path, cfg: TrainConfig) -> RunDir:
    """Worker ``cfg.ft.replica_id``'s run directory as a fresh start leaves it: config.json and an empty
    metrics.jsonl, no checkpoint."""
    run = RunDir(replica_dir(tmp_path / "job", cfg.ft.replica_id))
    run.path.mkdir(parents=True)
    run.start_fresh(cfg.to_dict())
    return run


@pytest.mark.parametrize("connection", [
    {"lighthouse": "10.0.0.2:29600"},
    {"lighthouse": "http://127.0.0.1:29510"},
    {"timeout_s": 5.0},
    {"quorum_timeout_s": 30.0},
    {"min_replicas": 2},
    {"lighthouse": "h:1", "timeout_s": 1.0, "quorum_timeout_s": 2.0, "min_replicas": 2},
])
def test_restarted_worker_may_change_its_connection_settings(connection, tmp_path, cache):
    run = ft_run_dir(tmp_path, ft_cfg(lighthouse=DEFAULT_LIGHTHOUSE))
    before = {f.name: f.read_bytes() for f in run.path.iterdir()}
    assert _check_run_dir(run, ft_cfg(**connection), "torchft") is None  # no checkpoint yet: it heals from a peer
    assert {f.name: f.read_bytes() for f in run.path.iterdir()} == before  # it only reads


def test_restarted_worker_with_the_same_config_is_accepted(tmp_path, cache):
    cfg = ft_cfg(replica_id=1, lighthouse="10.0.0.1:29510")
    assert _check_run_dir(ft_run_dir(tmp_path, cfg), cfg, "torchft") is None


@pytest.mark.parametrize("changed,fragment", [
    ({"replica_id": 1}, "ft.replica_id: 0 -> 1"),
    ({"steps": 16}, "steps: 8 -> 16"),
    ({"steps": 16, "lighthouse": "10.0.0.2:1"}, "steps: 8 -> 16"),
])
def test_restarted_worker_must_keep_its_run_settings(changed, fragment, tmp_path, cache):
    run = ft_run_dir(tmp_path, ft_cfg())
    with pytest.raises(CheckpointMismatchError) as err:
        _check_run_dir(run, ft_cfg(**changed), "torchft")
    msg = str(err.value)
    assert fragment in msg and "resume without changing them" in msg, msg
    assert "lighthouse" not in msg, msg  # a connection setting is never reported as a change


def test_a_run_without_ft_still_compares_every_setting(tmp_path, cache):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.start_fresh(TrainConfig(workers=2, steps=8, method=K4).to_dict())
    with pytest.raises(CheckpointMismatchError, match="steps: 8 -> 16"):
        _check_run_dir(run, TrainConfig(workers=2, steps=16, method=K4), "sim")


# ------------------------------------------------------------------ 5. desloc train --ft --resume (CLI)
FT_JOB = ["train", "--ft", "--replica-id", "0", "--workers", "2", "--steps", "8", "--kx", "4"]


def make_ft_job(tmp_path: Path, *flags: str) -> Path:
    """``D/replica0/config.json`` as ``desloc train --ft --replica-id 0 --workers 2 --steps 8 --kx 4 --out D *flags``
    writes it; returns D."""
    job = tmp_path / "D"
    args = cli.build_parser().parse_args([*FT_JOB, "--out", str(job), *flags])
    cfg = cli._train_config(args, ft=cli._ft_config(args))
    run = RunDir(replica_dir(job, 0))
    run.path.mkdir(parents=True)
    run.start_fresh(cfg.to_dict())
    return job


def test_resume_applies_a_moved_lighthouse(tmp_path, cache, capsys, fake_train):
    job = make_ft_job(tmp_path, "--lighthouse", "127.0.0.1:29510")
    rc = main([*FT_JOB, "--out", str(job), "--resume", "--lighthouse", "127.0.0.1:1234"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "desloc: error" not in err and "change" not in err, err
    [(cfg, out, kwargs)] = fake_train
    assert cfg.ft.lighthouse == "127.0.0.1:1234" and cfg.ft.replica_id == 0
    assert out == job and kwargs["resume"] is True
    saved = TrainConfig.from_dict(RunDir(replica_dir(job, 0)).read_config())
    assert identity(cfg.to_dict()) == identity(saved.to_dict())  # everything else is the saved run's


def test_resume_applies_every_connection_flag(tmp_path, cache, capsys, fake_train):
    job = make_ft_job(tmp_path)
    assert main([*FT_JOB, "--out", str(job), "--resume", "--lighthouse", "http://10.0.0.3:7", "--ft-timeout", "5",
                 "--ft-quorum-timeout", "30", "--ft-min-replicas", "2"]) == 0, capsys.readouterr().err
    [(cfg, _, _)] = fake_train
    assert cfg.ft == FtConfig(replica_id=0, lighthouse="http://10.0.0.3:7", timeout_s=5.0, quorum_timeout_s=30.0,
                              min_replicas=2)


def test_resume_refuses_a_bad_moved_lighthouse(tmp_path, cache, capsys, fake_train):
    job = make_ft_job(tmp_path)
    line = error_line(capsys, [*FT_JOB, "--out", str(job), "--resume", "--lighthouse", "https://host:1"])
    assert "--lighthouse must be HOST:PORT" in line and "'https://host:1'" in line, line
    line = error_line(capsys, [*FT_JOB, "--out", str(job), "--resume", "--ft-min-replicas", "3"])
    assert "--ft-min-replicas" in line and "[1, --workers=2]" in line, line
    assert fake_train == []


def test_resume_still_refuses_a_changed_run_setting(tmp_path, cache, capsys, fake_train):
    job = make_ft_job(tmp_path)
    line = error_line(capsys, ["train", "--ft", "--replica-id", "0", "--workers", "2", "--steps", "16",
                               "--out", str(job), "--resume", "--lighthouse", "127.0.0.1:1234"])
    assert "--resume keeps the run's settings" in line and "['steps']" in line, line
    assert fake_train == []


def test_resume_keeps_the_connection_settings_it_is_not_given(tmp_path, cache, capsys, fake_train):
    job = make_ft_job(tmp_path, "--lighthouse", "10.0.0.1:29600", "--ft-timeout", "5", "--ft-min-replicas", "2")
    assert main([*FT_JOB, "--out", str(job), "--resume"]) == 0, capsys.readouterr().err
    [(cfg, _, _)] = fake_train
    assert cfg.ft == FtConfig(replica_id=0, lighthouse="10.0.0.1:29600", timeout_s=5.0, min_replicas=2)


# ------------------------------------------------------------------ 6. desloc ft-lighthouse
@pytest.mark.parametrize("extra,fragments", [
    (["--min-replicas", "0"], ["--min-replicas must be >= 1, got 0"]),
    (["--heartbeat-timeout-ms", "0"], ["--heartbeat-timeout-ms must be >= 1, got 0"]),
    (["--join-timeout-ms", "-5"], ["--join-timeout-ms must be >= 1, got -5"]),
    (["--bind", "nohostport"], ["--bind must be HOST:PORT", "e.g. 127.0.0.1:29510", "'nohostport'"]),
])
@pytest.mark.parametrize("torchft", ["installed", "missing"])
def test_lighthouse_settings_are_refused_before_torchft(extra, fragments, torchft, capsys, monkeypatch,
                                                        no_lighthouse):
    if torchft == "missing":
        monkeypatch.setitem(sys.modules, "torchft", None)
    line = error_line(capsys, ["ft-lighthouse", *extra])
    for f in fragments:
        assert f in line, line


def test_lighthouse_gets_its_settings(capsys, monkeypatch):
    got = []
    monkeypatch.setattr("desloc.ft.lighthouse_main", lambda *a: got.append(a) or 0)
    assert main(["ft-lighthouse", "--bind", "0.0.0.0:29600", "--min-replicas", "3", "--heartbeat-timeout-ms", "700",
                 "--join-timeout-ms", "900"]) == 0
    assert got == [("0.0.0.0:29600", 3, 900, 700)]  # lighthouse_main(bind, min_replicas, join_ms, heartbeat_ms)


def test_lighthouse_without_torchft_names_the_extra(capsys, no_torchft):
    line = error_line(capsys, ["ft-lighthouse", "--bind", "127.0.0.1:9"])
    assert "pip install -e '.[ft]'" in line, line
