"""Every bad input to the ``desloc`` CLI is one line, ``desloc: error: ...``, exit code 2, and no
traceback; values the run would silently ignore are refused. Most cases call ``desloc.cli.main``
in the test process and fail before any data is read (the cache folder stays empty)."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from desloc import cli
from desloc.cli import main
from desloc.data import corpus as data
from desloc.errors import ConfigError, DeslocWarning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli_helpers import TINY, error_line, without
from _runs import cli_env


def refused_early(capsys, cache: Path, argv: list[str], *fragments: str) -> str:
    line = error_line(capsys, argv)
    for f in fragments:
        assert f in line, line
    assert not cache.exists() or not any(cache.iterdir()), "data was read before the error"
    return line


def train_args(tmp_path, *extra: str) -> list[str]:
    return ["train", *TINY, *extra, "--out", str(tmp_path / "run")]


# -------------------------------------------------------------------------- 1. --set
@pytest.mark.parametrize("item,fragments", [
    ("dropout=abc", ["dropout", "needs a number", "'abc'"]),
    ("n_layer=two", ["n_layer", "needs an integer", "'two'"]),
    ("n_layer=2.5", ["n_layer", "needs an integer"]),
    ("dropout=nan", ["dropout", "finite"]),
    ("vocab_size=100", ["vocab_size", "tokenizer", "--vocab-size"]),
    ("n_layers=3", ["unknown model field 'n_layers'"]),
    ("n_layer", ["FIELD=VALUE"]),
])
def test_set_values_are_typed_and_vocab_size_refused(item, fragments, tmp_path, cache, capsys):
    refused_early(capsys, cache, train_args(tmp_path, "--set", item), *fragments)


def test_model_fields_are_type_checked_in_the_python_api():
    from desloc.model import GPTConfig
    from desloc.train import TrainConfig

    with pytest.raises(ConfigError, match="dropout must be a number"):
        GPTConfig(dropout="abc")
    with pytest.raises(ConfigError, match="vocab_size.*--vocab-size"):
        TrainConfig(model_overrides={"vocab_size": 100})


# -------------------------------------------------------------------------- 2. --device cuda
def test_device_cuda_without_cuda(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused_early(capsys, cache, train_args(tmp_path, "--device", "cuda"), "--device cuda", "CUDA is not available",
                  "--device cpu")
    refused_early(capsys, cache, train_args(tmp_path, "--device", "gpu0"), "unknown device 'gpu0'")


# -------------------------------------------------------------------------- 3. non-finite floats
@pytest.mark.parametrize("flag,value,field", [
    ("--weight-decay", "nan", "weight_decay"), ("--lr", "inf", "lr"), ("--lr", "nan", "lr"),
    ("--lr", "-inf", "lr"), ("--beta1", "nan", "beta1"), ("--beta2", "inf", "beta2"),
    ("--clip-rho", "inf", "clip_rho"), ("--clip-rho", "nan", "clip_rho"), ("--outer-lr", "inf", "outer_lr"),
    ("--outer-momentum", "nan", "outer_momentum"), ("--min-lr-ratio", "nan", "min_lr_ratio"),
    ("--alpha", "inf", "alpha"),
])
def test_non_finite_numbers_are_refused(flag, value, field, tmp_path, cache, capsys):
    extra = [f"{flag}={value}"] + (["--outer", "nesterov"] if flag.startswith("--outer") else [])
    extra += ["--partition", "dirichlet"] if flag == "--alpha" else []
    line = refused_early(capsys, cache, train_args(tmp_path, *extra), field)
    assert value.lstrip("-") in line


@pytest.mark.parametrize("make", [
    lambda: __import__("desloc").InnerConfig("adamw", lr=math.inf),
    lambda: __import__("desloc").InnerConfig("adamw", weight_decay=math.nan),
    lambda: __import__("desloc").InnerConfig("adamw", eps=math.nan),
    lambda: __import__("desloc").InnerConfig("sgdm", momentum=math.nan),
    lambda: __import__("desloc").MethodConfig("diloco", period_x=4, outer_lr=math.inf),
    lambda: __import__("desloc").MethodConfig("desloc", period_x=4, clip_rho=math.inf),
    lambda: __import__("desloc.train").train.TrainConfig(min_lr_ratio=math.nan),
    lambda: __import__("desloc.train").train.TrainConfig(wsd_decay_fraction=math.inf),
])
def test_non_finite_numbers_are_refused_in_the_python_api(make):
    with pytest.raises(ConfigError, match="finite"):
        make()


# -------------------------------------------------------------------------- 4. torchrun environment
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_process_backend_outside_torchrun(backend, tmp_path, cache, capsys):
    refused_early(capsys, cache, train_args(tmp_path, "--backend", backend), f"--backend {backend}", "torchrun",
                  "RANK")


def test_rank_without_world_size_is_an_incomplete_torchrun_environment(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    refused_early(capsys, cache, train_args(tmp_path), "torchrun environment is incomplete", "RANK set",
                  "WORLD_SIZE")


def test_nccl_needs_cuda(tmp_path, cache, capsys, monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused_early(capsys, cache, train_args(tmp_path, "--backend", "nccl"), "nccl needs CUDA", "gloo")


# -------------------------------------------------------------------------- 5. sample
@pytest.mark.parametrize("flags,fragment", [
    (["--top-k", "0"], "--top-k must be an integer >= 1, got 0"),
    (["--top-k", "-5"], "--top-k must be an integer >= 1, got -5"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "-1"], "--temperature must be > 0, got -1"),
    (["--temperature", "0"], "--temperature must be > 0, got 0"),
    (["--tokens", "0"], "--tokens must be an integer >= 1"),
])
def test_sample_arguments(flags, fragment, tmp_path, cache, capsys):
    refused_early(capsys, cache, ["sample", str(tmp_path), *flags], fragment)


def test_sample_without_a_run(tmp_path, cache, capsys):
    refused_early(capsys, cache, ["sample", str(tmp_path)], "holds no desloc run", "desloc train")
    refused_early(capsys, cache, ["sample", str(tmp_path / "missing")], "does not exist")
    (tmp_path / "config.json").write_text("{not json")
    refused_early(capsys, cache, ["sample", str(tmp_path)], "not valid JSON")


# -------------------------------------------------------------------------- 6. compare lists
@pytest.mark.parametrize("flags,fragments", [
    (["--seeds", ","], ["--seeds lists nothing"]),
    (["--methods", ","], ["--methods lists nothing"]),
    (["--methods", " "], ["--methods lists nothing"]),
    (["--methods", "ddp,ddp"], ["--methods names ddp more than once", "twice"]),
    (["--seeds", "0,0"], ["--seeds names 0 more than once"]),
    (["--seeds", "0,x"], ["--seeds must be comma-separated integers"]),
    (["--seed", "3"], ["--seed 3 would be ignored by compare", "--seeds 3"]),
])
def test_compare_lists(flags, fragments, tmp_path, cache, capsys):
    refused_early(capsys, cache, ["compare", *TINY, *flags, "--out", str(tmp_path / "cmp")], *fragments)


# -------------------------------------------------------------------------- 7. --stop-after
@pytest.mark.parametrize("value", ["0", "-5"])
def test_stop_after_must_be_positive(value, tmp_path, cache, capsys):
    refused_early(capsys, cache, train_args(tmp_path, "--stop-after", value), "--stop-after must be >= 1",
                  f"got {value}")


# -------------------------------------------------------------------------- 8. K_x > steps
def test_kx_larger_than_steps(tmp_path, cache, capsys):
    args = without(TINY, "--kx", "--steps") + ["--kx", "500", "--steps", "100"]
    refused_early(capsys, cache, ["train", *args, "--out", str(tmp_path / "r")],
                  "K_x=500 > steps=100", "no parameter sync", "lower --kx", "raise --steps")
    # the default K_x (16) with a short run is refused too
    args = without(TINY, "--kx", "--steps") + ["--steps", "10"]
    refused_early(capsys, cache, ["train", *args, "--out", str(tmp_path / "r")], "K_x=16 > steps=10")


def test_kx_larger_than_steps_is_irrelevant_for_ddp():
    from desloc.train import TrainConfig

    TrainConfig.from_dict({"method": {"name": "ddp", "period_x": 500}, "steps": 10})  # checks K_x <= steps itself


def test_kx_larger_than_steps_is_refused_by_the_library_too():
    """An API user gets the CLI's check: TrainConfig refuses a run whose workers are never averaged."""
    from desloc.train import TrainConfig

    with pytest.raises(ConfigError, match=r"K_x=32 > steps=10: no parameter sync"):
        TrainConfig.from_dict({"method": {"name": "desloc", "period_x": 32}, "steps": 10})


