"""Bad input gets an error that names the field, the value and the fix."""

import pytest
import torch

from desloc import ConfigError, DesLoc, InnerConfig, MethodConfig, SimulatedComm, build_method
from desloc.cli import main as cli_main


@pytest.mark.parametrize("field", ["period_x", "period_u", "period_v"])
@pytest.mark.parametrize("value,fragment", [(0, ">= 1, got 0"), (-3, ">= 1, got -3"),
                                            (2.5, "integer"), ("8", "integer"), (True, "integer")])
def test_bad_periods(field, value, fragment):
    with pytest.raises(ConfigError) as err:
        MethodConfig("desloc", **{field: value})
    msg = str(err.value)
    assert field in msg and fragment in msg


def test_zero_period_suggests_fix():
    with pytest.raises(ConfigError, match="use 1 to average every step"):
        MethodConfig("local-adam", period_x=0)


def test_unknown_method_lists_choices():
    with pytest.raises(ConfigError, match=r"unknown method 'adam-local'.*desloc"):
        MethodConfig("adam-local")


def test_unknown_inner_optimizer():
    with pytest.raises(ConfigError, match=r"unknown inner optimizer 'lion'.*adamw"):
        InnerConfig("lion")


def test_local_adam_rejects_different_state_periods():
    with pytest.raises(ConfigError, match="period_u must equal period_x"):
        MethodConfig("local-adam", period_x=4, period_u=8)


def test_desloc_defaults_are_3x_and_6x():
    cfg = MethodConfig("desloc", period_x=256)
    assert (cfg.period_u, cfg.period_v) == (768, 1536)


@pytest.mark.parametrize("m", [0, -1, 2.0])
def test_bad_world_size(m):
    with pytest.raises(ValueError, match="world_size"):
        SimulatedComm(m)


def _stacked_adam(m=2):
    p = torch.zeros(m, 3)
    return p, torch.optim.AdamW([p], lr=0.1)


def test_unknown_state_name_is_reported_at_first_step():
    p, inner = _stacked_adam()
    opt = DesLoc(inner, SimulatedComm(2), period_x=2,
                 state_periods={"exp_avg": 2, "exp_avg_sq": 4, "momentum": 2})
    p.grad = torch.ones_like(p)
    with pytest.raises(ConfigError, match=r"\['momentum'\].*exp_avg"):
        opt.step()


def test_state_without_period_is_reported():
    p, inner = _stacked_adam()
    opt = DesLoc(inner, SimulatedComm(2), period_x=2, state_periods={"exp_avg": 2})
    p.grad = torch.ones_like(p)
    with pytest.raises(ConfigError, match=r"\['exp_avg_sq'\] have no sync period"):
        opt.step()


def test_non_elementwise_optimizer_refused_in_simulator():
    p = torch.zeros(2, 3)
    inner = torch.optim.LBFGS([p])
    with pytest.raises(ConfigError, match="elementwise"):
        build_method(MethodConfig("desloc", 2), inner, SimulatedComm(2), {})


def test_bad_clip():
    with pytest.raises(ConfigError, match="clip_rho"):
        MethodConfig("desloc", clip_rho=0.0)


def test_cli_reports_config_errors(capsys):
    assert cli_main(["toy", "--kx", "0", "--steps", "4"]) == 2
    assert "period_x" in capsys.readouterr().err
    assert cli_main(["toy", "--methods", "nope", "--steps", "4"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert cli_main(["toy", "--workers", "0", "--steps", "4"]) == 2
    assert "workers" in capsys.readouterr().err


def test_cli_rejects_non_integer_period(capsys):
    with pytest.raises(SystemExit):
        cli_main(["toy", "--kx", "1.5"])
    assert "integer" in capsys.readouterr().err


def test_desloc_state_period_none_means_never():
    cfg = MethodConfig("desloc", period_x=4, period_u=None, period_v=24)
    assert cfg.period_u is None and cfg.period_v == 24


def test_keep_and_reset_states_have_no_state_periods():
    for name in ("keep-states", "reset-states", "ddp"):
        cfg = MethodConfig(name, period_x=4)
        assert cfg.period_u is None and cfg.period_v is None
