"""Method specs (desloc.algorithms.spec): one declaration per method that the CLI, compare,
wallclock and the configuration read.

1. Every registered method's spec schedule is the schedule its built optimizer executes.
2. A method defined here, in the test file -- its algorithm and spec, registered -- gets the CLI's
   flag refusal, ``compare`` support, a ``wallclock`` row and a ``desloc methods`` line, and trains,
   without a line of cli.py knowing it.
"""

from __future__ import annotations

import json

import pytest
import torch

from _cli_helpers import TINY, error_line
from desloc.algorithms import METHODS, MethodConfig, build_method, register, unregister
from desloc.algorithms.desloc import DesLoc
from desloc.algorithms.spec import METHOD_FIELDS, MethodSpec
from desloc.cli import main
from desloc.comm import SimulatedComm
from desloc.optim import InnerConfig
from desloc.wallclock import METHODS as WALLCLOCK_METHODS
from desloc.wallclock import schedule


# ------------------------------------------------------------------ 1. spec schedule == executed schedule
def _inner_for(name: str) -> InnerConfig:
    return InnerConfig("mtdao-adam" if METHODS[name].inner == "mtdao" else "adamw", lr=1e-2)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("periods", [dict(period_x=4), dict(period_x=2, period_u=6, period_v=None)])
def test_spec_schedule_is_what_the_built_optimizer_runs(name, periods):
    spec = METHODS[name]
    if spec.state_periods != "tunable":
        periods = dict(period_x=periods["period_x"])
    cfg = MethodConfig(name, **periods)
    inner_cfg = _inner_for(name)
    model = torch.nn.Linear(3, 2)
    comm = SimulatedComm(4)
    from desloc.sim import StackedReplicas

    replicas = StackedReplicas(model, 4)
    opt = build_method(cfg, inner_cfg.build(replicas.parameters()), comm, inner_cfg.state_roles())
    assert dict(opt.schedule.periods) == dict(spec.schedule(cfg, inner_cfg.state_roles()).periods)


def test_every_spec_names_only_method_config_fields():
    for name, spec in METHODS.items():
        assert spec.name == name
        assert set(spec.fields) <= set(METHOD_FIELDS), name
    with pytest.raises(Exception, match="not MethodConfig fields"):
        MethodSpec("bad", lambda *a: None, frozenset({"period_z"}))


# -------------------------------------------------------------------- 2. a method defined in this file
def _build_toy(cfg, inner, comm, roles, kwargs):
    """Average the parameters every K_x steps; states stay local; no outer step, no delay."""
    opt = DesLoc(inner, comm, cfg.period_x, {name: None for name in roles}, **kwargs)
    return opt


TOY = MethodSpec("a test method: parameters every K_x, nothing else", _build_toy, frozenset({"period_x", "clip_rho"}),
                 why_fixed="keeps its states local")


@pytest.fixture
def toy_method():
    register("toy-avg", TOY)
    yield METHODS["toy-avg"]
    unregister("toy-avg")


def test_a_new_method_is_listed_and_trains(toy_method, tmp_path, token_cache, no_plots, capsys):
    assert main(["methods"]) == 0
    assert "toy-avg" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["train", *TINY, "--method", "toy-avg", "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "toy-avg"
    assert summary["bytes_by_state"].keys() == {"params"}  # what its schedule says: parameters only


@pytest.mark.parametrize("flags,fragments", [
    (["--topology", "ring"], ["--topology would be ignored by --method toy-avg", "only gasloc gossips"]),
    (["--ku", "4"], ["--ku would be ignored", "toy-avg keeps its states local"]),
    (["--outer-lr", "0.5"], ["--outer-lr would be ignored", "toy-avg runs no outer optimizer"]),
    (["--no-overlap"], ["--no-overlap would be ignored"]),
    (["--param-delay", "1"], ["--param-delay", "toy-avg"]),
    (["--outer", "nesterov"], ["toy-avg", "outer"]),
])
def test_a_new_method_gets_flag_refusal(toy_method, flags, fragments, tmp_path, cache, capsys):
    line = error_line(capsys, ["train", *TINY, "--method", "toy-avg", *flags, "--out", str(tmp_path / "r")])
    for f in fragments:
        assert f in line, line


def test_a_new_method_in_compare(toy_method, tmp_path, cache, capsys, monkeypatch):
    import desloc.compare

    seen = {}

    def run_compare(config_for, methods, seeds, out, **kw):
        seen.update({m: config_for(m, seeds[0]) for m in methods})
        return {"methods": {}}

    monkeypatch.setattr(desloc.compare, "run_compare", run_compare)
    argv = ["compare", *TINY, "--methods", "toy-avg,desloc", "--ku", "4", "--out", str(tmp_path / "c")]
    assert main(argv) == 0, capsys.readouterr().err
    assert seen["toy-avg"].method.period_u is None and seen["desloc"].method.period_u == 4  # projected
    line = error_line(capsys, ["compare", *TINY, "--methods", "toy-avg,ddp", "--ku", "4", "--out", str(tmp_path / "d")])
    assert "--ku would be ignored by every method in --methods (toy-avg, ddp)" in line


def test_a_new_method_gets_a_wallclock_row(toy_method, capsys):
    assert "toy-avg" in WALLCLOCK_METHODS
    assert schedule("toy-avg", 16, 48, 96) == [("params", 16)]
    assert main(["wallclock", "--json", "--models", "1b"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out)["rows"] if r["method"] == "toy-avg"]
    assert rows and all(r["periods"] == {"params": 256} and r["bytes_ratio_vs_ddp"] == 256 for r in rows)
