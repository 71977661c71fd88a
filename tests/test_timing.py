"""The time model and the virtual clock driven by the communicator's own events."""

import json
import math

import pytest
import torch

from desloc import MethodConfig, SimulatedComm, build_method
from desloc.cli import main
from desloc.errors import ConfigError
from desloc.optim import InnerConfig
from desloc.timing import (PROFILES, NetworkProfile, TimeConfig, TimeModel, VirtualClock, auto_local_steps,
                           flops_step_time)

pytestmark = pytest.mark.usefixtures("token_cache")

NET = NetworkProfile("test", bandwidth_bps=8e6, latency_s=0.01)  # 1 MB/s, 10 ms


def run_method(method, model, steps, shape=(2, 1000), **periods):
    """Train a flat parameter with the method in the simulator; the clock listens to the comm."""
    m = model.world_size
    x = torch.zeros(m, *shape[1:])
    icfg = InnerConfig("adamw", lr=0.01)
    comm = SimulatedComm(m)
    opt = build_method(MethodConfig(method, **periods), icfg.build([x]), comm, icfg.state_roles())
    clock = VirtualClock(model)
    comm.add_listener(clock)
    events = []

    class Recorder:
        def on_all_reduce(self, nbytes, participants, hidden_steps=0):
            events.append(nbytes)

        def on_mix(self, nbytes, links):
            events.append(nbytes * len(links) / m)

    comm.add_listener(Recorder())
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x.grad = torch.randn(x.shape, generator=g)
        clock.local_step([w for w in range(m) if w not in opt.sitting_out()])
        opt.step()
    return opt, clock, events


def test_hand_computed_clock_two_workers():
    """M = 2, 4000-byte parameters (1000 float32), desloc K_x = 2, K_u = K_v = never; c = 0.1 s.

    One all-reduce of 4000 bytes: 2 (M-1) alpha + 2 (M-1)/M n / B = 0.02 + 4000 / 1e6 = 0.024 s.
    4 steps: 4 x 0.1 compute + 2 syncs x 0.024 = 0.448 s; worker 1 at half speed (c = 0.2): it
    sets the pace, 4 x 0.2 + 2 x 0.024 = 0.848 s, and worker 0 waits for it at every sync."""
    model = TimeModel(NET, 0.1, 2)
    _, clock, _ = run_method("keep-states", model, 4, shape=(2, 1000), period_x=2)
    assert clock.time == pytest.approx([0.448, 0.448], abs=1e-12)
    assert clock.compute_only == pytest.approx(0.4)
    slow = TimeModel(NET, 0.1, 2, worker_speeds=[1.0, 0.5])
    _, clock, _ = run_method("keep-states", slow, 4, shape=(2, 1000), period_x=2)
    assert clock.time == pytest.approx([0.848, 0.848], abs=1e-12)
    assert clock.compute == pytest.approx([0.4, 0.8])


@pytest.mark.parametrize("method,periods", [("ddp", {}), ("desloc", dict(period_x=2, period_u=4, period_v=6)),
                                            ("local-adam", dict(period_x=3)), ("gasloc", dict(period_x=2))])
def test_the_clock_hears_exactly_the_ledgers_bytes(method, periods):
    model = TimeModel(NET, 0.1, 4)
    opt, _, events = run_method(method, model, 12, shape=(4, 10), **periods)
    assert sum(events) == pytest.approx(opt.comm.ledger.total_bytes)


def test_ddp_on_a_free_network_is_the_compute_floor():
    model = TimeModel(PROFILES["free"], 0.25, 4, worker_speeds=[1, 1, 0.5, 1])
    _, clock, _ = run_method("ddp", model, 10, shape=(4, 100))
    assert clock.now == clock.compute_only == pytest.approx(10 * 0.5)  # the slowest worker's compute
    assert model.ddp_step_time(400) == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["ddp", "desloc", "gasloc"])
def test_more_bandwidth_or_less_latency_never_costs_time(method):
    times = {}
    for bw in (1e6, 1e8, 1e10, math.inf):
        for lat in (0.0, 1e-3, 0.1):
            model = TimeModel(NetworkProfile("x", bw, lat), 0.05, 4, link_speeds=[1, 1, 1, 0.2])
            periods = {} if method == "ddp" else dict(period_x=3)
            times[bw, lat] = run_method(method, model, 9, shape=(4, 50), **periods)[1].now
    for (bw, lat), t in times.items():
        for (bw2, lat2), t2 in times.items():
            if bw2 >= bw and lat2 <= lat:
                assert t2 <= t + 1e-12, (bw, lat, bw2, lat2)