# -------------------------------------------------------------------------- 9. flags the method ignores
@pytest.mark.parametrize("flags,fragments", [
    (["--method", "ddp"], ["--kx/--k would be ignored by --method ddp"]),
    (["--method", "ddp", "--ku", "4"], ["--ku", "ddp"]),
    (["--method", "ddp", "--outer-lr", "0.5"], ["--outer-lr", "no outer optimizer"]),
    (["--method", "ddp", "--outer", "nesterov"], ["ddp has no parameter sync", "--outer"]),
    (["--method", "desloc", "--outer-momentum", "0.5"], ["--outer-momentum", "--outer nesterov"]),
    (["--local-steps", "2,2"], ["--local-steps", "only gasloc"]),
    (["--topology", "ring"], ["--topology", "only gasloc"]),
    (["--gossip-seed", "3"], ["--gossip-seed", "only gasloc"]),
    (["--method", "keep-states", "--ku", "4"], ["--ku", "keep-states never syncs optimizer states"]),
    (["--method", "reset-states", "--kv", "4"], ["--kv", "reset-states"]),
    (["--method", "diloco", "--ku", "4"], ["--ku", "diloco"]),
    (["--method", "gasloc", "--kv", "4"], ["--kv", "gasloc"]),
    (["--method", "local-adam", "--momentum-periods", "2,4"], ["momentum_periods apply to desloc and mtdao"]),
    (["--momentum-periods", "2,4"], ["momentum_periods", "no MT-DAO momenta"]),
    (["--method", "mtdao", "--momentum-periods", "2,2,2"], ["3 entries", "2 momenta"]),
    (["--method", "mtdao", "--momentum-periods", "2"], ["1 entries", "2 momenta"]),
    (["--mt-betas", "0.9"], ["--mt-betas", "not MT-DAO"]),
    (["--inner", "adopt", "--mt-omegas", "0.5,0.5"], ["--mt-omegas", "adopt is not MT-DAO"]),
    (["--momentum", "0.5"], ["--momentum", "only the sgdm inner optimizer"]),
    (["--inner", "sgdm", "--beta1", "0.8"], ["--beta1", "--momentum"]),
    (["--inner", "sgdm", "--beta2", "0.9"], ["--beta2", "no second moment"]),
    (["--method", "mtdao", "--beta1", "0.8"], ["--beta1", "--mt-betas"]),
    (["--vocab-size", "512"], ["--vocab-size", "byte tokenizer"]),
    (["--alpha", "0.5"], ["--alpha", "dirichlet"]),
    (["--schedule", "constant", "--min-lr-ratio", "0.5"], ["--min-lr-ratio", "constant"]),
    (["--method", "ddp", "--param-delay", "1"], ["--param-delay", "ddp all-reduces the gradient every step"]),
    (["--method", "gasloc", "--param-delay", "1"], ["--param-delay", "gossips"]),
    (["--param-delay", "4"], ["param_delay=4 must be < K_x=2", "--param-delay 1"]),
    (["--param-delay", "-1"], ["--param-delay", "integer >= 0"]),
    (["--method", "keep-states", "--no-overlap"], ["--no-overlap", "only state syncs overlap"]),
    (["--method", "ddp", "--no-overlap"], ["--no-overlap", "ddp"]),
    (["--join-states", "zeros"], ["--join-states", "no worker joins"]),
    (["--events", "2:drop=1", "--join-states", "zeros"], ["--join-states", "no worker joins"]),
    (["--events", "2:grow=1"], ["--events", "STEP:add=N"]),
    (["--ku", "none", "--kv", "none", "--no-overlap"], ["--no-overlap", "no optimizer state is ever synced"]),
    (["--method", "mtdao", "--momentum-periods", "none,none", "--kv", "none", "--no-overlap"], ["--no-overlap"]),
    (["--method", "gasloc", "--topology", "ring", "--gossip-seed", "3"], ["--gossip-seed", "ring topology"]),
    (["--method", "gasloc", "--topology", "complete", "--gossip-seed", "3"], ["--gossip-seed", "complete"]),
    (["--step-time", "0.1", "--mfu", "0.5"], ["--mfu", "--step-time gives the modeled step time"]),
    (["--step-time", "0.1", "--peak-tflops", "100"], ["--peak-tflops", "--step-time"]),
    (["--network", "free", "--link-speeds", "1,0.5"], ["--link-speeds", "infinite bandwidth"]),
])
def test_flags_the_method_ignores_are_refused(flags, fragments, tmp_path, cache, capsys):
    refused_early(capsys, cache, train_args(tmp_path, *flags), *fragments)


