"""``--config FILE`` (TOML or JSON, shaped like a run's config.json) and ``train --print-config``:
defaults < file < flags, methods resolving what the file leaves out as they do for flags, unknown
keys refused with the closest valid one, a run's config.json reproducing the run bitwise, and the
printed TOML reading back to the same configuration."""

from __future__ import annotations

import json
import tomllib

import pytest

from _cli_helpers import TINY, error_line
from desloc.cli import main
from desloc.cli.configfile import read, to_toml


def printed(capsys, argv: list[str]) -> dict:
    """``desloc train ARGV --print-config``: the printed TOML, parsed."""
    assert main(["train", *argv, "--print-config"]) == 0, capsys.readouterr().err
    return tomllib.loads(capsys.readouterr().out)


def test_toml_file_sets_fields_and_methods_resolve_the_rest(tmp_path, cache, capsys):
    f = tmp_path / "run.toml"
    f.write_text('steps = 40\nschedule = "wsd"\n\n[method]\nperiod_x = 8\n\n[inner]\nlr = 1\n\n'
                 '[model_overrides]\nn_layer = 1\n')
    cfg = printed(capsys, ["--config", str(f)])
    assert cfg["steps"] == 40 and cfg["schedule"] == "wsd" and cfg["model_overrides"] == {"n_layer": 1}
    assert (cfg["method"]["period_x"], cfg["method"]["period_u"], cfg["method"]["period_v"]) == (8, 24, 48)
    assert cfg["warmup_steps"] == 4  # min(100, steps // 10), as without a file
    assert cfg["inner"]["lr"] == 1.0 and isinstance(cfg["inner"]["lr"], float)  # as --lr 1 parses it
    assert cfg["data"]["source"] == "kjv"  # what the file leaves out keeps its default
    assert not list(cache.glob("*"))  # nothing read, nothing trained


def test_flags_override_the_file(tmp_path, cache, capsys):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"steps": 40, "workers": 2, "method": {"period_x": 8, "period_u": 16}}))
    cfg = printed(capsys, ["--config", str(f), "--kx", "4", "--steps", "20", "--set", "n_layer=3"])
    assert cfg["steps"] == 20 and cfg["workers"] == 2  # the flag, and the file where no flag is given
    assert (cfg["method"]["period_x"], cfg["method"]["period_u"], cfg["method"]["period_v"]) == (4, 16, 24)
    assert cfg["model_overrides"] == {"n_layer": 3}


def test_method_from_a_file_gets_its_inner_optimizer_as_from_flags(tmp_path, cache, capsys):
    f = tmp_path / "mt.toml"
    f.write_text('[method]\nname = "mtdao"\n')
    assert printed(capsys, ["--config", str(f)])["inner"]["name"] == "mtdao"  # as --method mtdao
    f.write_text('[method]\nname = "mtdao"\n\n[inner]\nname = "adamw"\n')
    assert printed(capsys, ["--config", str(f)])["inner"]["name"] == "mtdao-adam"  # as --method mtdao --inner adamw


@pytest.mark.parametrize("text,fragment", [
    ("[method]\nperod_x = 4\n", "unknown key 'method.perod_x' in {f}; did you mean 'method.period_x'?"),
    ("stpes = 4\n", "unknown key 'stpes' in {f}; did you mean 'steps'?"),
    ("lr = 0.1\n", "unknown key 'lr' in {f}; did you mean 'inner.lr'?"),
    ("[model_overrides]\nn_layers = 2\n", "did you mean 'model_overrides.n_layer'?"),
    ("[zzz]\nx = 1\n", "unknown key 'zzz' in {f}; the keys of the top level are backend, batch_size"),
    ("method = 3\n", "method in {f} is a table of settings"),
    ("[steps]\nx = 3\n", "steps in {f} is one value, got a table"),
    ("[method]\nperiod_x = \n", "--config {f}: invalid TOML: line 2, column 12"),
    ('steps = 3\n\nsteps = 4\n', "--config {f}: invalid TOML: line 3"),
])
def test_bad_toml_is_one_line_naming_file_key_and_line(text, fragment, tmp_path, cache, capsys):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    line = error_line(capsys, ["train", "--config", str(f), "--out", str(tmp_path / "r")])
    assert fragment.format(f=f) in line, line
    assert not (tmp_path / "r").exists()


def test_bad_json_and_unknown_formats_are_named(tmp_path, cache, capsys):
    f = tmp_path / "bad.json"
    f.write_text('{"steps": 3,\n "workers" 4}')
    assert f"--config {f}: invalid JSON: line 2, column 12: Expecting ':' delimiter" in error_line(
        capsys, ["train", "--config", str(f)])
    f.write_text("[1, 2]")
    assert "a config file holds a table of settings" in error_line(capsys, ["train", "--config", str(f)])
    y = tmp_path / "run.yaml"
    y.write_text("steps: 3\n")
    assert "unknown format '.yaml'; a config file is TOML (.toml) or JSON (.json)" in error_line(
        capsys, ["train", "--config", str(y)])
    assert f"--config {tmp_path / 'none.toml'}: no such file" in error_line(
        capsys, ["train", "--config", str(tmp_path / "none.toml")])


def test_ignored_settings_are_refused_for_flags_not_for_the_file(tmp_path, cache, capsys):
    f = tmp_path / "ddp.toml"
    f.write_text('[method]\nname = "ddp"\nperiod_u = 48\ntopology = "ring"\n')  # restated by a ddp config.json
    assert printed(capsys, ["--config", str(f)])["method"]["name"] == "ddp"
    line = error_line(capsys, ["train", "--config", str(f), "--ku", "4"])
    assert "--ku would be ignored by --method ddp" in line, line


