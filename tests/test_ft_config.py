"""``desloc train --ft`` / ``desloc ft-lighthouse``: every bad setting is refused up front, with the
field, the value and the fix, before any data is read, any run directory is made, or torchft is
needed. Nothing here trains or starts a Lighthouse, and every test passes with and without torchft
installed (where torchft must be missing, ``sys.modules["torchft"] = None`` makes its import fail)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from desloc import cli
from desloc.algorithms import MethodConfig
from desloc.cli import main
from desloc.errors import ConfigError
from desloc.ft import DEFAULT_LIGHTHOUSE, FtConfig
from desloc.train import TrainConfig

TINY = ["--workers", "2", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--kx", "2", "--eval-every", "2",
        "--eval-batches", "1", "--log-every", "2", "--ckpt-every", "2", "--tokenizer", "byte", "--set", "n_layer=1",
        "--set", "n_embd=16", "--set", "n_head=2", "--set", "block_size=16"]
# were a refusal ever to go missing, the worker would give up on the (absent) Lighthouse within seconds
FAST_FAIL = ["--lighthouse", "127.0.0.1:9", "--ft-timeout", "1", "--ft-quorum-timeout", "1"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
FT_ENV = ("REPLICA_GROUP_ID", "TORCHFT_LIGHTHOUSE")


def without(args: list[str], *flags: str) -> list[str]:
    """``args`` minus each flag in ``flags`` and its value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder of this test (still empty afterwards = no data was read); no torchrun or
    torchft variables from the environment the tests run in; no training."""
    c = tmp_path / "cache"
    monkeypatch.setenv("DESLOC_CACHE", str(c))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k in TORCHRUN_VARS + FT_ENV:
        monkeypatch.delenv(k, raising=False)

    def refuse(*args, **kwargs):  # were a refusal ever to go missing, the test fails here instead of training
        raise AssertionError("training started")

    monkeypatch.setattr("desloc.loop.build", refuse)
    monkeypatch.setattr("desloc.ft.FtRuntime", refuse)
    return c


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


def error_line(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit code 2 and a one-line ``desloc: error:`` with no traceback."""
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("desloc: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return errors[0]


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


@pytest.mark.parametrize("field", ["timeout_s", "quorum_timeout_s"])
@pytest.mark.parametrize("value", [0, 0.0, -1.5, float("nan"), True, "60", None])
def test_timeouts_must_be_positive_seconds(field, value):
    with pytest.raises(ConfigError) as err:
        FtConfig(**{field: value}).check(2)
    msg = str(err.value)
    assert field in msg and f"got {value!r}" in msg and "seconds > 0" in msg, msg


@pytest.mark.parametrize("value", [0, -2, True, 1.5, "2"])
def test_min_replicas_must_be_at_least_one(value):
    with pytest.raises(ConfigError) as err:
        FtConfig(min_replicas=value).check(4)
    msg = str(err.value)
    assert "--ft-min-replicas" in msg and f"got {value!r}" in msg and "integer >= 1" in msg, msg


@pytest.mark.parametrize("lighthouse", ["", "localhost", "http://localhost", "10.0.0.1"])
def test_lighthouse_needs_a_port(lighthouse):
    with pytest.raises(ConfigError) as err:
        FtConfig(lighthouse=lighthouse).check(2)
    msg = str(err.value)
    assert "--lighthouse" in msg and "HOST:PORT" in msg and f"got {lighthouse!r}" in msg, msg
    assert f"e.g. {DEFAULT_LIGHTHOUSE}" in msg, msg


@pytest.mark.parametrize("ft,workers", [
    (FtConfig(), 1),
    (FtConfig(replica_id=3, lighthouse="10.0.0.1:29510", timeout_s=0.5, quorum_timeout_s=30, min_replicas=2), 4),
    (FtConfig(lighthouse="http://lighthouse.example:1234"), 2),
])
def test_good_ft_configs_pass(ft, workers):
    ft.check(workers)


def test_lighthouse_url_adds_http_only_when_missing():
    assert FtConfig(lighthouse="10.0.0.1:29510").lighthouse_url == "http://10.0.0.1:29510"
    assert FtConfig(lighthouse="http://h:1").lighthouse_url == "http://h:1"


# ------------------------------------------------------------------ 2. TrainConfig(ft=...)
@pytest.mark.parametrize("kwargs,fragments", [
    (dict(events="8:add=1"), ["--events", "join and leave for real"]),
    (dict(method=MethodConfig("gasloc", period_x=4)), ["gasloc", "gossips"]),
    (dict(method=MethodConfig("desloc", period_x=8, param_delay=2)), ["--param-delay 2", "use --param-delay 0"]),
    (dict(backend="nccl"), ["--backend nccl", "drop --backend"]),
    (dict(backend="sim"), ["--backend sim", "drop --backend"]),
    (dict(device="cuda"), ["--device cuda", "use --device cpu"]),
    (dict(device="cuda:1"), ["--device cuda:1", "use --device cpu"]),
])
def test_train_config_refuses_what_ft_cannot_run(kwargs, fragments):
    with pytest.raises(ConfigError) as err:
        TrainConfig(workers=2, ft=FtConfig(replica_id=1), **kwargs)
    msg = str(err.value)
    assert msg.startswith("--ft: "), msg
    for f in fragments:
        assert f in msg, msg


@pytest.mark.parametrize("kwargs", [dict(), dict(backend="gloo"), dict(device="cpu"),
                                    dict(method=MethodConfig("desloc", period_x=8, param_delay=0)),
                                    dict(method=MethodConfig("ddp"))])
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
    (["--ft-timeout", "0"], ["timeout_s", "got 0.0", "> 0"]),
    (["--ft-quorum-timeout", "-5"], ["quorum_timeout_s", "got -5.0", "> 0"]),
    (["--ft-min-replicas", "0"], ["--ft-min-replicas", "got 0"]),
    (["--lighthouse", "localhost"], ["--lighthouse must be HOST:PORT", "'localhost'"]),
])
def test_ft_worker_settings_are_refused_before_anything_runs(extra, fragments, tmp_path, cache, capsys):
    argv = train_args(tmp_path, "--ft", "--replica-id", "0", *FAST_FAIL, *extra)
    refused_early(capsys, cache, tmp_path, argv, *fragments)


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


# ------------------------------------------------------------------ 4. desloc ft-lighthouse
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