def test_several_ignored_flags_are_named_together(tmp_path, cache, capsys):
    line = refused_early(capsys, cache, train_args(tmp_path, "--method", "ddp", "--topology", "ring"),
                         "--kx/--k", "--topology", "Drop them")
    assert line.count("would be ignored") == 1


@pytest.fixture
def fake_compare(monkeypatch):
    """Replace the runs of `desloc compare` by a recorder: the CLI's validation runs for real."""
    import desloc.compare

    calls = {}

    def run_compare(base_config, methods, seeds, out, **kw):
        from desloc.train import train

        calls.update(methods=methods, seeds=seeds, kw=kw, train=train,
                     configs={m: base_config(m, seeds[0]) for m in methods})
        return {"methods": {}}

    monkeypatch.setattr(desloc.compare, "run_compare", run_compare)
    return calls


@pytest.mark.parametrize("methods,flags", [
    ("ddp,local-adam,desloc,keep-states,reset-states", []),  # the default list with --kx (as compare_lm.py)
    ("ddp,desloc", ["--ku", "6"]),
    ("desloc,gasloc", ["--topology", "ring"]),
    ("ddp,desloc", ["--outer", "nesterov"]),
    ("desloc,mtdao", ["--momentum-periods", "2,4"]),
    ("ddp,mtdao", ["--mt-betas", "0.9,0.99"]),
    ("ddp,desloc,gasloc", ["--param-delay", "1", "--no-overlap"]),
    ("ddp,local-adam,desloc,keep-states,reset-states,diloco,desloc+nesterov,mtdao,gasloc@one-peer,gasloc@two-peer",
     []),
])
def test_compare_accepts_flags_that_some_method_uses(methods, flags, fake_compare, tmp_path, cache, capsys):
    assert main(["compare", *TINY, *flags, "--methods", methods, "--out", str(tmp_path / "cmp")]) == 0, \
        capsys.readouterr().err
    configs = fake_compare["configs"]
    assert list(configs) == methods.split(",")
    if "--momentum-periods" in flags:
        assert configs["desloc"].method.momentum_periods is None
        assert configs["mtdao"].method.momentum_periods == [2, 4]
    if "mtdao" in configs:
        assert configs["mtdao"].inner.name == "mtdao-adam"  # the others' flavour (adamw)
    if "--param-delay" in flags:  # only a parameter average is delayed; the others run as ever
        assert [configs[m].method.param_delay for m in configs] == [0, 1, 0]
        assert [configs[m].method.overlap for m in configs] == [False, False, False]