def test_a_straggler_delays_all_in_a_collective_but_only_its_peers_in_gossip():
    model = TimeModel(NET, 0.1, 4, worker_speeds=[1, 1, 1, 0.25])  # worker 3 computes 4x slower
    clock = VirtualClock(model)
    clock.local_step(range(4))
    clock.on_all_reduce(1000, [0, 1, 2, 3])
    assert len(set(clock.time)) == 1 and clock.time[0] > 0.4  # everyone waited for worker 3
    clock = VirtualClock(model)
    clock.local_step(range(4))
    clock.on_mix(1000, [(0, 1), (1, 0), (2, 3), (3, 2)])  # pairs (0, 1) and (2, 3)
    assert clock.time[0] == clock.time[1] < 0.2  # not held up by the straggler
    assert clock.time[2] == clock.time[3] > 0.4  # its peer waited


def test_gasloc_auto_local_steps_match_the_papers_example():
    """H = 30; one model's exchange takes 5/3 of a step at full bandwidth; one link at 10%:
    H_i = 15 with one peer and 1 with two peers (GASLoC Fig. 3)."""
    c, nbytes = 0.03, 50_000.0  # 50 kB at 1 MB/s = 0.05 s = 5/3 c
    model = TimeModel(NetworkProfile("x", 8e6, 0.0), c, 4, link_speeds=[1, 1, 1, 0.1])
    assert auto_local_steps(model, 30, nbytes, "one-peer") == [30, 30, 30, 15]
    assert auto_local_steps(model, 30, nbytes, "two-peer") == [30, 30, 30, 1]
    slow_cpu = TimeModel(NetworkProfile("x", 8e6, 0.0), c, 4, worker_speeds=[1, 1, 1, 0.5])
    assert auto_local_steps(slow_cpu, 30, nbytes, "one-peer") == [30, 30, 30, 15]


def test_flops_step_time_and_bad_inputs():
    assert flops_step_time(10**9, 2048, 312e12, 0.5) == pytest.approx(6 * 1e9 * 2048 / 156e12)
    with pytest.raises(ConfigError, match="bandwidth"):
        NetworkProfile("bad", -1.0, 0.0)
    with pytest.raises(ConfigError, match="one factor per worker"):
        TimeModel(NET, 0.1, 3, worker_speeds=[1, 1])
    with pytest.raises(ConfigError, match="unknown network profile"):
        TimeConfig(network="moon")


TINY = ["--workers", "4", "--steps", "12", "--batch-size", "2", "--seq-len", "16", "--eval-every", "6",
        "--eval-batches", "1", "--log-every", "3", "--ckpt-every", "6", "--tokenizer", "byte",
        "--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2", "--set", "block_size=16"]


def test_train_reports_modeled_time_independent_of_the_machine(tmp_path):
    """desloc K_x = 3 (K_u 9, K_v 18), step time 0.5 s, ethernet: the modeled time is the formula's,
    whatever this machine's speed; the straggler's run takes longer; records carry the time."""
    args = [*TINY, "--method", "desloc", "--kx", "3", "--network", "ethernet", "--step-time", "0.5"]
    assert main(["train", *args, "--out", str(tmp_path / "a")]) == 0
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    n = s["params"] * 4
    ar = lambda nbytes: 2 * 3 * 100e-6 + 2 * 3 / 4 * nbytes / (10e9 / 8)  # noqa: E731
    # syncs: steps 3, 6, 12 send x (one model); step 9 sends x and u (K_u = 9); K_v = 18 > 12 steps.
    # u's all-reduce is overlapped with step 10's 0.5 s of compute (ar(n) is well under it): hidden
    assert s["modeled_time_s"] == pytest.approx(12 * 0.5 + 4 * ar(n), rel=1e-9)
    assert s["compute_only_time_s"] == pytest.approx(6.0)
    assert s["ddp_modeled_time_s"] == pytest.approx(12 * (0.5 + ar(n)))
    assert s["speedup_vs_ddp_modeled"] == pytest.approx(s["ddp_modeled_time_s"] / s["modeled_time_s"])
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["modeled_time_s"] > 0 for r in rows) and rows[-1]["modeled_time_s"] == s["modeled_time_s"]
    assert (tmp_path / "a" / "loss_vs_time.png").stat().st_size > 1000
    # --no-overlap: x and u block together at step 9 (one call of 2 models): every byte shows
    assert main(["train", *args, "--no-overlap", "--out", str(tmp_path / "blocking")]) == 0
    b = json.loads((tmp_path / "blocking" / "summary.json").read_text())
    assert b["modeled_time_s"] == pytest.approx(12 * 0.5 + 3 * ar(n) + ar(2 * n), rel=1e-9)
    assert b["final_val_loss"] == s["final_val_loss"] and b["bytes_sent"] == s["bytes_sent"]
    assert main(["train", *args, "--worker-speeds", "1,1,1,0.25", "--out", str(tmp_path / "b")]) == 0
    slow = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert slow["modeled_time_s"] == pytest.approx(12 * 2.0 + 4 * ar(n), rel=1e-9)