def test_print_config_round_trips_and_creates_nothing(tmp_path, cache, capsys):
    out, text = tmp_path / "never", tmp_path / 'a "quoted"\tpath é'  # a string TOML must escape
    text.mkdir()
    (text / "t.txt").write_text("text")
    argv = [*TINY, "--method", "desloc", "--ku", "none", "--clip-rho", "1", "--worker-speeds", "1,0.5",
            "--inner", "mtdao", "--momentum-periods", "4,none", "--data", f"{text},kjv", "--out", str(out)]
    first = printed(capsys, argv)
    assert not out.exists() and not list(cache.glob("*"))
    assert first["method"]["period_u"] == "none" and first["method"]["momentum_periods"] == [4, "none"]
    f = tmp_path / "printed.toml"
    assert main(["train", *argv, "--print-config"]) == 0
    f.write_text(capsys.readouterr().out)
    again = printed(capsys, ["--config", str(f)])
    assert again == first
    from desloc.cli.flags import _train_config
    from desloc.cli import build_parser

    by_flags = _train_config(build_parser().parse_args(["train", *argv]))
    by_file = _train_config(build_parser().parse_args(["train", "--config", str(f)]))
    assert by_file == by_flags and by_file.method.period_u is None and by_file.method.momentum_periods == [4, None]


def test_toml_writer_reads_back():
    cfg = {"a": 1, "b": 0.1 + 0.2, "c": 'x"\\\n\x7f\x01é', "d": [1e-300, 2.5], "e": None, "f": True,
           "t": {"g": "h", "sub": {"i": -3}}, "weird key": 5}
    back = tomllib.loads(to_toml(cfg, header="two\nlines"))
    assert back == {k: v for k, v in cfg.items() if v is not None}


def test_a_runs_config_json_reproduces_it_bitwise(tmp_path, token_cache, no_plots, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *TINY, "--method", "desloc", "--steps", "6", "--out", str(a)]) == 0, capsys.readouterr().err
    again = ["train", "--config", str(a / "config.json"), "--out", str(b)]
    assert main([*again, "--stop-after", "3"]) == 0, capsys.readouterr().err
    assert main([*again, "--resume"]) == 0, capsys.readouterr().err  # the same file restates the run's settings
    assert json.loads((b / "config.json").read_text()) == json.loads((a / "config.json").read_text())
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sb["final_val_loss"] == sa["final_val_loss"] and sb["bytes_sent"] == sa["bytes_sent"]
    rows = [[json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert [r.get("train_loss") for r in rows[0]] == [r.get("train_loss") for r in rows[1]]
    assert read(a / "config.json")["method"]["period_u"] == 6  # resolved 3 * K_x, taken as given


def test_compare_config_applies_to_every_method(tmp_path, cache, capsys, monkeypatch):
    import desloc.compare

    seen = {}

    def run_compare(config_for, methods, seeds, out, **kw):
        seen.update({(m, s): config_for(m, s) for m in methods for s in seeds})
        return {"methods": {}}

    monkeypatch.setattr(desloc.compare, "run_compare", run_compare)
    f = tmp_path / "c.toml"
    f.write_text('seed = 7\n\n[method]\nname = "mtdao"\nperiod_x = 2\nperiod_u = 4\n')
    argv = ["compare", *TINY, "--config", str(f), "--methods", "ddp,local-adam,desloc", "--seeds", "1,2",
            "--kx", "1", "--out", str(tmp_path / "c")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"desloc: warning: compare ignores method.name, seed from {f}: method.name: compare runs each of " \
           "--methods; seed: compare runs every method once per seed in --seeds" in err, err
    assert {k[1] for k in seen} == {1, 2}  # --seeds, not the file's seed
    for s in (1, 2):
        assert seen["ddp", s].method.name == "ddp" and seen["ddp", s].inner.name == "adamw"  # not mtdao's inner
        assert seen["desloc", s].method.period_x == 1  # the flag over the file
        assert seen["desloc", s].method.period_u == 4  # the file, projected through desloc's spec
        assert seen["local-adam", s].method.period_x == 1


def test_an_ft_table_needs_ft_and_sits_under_flags_and_environment(tmp_path, cache, capsys, monkeypatch):
    from desloc.cli import _ft_config, build_parser

    monkeypatch.delenv("REPLICA_GROUP_ID", raising=False)
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    f = tmp_path / "ft.toml"
    f.write_text('[ft]\nreplica_id = 1\nlighthouse = "h:1"\ntimeout_s = 5\n')
    assert f"{f} sets ft (a fault-tolerant worker's settings); add --ft" in error_line(
        capsys, ["train", "--config", str(f)])

    def ft(*flags: str) -> dict:
        return _ft_config(build_parser().parse_args(["train", "--config", str(f), "--ft", *flags]))

    assert (ft()["replica_id"], ft()["lighthouse"], ft()["timeout_s"]) == (1, "h:1", 5.0)
    assert (ft("--replica-id", "0")["replica_id"], ft("--lighthouse", "h:2")["lighthouse"]) == (0, "h:2")  # flags win
    monkeypatch.setenv("REPLICA_GROUP_ID", "2")
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "h:3")
    assert (ft()["replica_id"], ft()["lighthouse"]) == (2, "h:3")  # then the environment, then the file