def test_compare_of_ddp_alone_warns_about_kx(fake_compare, tmp_path, cache, capsys):
    assert main(["compare", *TINY, "--methods", "ddp", "--out", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err
    assert "desloc: warning: --kx/--k is ignored by every method in --methods (ddp)" in err


@pytest.mark.parametrize("methods,flags,fragments", [
    ("ddp", ["--ku", "4"], ["--kx/--k, --ku would be ignored by every method in --methods (ddp)"]),
    ("ddp,desloc", ["--topology", "ring"], ["--topology", "every method"]),
    ("ddp,keep-states", ["--ku", "4"], ["--ku"]),
    ("ddp", ["--outer", "nesterov"], ["--outer"]),
    ("ddp,desloc", ["--mt-betas", "0.9,0.99"], ["--mt-betas"]),
    ("ddp,desloc", ["--momentum-periods", "2,4"], ["--momentum-periods"]),
    ("desloc,mtdao", ["--inner", "sgdm"], ["no sgdm flavour"]),
    ("ddp,desloc", ["--kx", "8"], ["K_x=8 > steps=4"]),
    ("ddp,gasloc", ["--param-delay", "1"], ["--param-delay", "every method"]),
    ("ddp,keep-states,diloco", ["--no-overlap"], ["--no-overlap", "every method"]),
])
def test_compare_refuses_flags_no_method_uses(methods, flags, fragments, fake_compare, tmp_path, cache, capsys):
    args = without(TINY, "--kx") if "--kx" in flags else TINY
    refused_early(capsys, cache, ["compare", *args, *flags, "--methods", methods, "--out", str(tmp_path / "c")],
                  *fragments)
    assert not fake_compare


# -------------------------------------------------------------------------- 10. --method mtdao
@pytest.mark.parametrize("inner,expected", [(None, "mtdao"), ("adopt", "mtdao"), ("adamw", "mtdao-adam"),
                                            ("mtdao", "mtdao"), ("mtdao-adam", "mtdao-adam")])
def test_method_mtdao_implies_its_inner_optimizer(inner, expected):
    argv = ["train", "--method", "mtdao"] + (["--inner", inner] if inner else [])
    cfg = cli._train_config(cli.build_parser().parse_args(argv))
    assert cfg.inner.name == expected
    assert cfg.inner.beta2 == (0.9999 if expected == "mtdao" else 0.999)


def test_method_mtdao_with_sgdm_is_refused(tmp_path, cache, capsys):
    refused_early(capsys, cache, train_args(tmp_path, "--method", "mtdao", "--inner", "sgdm"), "no sgdm flavour")


def test_method_mtdao_alone_trains(tmp_path, token_cache, capsys):
    assert main(train_args(tmp_path, "--method", "mtdao")) == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["inner"]["name"] == "mtdao" and saved["method"]["name"] == "mtdao"
    assert math.isfinite(json.loads((tmp_path / "run" / "summary.json").read_text())["final_val_loss"])


def test_mtdao_method_with_another_inner_fails_early_in_the_python_api():
    from desloc import InnerConfig, MethodConfig
    from desloc.train import TrainConfig

    with pytest.raises(ConfigError, match="use inner 'mtdao-adam'"):
        TrainConfig(method=MethodConfig("mtdao", period_x=4), inner=InnerConfig("adamw"))


# -------------------------------------------------------------------------- 11. memory
def test_too_many_workers_for_memory_refused_before_allocating(tmp_path, cache, capsys, monkeypatch):
    import desloc.train

    monkeypatch.setattr(desloc.train, "_available_memory", lambda device: 2 * 10**9)
    line = refused_early(capsys, cache, train_args(tmp_path, "--workers", "100000"),
                         "M=100000 workers", "GB", "only 2.0 GB of RAM is available", "--workers")
    est = float(line.split("about ")[1].split(" GB")[0])
    assert 5 < est < 50, line
    # the default model (0.67M parameters) at 10000 workers needs ~110 GB
    monkeypatch.setattr(desloc.train, "_available_memory", lambda device: 64 * 10**9)
    line = refused_early(capsys, cache, ["train", "--workers", "10000", "--steps", "20", "--kx", "4",
                                         "--out", str(tmp_path / "big")], "M=10000")
    est = float(line.split("about ")[1].split(" GB")[0])
    assert est > 100


def test_memory_estimate_counts_states():
    from desloc import InnerConfig
    from desloc.train import TrainConfig, estimate_sim_memory

    adam = estimate_sim_memory(TrainConfig(workers=8))
    sgd = estimate_sim_memory(TrainConfig(workers=8, inner=InnerConfig("sgdm", lr=0.1)))
    assert adam["params"] == sgd["params"] > 0
    assert adam["per_worker"] == adam["params"] * 4 * 4 and sgd["per_worker"] == sgd["params"] * 3 * 4
    assert adam["total"] > 8 * adam["per_worker"]


# -------------------------------------------------------------------------- 12. binary / non-UTF-8 text
def test_binary_file_is_refused(tmp_path, cache, capsys):
    f = tmp_path / "some.bin"
    f.write_bytes(bytes(range(256)) * 20)
    refused_early(capsys, cache, train_args(tmp_path, "--data", str(f)), "looks binary", "NUL")


def test_latin1_text_is_refused_with_the_share(tmp_path, cache, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes(("déjà vu à la carte, café crème. " * 200).encode("latin-1"))
    refused_early(capsys, cache, train_args(tmp_path, "--data", str(f)), "is not UTF-8 text", "%", "iconv")


def test_a_few_invalid_bytes_warn_with_their_share(tmp_path):
    f = tmp_path / "mostly.txt"
    f.write_bytes(b"In the beginning " * 50 + b"\xff" + b" and the earth.\r\n" + "\ufffd ok".encode())
    with pytest.warns(DeslocWarning, match=r"1 invalid byte sequence\(s\) \(0\.1\d\d% of"):
        text = data._read_text_file(f)
    assert text.count("\ufffd") == 2 and "\r" not in text  # the file's own U+FFFD is not counted


# -------------------------------------------------------------------------- 13. tiny text
def test_tiny_text_suggests_numbers_that_fit(tmp_path, cache, capsys):
    f = tmp_path / "tiny.txt"
    f.write_bytes(b"In the beginning God created the heaven and the earth. " * 2)  # 110 bytes
    args = without(TINY, "--workers") + ["--workers", "4"]
    line = error_line(capsys, ["train", *args, "--data", str(f), "--out", str(tmp_path / "r")])
    assert "the training text is too small" in line and "105 training tokens" in line and "world_size=4" in line
    assert "--seq-len 7" in line and "--workers 2" in line and "larger text" in line
    args = without(args, "--seq-len") + ["--seq-len", "7"]  # the suggestion works
    assert main(["train", *args, "--data", str(f), "--out", str(tmp_path / "r7")]) != 2 or \
        "training text is too small" not in capsys.readouterr().err


def test_tiny_validation_text_suggests_numbers_that_fit(tmp_path, token_cache, capsys):
    f = tmp_path / "short.txt"
    f.write_bytes(b"x" * 300)  # 285 train tokens (4 blocks), a 15-token validation tail
    line = error_line(capsys, train_args(tmp_path, "--data", str(f)))
    assert "validation text is too small" in line and "holds 15 tokens" in line
    assert "--seq-len 14" in line and "raise val_fraction to 0.06" in line


def test_invalid_bytes_warning_then_tiny_text_error_are_one_line_each(tmp_path, token_cache, capsys):
    f = tmp_path / "t.txt"
    f.write_bytes(b"a" * 150 + b"\xfe" + b"b" * 49)
    try:
        rc = main(train_args(tmp_path, "--data", str(f), "--workers", "8"))
    finally:
        err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    warn_line, err_line = [line for line in err.splitlines() if line.startswith("desloc: ")]
    assert warn_line.startswith("desloc: warning: ") and "(0.500% of 200 characters)" in warn_line
    assert err_line.startswith("desloc: error: the training text is too small")


# -------------------------------------------------------------------------- 14. --timeout
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_timeout_must_be_positive_and_finite(value, tmp_path, cache, capsys):
    refused_early(capsys, cache, train_args(tmp_path, "--timeout", value), "--timeout must be a finite number")
    refused_early(capsys, cache, ["compare", *TINY, "--timeout", value, "--out", str(tmp_path / "c")], "--timeout")


def _torchrun_env(monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)


GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "7000ms for recv operation to complete")


def test_timeout_reaches_init_and_a_collective_timeout_is_one_line(tmp_path, cache, capsys, monkeypatch):
    import desloc.comm.torch_dist as td

    seen = {}

    def fake_init(backend=None, timeout_s=600.0):
        seen.update(backend=backend, timeout_s=timeout_s)
        raise RuntimeError(GLOO_TIMEOUT)  # as gloo reports a collective that waited too long

    monkeypatch.setattr(td, "init_from_env", fake_init)
    _torchrun_env(monkeypatch)
    line = error_line(capsys, train_args(tmp_path, "--timeout", "7"))
    assert seen == {"backend": "gloo", "timeout_s": 7.0}
    assert "rank 0 waited 7 s" in line and "rank 1 is not answering" in line
    assert "--timeout SECONDS (now 7)" in line and "Timed out waiting 7000ms" in line


def test_timeout_is_refused_where_nothing_waits_for_a_collective(tmp_path, cache, capsys):
    """The simulator has no collectives and an --ft worker waits --ft-timeout: --timeout would be ignored."""
    refused_early(capsys, cache, train_args(tmp_path, "--timeout", "60"), "--timeout would be ignored: the simulator")
    refused_early(capsys, cache, ["compare", *TINY, "--timeout", "60", "--out", str(tmp_path / "c")],
                  "--timeout would be ignored: the simulator")
    refused_early(capsys, cache, train_args(tmp_path, "--timeout", "60", "--ft", "--replica-id", "0"),
                  "--timeout would be ignored: an --ft worker")


def test_compare_passes_the_timeout_to_every_run(fake_compare, tmp_path, cache, capsys, monkeypatch):
    _torchrun_env(monkeypatch)  # --timeout applies to collectives, i.e. under torchrun
    assert main(["compare", *TINY, "--methods", "ddp,desloc", "--timeout", "9", "--out", str(tmp_path / "c")]) == 0
    train = fake_compare["train"]
    timeout = fake_compare["kw"].get("timeout_s", getattr(train, "keywords", {}).get("timeout_s"))
    assert timeout == 9.0
    import desloc.train

    assert not isinstance(desloc.train.train, functools.partial)  # restored afterwards


def test_collective_failure_messages():
    msg = cli.collective_failure_message(RuntimeError(GLOO_TIMEOUT), 7.0, {"RANK": "1", "WORLD_SIZE": "2"})
    assert msg.startswith("rank 1 waited 7 s") and "rank 0 is not answering" in msg and "(now 7)" in msg
    assert "unbound_buffer.cc" not in msg  # the source location is dropped, the reason kept
    peer = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[10.0.0.7]:43121")
    msg = cli.collective_failure_message(peer, 600.0, {"RANK": "0", "WORLD_SIZE": "8"})
    assert "the rank at 10.0.0.7:43121 is not answering" in msg and "crashed" in msg
    msg = cli.collective_failure_message(RuntimeError(GLOO_TIMEOUT), 600.0, {"RANK": "3", "WORLD_SIZE": "4"})
    assert "one of the other 3 ranks" in msg

    class DistBackendError(RuntimeError):
        pass

    assert cli.collective_failure_message(DistBackendError("NCCL watchdog"), 5.0, {}) is not None
    assert cli.collective_failure_message(RuntimeError("shape mismatch"), 5.0, {}) is None


def test_other_runtime_errors_keep_their_traceback(tmp_path, cache, monkeypatch):
    import desloc.train

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(desloc.train, "train", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(train_args(tmp_path))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "X"


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to find the worker processes")
def test_stopped_torchrun_worker_gives_a_one_line_timeout(tmp_path, token_cache_dir):
    """A real 2-process gloo run; rank 1 gets SIGSTOP; rank 0 stops after --timeout 3 with one line."""
    env = cli_env(token_cache_dir)
    out = tmp_path / "run"
    args = without(TINY, "--steps", "--eval-every", "--ckpt-every", "--kx") + [
        "--method", "ddp", "--steps", "100000", "--eval-every", "100000", "--ckpt-every", "100000", "--timeout", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "desloc",
           "train", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            m = out / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        ranks = {}
        for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((e[5:].decode() for e in environ if e.startswith(b"RANK=")), None)
            ranks[rank] = int(pid)
        victim, survivor = ranks["1"], ranks["0"]
        os.kill(victim, signal.SIGSTOP)
        deadline = time.time() + 60
        while time.time() < deadline and _state(survivor) not in ("Z", "X"):
            time.sleep(0.2)
        os.kill(victim, signal.SIGCONT)  # let it see the closed connection and exit too
        _, err = proc.communicate(timeout=90)
    finally:
        if victim is not None and _state(victim) not in ("Z", "X"):
            os.kill(victim, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    rank0 = [line for line in err.splitlines() if line.startswith("desloc: error: rank 0 waited 3 s")]
    assert len(rank0) == 1, err[-3000:]
    assert "rank 1 is not answering" in rank0[0] and "--timeout" in rank0[0]
    assert "[rank0]: Traceback" not in err


# -------------------------------------------------------------------------- 15. paths and the token cache
def test_file_as_out_is_one_line(tmp_path, cache, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    line = error_line(capsys, ["train", *TINY, "--out", str(f)])
    assert str(f) in line and "directory" in line


def test_out_below_a_file_is_one_line(tmp_path, cache, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    line = error_line(capsys, ["train", *TINY, "--out", str(f / "x")])
    assert str(f) in line


def test_disk_full_is_one_line(tmp_path, cache, capsys, monkeypatch):
    import desloc.train

    where = str(tmp_path / "run" / "config.json")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)

    monkeypatch.setattr(desloc.train, "train", full)
    line = error_line(capsys, train_args(tmp_path))
    assert "no space left on device while writing" in line and where in line and "--resume" in line


def test_other_write_error_is_one_line(tmp_path, cache, capsys, monkeypatch):
    import desloc.train

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/ro/run/config.json")

    monkeypatch.setattr(desloc.train, "train", denied)
    line = error_line(capsys, train_args(tmp_path))
    assert line == "desloc: error: cannot write /ro/run/config.json: Permission denied"


@pytest.fixture
def small_corpus(tmp_path):
    src = tmp_path / "text.txt"
    src.write_text("".join(f"line {i} of a small text for the cache tests\n" for i in range(200)))
    cfg = data.DataConfig(source=str(src), tokenizer="byte", cache_dir=str(tmp_path / "cache"))
    return cfg, data.Corpus.prepare(cfg)


@pytest.mark.parametrize("damage", [
    lambda e: [(e / "ids.npy").write_bytes((e / "ids.npy").read_bytes()[:200])]  # truncated ids, read
    + [p.unlink() for p in e.glob("*-vf*.npy")],  # to split them anew
    lambda e: [p.write_bytes(p.read_bytes()[:-50]) for p in e.glob("train-*.npy")],  # truncated split
    lambda e: [np.save(p, np.zeros(3, np.uint16)) for p in e.glob("val-*.npy")],  # wrong length
    lambda e: (e / "meta.json").write_text("{\"fingerprint\": "),  # malformed meta.json
    lambda e: (e / "meta.json").write_text("{}"),  # meta.json without fields
    lambda e: (e / "meta.json").unlink(),
])
def test_damaged_token_cache_is_rebuilt_with_a_warning(damage, small_corpus):
    cfg, good = small_corpus
    entry = good.cache_path
    train_tokens, val_tokens = np.array(good.train_tokens), np.array(good.val_tokens)
    del good  # drop the memmaps before damaging the files
    damage(entry)
    with pytest.warns(DeslocWarning, match="token cache .* is damaged .*rebuilding it"):
        again = data.Corpus.prepare(cfg)
    assert np.array_equal(again.train_tokens, train_tokens) and np.array_equal(again.val_tokens, val_tokens)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # nothing left behind


def test_argparse_errors_are_one_line(tmp_path, cache, capsys):
    line = refused_early(capsys, cache, train_args(tmp_path, "--lr", "fast"), "--lr", "invalid float value",
                         "desloc train --help")
    assert "usage:" not in line


@pytest.mark.parametrize("flags,fragment", [
    (["--methods", ","], "toy methods lists nothing"),
    (["--methods", "ddp,ddp"], "toy methods name ddp more than once"),
    (["--sigma", "inf"], "sigma"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "0"], "toy lr (--lr) must be > 0"),
    (["--beta2", "1"], "toy beta2 (--beta2) must be in [0, 1)"),
    (["--mt-betas", "0.9,0.99"], "--mt-betas would be ignored by every method in --methods"),
    (["--methods", "ddp", "--ku", "4"], "--ku would be ignored"),
    (["--methods", "mtdao", "--mt-betas", "0.9,1.5"], "betas[1] must be in [0, 1)"),
])
def test_toy_bad_input(flags, fragment, tmp_path, capsys):
    line = error_line(capsys, ["toy", "--steps", "4", "--workers", "2", *flags, "--out", str(tmp_path / "toy")])
    assert fragment in line
    assert not (tmp_path / "toy").exists()