def test_gasloc_auto_local_steps_from_the_cli(tmp_path):
    args = [*TINY, "--method", "gasloc", "--kx", "6", "--local-steps", "auto", "--network", "home",
            "--link-speeds", "1,1,1,0.1", "--step-time", "0.05"]
    assert main(["train", *args, "--out", str(tmp_path / "g")]) == 0
    s = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert s["local_steps"][:3] == [6, 6, 6] and 1 <= s["local_steps"][3] < 6


@pytest.mark.parametrize("args,fragment", [
    (["--network", "moon"], "unknown network profile 'moon'"),
    (["--worker-speeds", "1,1"], "one factor per worker (4)"),
    (["--link-speeds", "1,1,1,-1"], "finite numbers > 0"),
    (["--step-time", "nan"], "step_time_s"),
    (["--local-steps", "auto"], "local_steps='auto'"),
])
def test_bad_time_inputs_are_one_line(args, fragment, tmp_path, capsys):
    assert main(["train", *TINY, *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_idle_gasloc_workers_compute_nothing_and_engines_agree(tmp_path):
    """torchrun ranks that sit out skip forward, backward and the inner step; the result and the
    modeled time equal the simulator's, bit for bit."""
    from _runs import assert_same, cli_env, desloc, final_state

    env = cli_env()
    args = ["train", "--workers", "2", "--steps", "8", "--batch-size", "2", "--seq-len", "16", "--eval-every", "4",
            "--eval-batches", "1", "--log-every", "2", "--ckpt-every", "8", "--tokenizer", "byte",
            "--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2", "--set", "block_size=16",
            "--method", "gasloc", "--kx", "4", "--topology", "complete", "--local-steps", "4,1",
            "--network", "ethernet", "--step-time", "0.1"]
    sim = desloc([*args, "--out", str(tmp_path / "sim")], env)
    assert sim.returncode == 0, sim.stderr
    real = desloc([*args, "--out", str(tmp_path / "gloo")], env, torchrun=2)
    assert real.returncode == 0, real.stderr[-3000:]
    assert_same(final_state(tmp_path / "sim"), final_state(tmp_path / "gloo"))
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("sim", "gloo"))
    assert a["modeled_time_s"] == b["modeled_time_s"] and a["compute_only_time_s"] == pytest.approx(0.8)
    # worker 1 computes 1 of every 4 steps: 2 steps x 0.1 s; it waits for worker 0 at each round
    assert a["local_steps"] == [4, 1]


def test_state_dynamics_spread_vanishes_exactly_at_each_states_sync(tmp_path):
    """desloc K_x = 4, K_u = 12, K_v = 24, logged every 4 steps: a state's spread across workers is
    0 right after its own sync and positive otherwise (DES-LOC Fig. 2's quantities). 28 steps: a state
    sync due at the last step is not sent (nothing reads it), so the last sync of both falls before."""
    args = [*TINY, "--steps", "28", "--log-every", "4", "--eval-every", "12", "--kx", "4", "--state-dynamics"]
    assert main(["train", *args, "--out", str(tmp_path / "d")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        d, t = r["state_dynamics"], r["step"]
        assert d["params"]["spread"] == 0.0  # every logged step is a parameter sync
        assert (d["exp_avg"]["spread"] == 0.0) == (t % 12 == 0)
        assert (d["exp_avg_sq"]["spread"] == 0.0) == (t % 24 == 0)
    assert rows[0]["state_dynamics"]["exp_avg"]["rel_change"] is None
    assert all(r["state_dynamics"]["exp_avg_sq"]["rel_change"] > 0 for r in rows[1:])


def test_a_gossip_sender_starts_when_it_is_ready():
    """A slow-link worker that stopped computing early (GASLoC's H_i) sends early: with H = 30 for
    the others, H_i = 1 and a link at 10%, a two-peer round ends at 34.41 steps, not at the 63.41
    it would if every exchange waited for the last participant (GASLoC Fig. 3's premise)."""
    nbytes = 2_689_536
    c = 0.6 * nbytes / (10e9 / 8)  # one exchange at full bandwidth = 5/3 of a step
    model = TimeModel(PROFILES["ethernet"], c, 4, link_speeds=[1, 1, 1, 0.1])
    assert auto_local_steps(model, 30, nbytes, "two-peer") == [30, 30, 30, 1]
    clock = VirtualClock(model)
    for s in range(30):
        clock.local_step([0, 1, 2] + ([3] if s < 1 else []))
    clock.on_mix(nbytes, [(0, 1), (1, 0), (1, 3), (3, 1), (3, 2), (2, 3), (2, 0), (0, 2)])
    assert [round(t / c, 2) for t in clock.time] == [33.41, 34.41, 34.41, 34.41]
