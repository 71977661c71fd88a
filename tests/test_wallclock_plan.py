"""`desloc wallclock` and `desloc plan`: the time model's numbers, the period rule, the CLI's JSON and errors."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from desloc.cli import main
from desloc.errors import ConfigError
from desloc.timing import PROFILES, NetworkProfile, half_life
from desloc.wallclock import (METHODS, Compute, method_time, parse_size, plan, schedule, sensitivity,
                              wallclock_record)

ROOT = Path(__file__).resolve().parents[1]


def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------ half-life
@pytest.mark.parametrize("beta, expected", [(0.9, 6.58), (0.95, 13.51), (0.99, 68.97), (0.999, 692.80),
                                            (0.9999, 6931.13)])
def test_half_lives_match_the_paper(beta, expected):
    assert round(half_life(beta), 2) == expected


# ------------------------------------------------------------------------------------ wallclock
def test_default_json_has_every_model_and_method(capsys):
    record = run_json(capsys, "wallclock")
    assert set(record) >= {"rows", "assumptions", "paper", "sensitivity"}
    assert {(r["model"], r["method"]) for r in record["rows"]} == {(m, k) for m in ("1b", "7b", "13b") for k in METHODS}
    for row in record["rows"]:
        assert {"model", "method", "profile", "time_per_step_s", "speedup_vs_ddp", "total_time_s",
                "comm_fraction", "bytes_per_step"} <= row.keys()
        assert row["profile"] == "datacenter"
        if row["method"] == "ddp":
            assert row["speedup_vs_ddp"] == 1
    assert record["paper"]["claimed_speedup"] == "1.3x-2.1x"
    a = record["assumptions"]
    assert (a["workers"], a["gpus_per_worker"], a["bytes_per_param"]) == (16, 8, 2.0)
    assert a["periods"] == {"kx": 256, "ku": 768, "kv": 1536}
    assert {"overlap", "collective", "batch_tokens", "seq_len", "peak_tflops", "mfu"} <= a.keys()


def test_desloc_sends_170_67x_fewer_bytes_than_ddp(capsys):
    rows = run_json(capsys, "wallclock", "--models", "7b")["rows"]
    by = {r["method"]: r for r in rows}
    assert by["desloc"]["bytes_ratio_vs_ddp"] == pytest.approx(256 / 1.5)
    assert round(by["desloc"]["bytes_ratio_vs_ddp"], 2) == 170.67
    assert by["local-adam"]["bytes_per_step"] == pytest.approx(2 * by["desloc"]["bytes_per_step"])
    assert by["ddp"]["bytes_per_step"] == 7e9 * 2


def test_free_network_costs_nothing(capsys):
    rows = run_json(capsys, "wallclock", "--profiles", "free", "--models", "350m,7b")["rows"]
    for row in rows:
        assert row["time_per_step_s"] == row["compute_s"]
        assert row["speedup_vs_ddp"] == 1
    assert {r["model"] for r in rows} == {"350m", "7b"}


def test_time_per_step_and_total_by_hand():
    # M=2, N=1e9, 2 bytes, 16 Gb/s (2e9 B/s), no latency: T = 2(M-1)/M * 2e9 / 2e9 = 1 s.
    # c = 6 * 1e9 * (2000 / 2) / (1 GPU * 60e12 * MFU 1) = 0.1 s.
    compute = Compute(workers=2, gpus_per_worker=1, peak_tflops=60, mfu=1.0, batch_tokens=2000, seq_len=1000)
    net = NetworkProfile("x", 16e9, 0.0)
    t = method_time(10**9, schedule("desloc", 2, 3, 6), net, compute, steps=12)
    assert t["compute_s"] == pytest.approx(0.1) and t["allreduce_s"] == pytest.approx(1.0)
    assert t["time_per_step_s"] == pytest.approx(0.1 + 1 / 2 + 1 / 3 + 1 / 6)  # the mean over lcm = 6 steps
    assert t["total_time_s"] == pytest.approx(12 * 0.1 + (6 + 4 + 2) * 1.0)  # syncs at 2,4,..; 3,6,..; 6,12
    assert method_time(10**9, schedule("ddp", 2, 3, 6), net, compute, 12)["time_per_step_s"] == pytest.approx(1.1)


@pytest.mark.parametrize("method", METHODS)
def test_more_bandwidth_or_less_latency_never_slows_a_method(method):
    compute = Compute()
    sched = schedule(method, 16, 48, 96)
    for params in (125_000_000, 7_000_000_000):
        for latency in (0.0, 1e-4, 0.03):
            times = [method_time(params, sched, NetworkProfile("x", bw, latency), compute, 1000)
                     for bw in (1e8, 1e9, 1e10, 1e11, math.inf)]
            for key in ("time_per_step_s", "total_time_s"):
                assert all(a[key] >= b[key] for a, b in itertools.pairwise(times)), (params, latency, key)
        for bw in (1e8, 1e11):
            times = [method_time(params, sched, NetworkProfile("x", bw, lat), compute, 1000)["time_per_step_s"]
                     for lat in (0.0, 1e-5, 1e-3, 0.1)]
            assert times == sorted(times)


def test_sensitivity_factors_enter_as_one_ratio():
    """r = T / c: halving the bytes per parameter is exactly doubling the bandwidth, and so on."""
    s = sensitivity(7_000_000_000, PROFILES["datacenter"], Compute(), (256, 768, 1536), model="7b")
    rows = {r["assumption"]: r for r in s["rows"]}
    assert rows["bytes_per_param"]["speedup_if_halved"] == pytest.approx(rows["bandwidth_gbps"]["speedup_if_doubled"])
    assert rows["mfu"]["speedup_if_doubled"] == pytest.approx(rows["peak_tflops"]["speedup_if_doubled"])
    assert rows["batch_tokens"]["speedup_if_doubled"] == pytest.approx(rows["gpus_per_worker"]["speedup_if_halved"])
    for flat in ("model_params", "latency_ms", "periods_kx_ku_kv"):
        assert rows[flat]["effect"] < 0.01 < rows["bytes_per_param"]["effect"]
    assert s["rows"][0]["assumption"] == "workers"


def test_default_record_lands_in_the_papers_band():
    record = wallclock_record()
    lo, hi = record["paper"]["ours_desloc_speedup"]
    assert 1.3 <= lo <= hi <= 2.1 and record["paper"]["ours_within_claim"]
    r_lo, r_hi = record["paper"]["ddp_comm_over_compute_for_claim"]
    assert r_lo < record["sensitivity"]["ddp_comm_over_compute"] < r_hi


def test_human_output_prints_assumptions_and_the_comparison(capsys):
    assert main(["wallclock"]) == 0
    out = capsys.readouterr().out
    for text in ("1.3x-2.1x", "not overlapped", "ring all-reduce", "MFU", "bf16", "Sensitivity", "not a measurement"):
        assert text in out


def test_readme_shows_the_default_table_as_printed(capsys):
    assert main(["wallclock"]) == 0
    table = capsys.readouterr().out.split("\n\n")[0]
    readme = (ROOT / "README.md").read_text()
    assert table in readme


def test_custom_network_and_model_sizes(capsys):
    rows = run_json(capsys, "wallclock", "--models", "1.3b", "--profiles", "ethernet", "--bandwidth-gbps", "10",
                    "--latency-ms", "0.1")["rows"]
    assert {r["profile"] for r in rows} == {"ethernet", "custom"}
    by = {(r["profile"], r["method"]): r["time_per_step_s"] for r in rows}
    assert by["custom", "desloc"] == pytest.approx(by["ethernet", "desloc"])  # the same link, spelled out
    assert parse_size("350m") == 350_000_000 and parse_size("13B") == 13 * 10**9 and parse_size("7e9") == 7 * 10**9


# ----------------------------------------------------------------------------------------- plan
def test_plan_json_keys(capsys):
    p = run_json(capsys, "plan", "--model", "125m", "--profile", "ethernet", "--mt-betas", "0.9,0.99")
    assert {"half_lives", "periods", "bytes_per_step", "ratio_vs_ddp", "ratio_vs_local_adam", "speedup_vs_ddp",
            "rule", "assumptions"} <= p.keys()
    assert round(p["half_lives"]["beta1"], 2) == 6.58 and round(p["half_lives"]["beta2"], 2) == 692.80
    assert [round(t, 2) for t in p["half_lives"]["mt_betas"]] == [6.58, 68.97]
    k = p["periods"]
    assert {"kx", "ku", "kv", "momentum_periods"} <= k.keys() and len(k["momentum_periods"]) == 2
    assert all(q % k["kx"] == 0 and q >= 3 * k["kx"] for q in k["momentum_periods"] + [k["ku"]])
    assert p["overhead"] <= 0.1 * (1 + 1e-9)


def test_plan_period_choice_by_hand(capsys):
    # T = 1 s, c = 0.1 s (as in test_time_per_step_and_total_by_hand), so r = 10; target 0.5.
    # Parameters alone: K_x >= 10 / 0.5 = 20. The whole schedule, 10 (1/K_x + 1/K_u + 1/K_v) <= 0.5:
    #   K_x = 27: K_u = max(81, 27) = 81, K_v = max(162, 27 * 26 = 702) = 702 -> 0.5081  (too much)
    #   K_x = 28: K_u = max(84, 28) = 84, K_v = max(168, 28 * 25 = 700) = 700 -> 0.4905  (meets it)
    p = run_json(capsys, "plan", "--beta1", "0.9", "--beta2", "0.999", "--params", "1e9", "--bandwidth-gbps", "16",
                 "--latency-ms", "0", "--workers", "2", "--gpus-per-worker", "1", "--peak-tflops", "60", "--mfu", "1",
                 "--batch-tokens", "2000", "--seq-len", "1000", "--target-overhead", "0.5")
    assert p["periods"] == {"kx": 28, "ku": 84, "kv": 700}
    assert p["kx_params_only"] == 20
    per_step = 1 / 28 + 1 / 84 + 1 / 700
    assert p["bytes_per_step"] == pytest.approx(2e9 * per_step)
    assert p["ratio_vs_ddp"] == pytest.approx(1 / per_step)
    assert p["ratio_vs_local_adam"] == pytest.approx((3 / 28) / per_step)
    assert p["overhead"] == pytest.approx(10 * per_step)
    assert p["speedup_vs_ddp"] == pytest.approx(1.1 / (0.1 + 10 * per_step * 0.1))


def test_plan_floors_and_free_network():
    p = plan(0.0, 0.9, 10**9, PROFILES["free"], 0.1)  # nothing costs time: K_x = 1, states at the floors or tau
    assert p["periods"] == {"kx": 1, "ku": 3, "kv": 7} and p["speedup_vs_ddp"] == 1


def test_plan_human_output_states_the_rule(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "6.58" in out and "692.80" in out and "rule:" in out and "K_v = max(6 K_x" in out


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, needle", [
    (["wallclock", "--bandwidth-gbps", "0"], "--bandwidth-gbps"),
    (["wallclock", "--bandwidth-gbps", "-10"], "-10"),
    (["plan", "--bandwidth-gbps", "nan"], "nan"),
    (["plan", "--beta1", "1.0"], "--beta1"),
    (["plan", "--beta2", "-0.5"], "--beta2"),
    (["plan", "--mt-betas", "0.9,1.5"], "1.5"),
    (["wallclock", "--profiles", "moon"], "'moon'"),
    (["plan", "--profile", "moon"], "'moon'"),
    (["wallclock", "--models", "1b,huge"], "'huge'"),
    (["plan", "--model", "big"], "'big'"),
    (["wallclock", "--mfu", "nan"], "--mfu"),
    (["wallclock", "--mfu", "1.5"], "--mfu"),
    (["wallclock", "--peak-tflops", "inf"], "--peak-tflops"),
    (["wallclock", "--latency-ms", "inf", "--bandwidth-gbps", "10"], "--latency-ms"),
    (["plan", "--target-overhead", "inf"], "--target-overhead"),
    (["plan", "--target-overhead", "0"], "--target-overhead"),
    (["plan", "--params", "-5"], "--params"),
    (["wallclock", "--workers", "1"], "--workers"),
    (["wallclock", "--kx", "0"], "--kx"),
    (["wallclock", "--steps", "0"], "--steps"),
    (["wallclock", "--bytes-per-param", "0"], "--bytes-per-param"),
])
def test_bad_inputs_are_one_line_errors(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("desloc: error:") and err.count("\n") == 1 and needle in err, err


def test_pure_functions_raise_config_errors():
    with pytest.raises(ConfigError, match="beta"):
        half_life(1.0)
    with pytest.raises(ConfigError, match="unknown model size"):
        parse_size("-1b")
    with pytest.raises(ConfigError, match="unknown method"):
        schedule("gasloc", 1, 1, 1)


# ------------------------------------------------------------------------------- --compress
# Wire sizes by hand (desloc.comm.codecs' table, 64-element blocks, one float32 scale per block):
# int8 n + 4 ceil(n/64), int4 ceil(n/2) + 4 ceil(n/64), bf16 2n, topk:F 8 ceil(F n).
def _hand_nbytes(codec: str, n: int) -> int:
    blocks = -(-n // 64)
    return {"int8": n + 4 * blocks, "int4": -(-n // 2) + 4 * blocks, "bf16": 2 * n,
            "topk:0.01": 8 * -(-n // 100)}[codec]


PAPER_SPEC = "params=int4,exp_avg=int8,exp_avg_sq=int8"


def _hand_sync_bytes(codec, n, m):
    """What one worker's compressed sync carries: M >= 3, M chunks of ceil(n / M) elements encoded (the
    two-half compressed all-reduce); M = 2, the one payload."""
    return m * _hand_nbytes(codec, -(-n // m)) if m >= 3 else _hand_nbytes(codec, n)


def test_compressed_desloc_at_the_paper_periods_by_hand(capsys):
    """7b, fp32 on the wire, params int4 / states int8 at 256/768/1536, M = 16: each compressed tag is the
    two-half compressed all-reduce of its 16 encoded chunks (p_j = 16 nbytes(N / 16)), priced as a ring
    all-reduce of p_j; about 936x fewer bytes than fp32 DDP (98304/105 without the chunks' extra scales)."""
    record = run_json(capsys, "wallclock", "--models", "7b", "--bytes-per-param", "4", "--compress", PAPER_SPEC)
    by = {r["method"]: r for r in record["rows"]}
    n, m = 7 * 10**9, 16
    assert record["compression"] == {"params": "int4", "exp_avg": "int8", "exp_avg_sq": "int8"}
    desloc = by["desloc"]
    assert desloc["compression"] == record["compression"]
    p = {tag: _hand_sync_bytes(codec, n, m) for tag, codec in record["compression"].items()}
    assert desloc["bytes_per_step"] == pytest.approx(p["params"] / 256 + p["exp_avg"] / 768 + p["exp_avg_sq"] / 1536,
                                                     rel=1e-12)
    assert desloc["bytes_ratio_vs_ddp"] == pytest.approx(4 * n / desloc["bytes_per_step"], rel=1e-12)
    assert desloc["bytes_ratio_vs_ddp"] >= 900 and abs(desloc["bytes_ratio_vs_ddp"] - 98304 / 105) < 0.01
    # time: c = 6 N (B/M) / (G P MFU); ddp T = 2*15 alpha + 2*15/16 * 4N / W; C_j = 2*15 alpha + 2*15/16 p_j / W
    w, alpha = 100e9 / 8, 1e-5
    c = 6 * n * (4_194_304 / 16) / (8 * 989e12 * 0.4)
    t_ddp = 30 * alpha + 30 / 16 * 4 * n / w
    a = {tag: 30 * alpha + 30 / 16 * p[tag] / w for tag in p}
    comm = a["params"] / 256 + a["exp_avg"] / 768 + a["exp_avg_sq"] / 1536
    assert desloc["sync_s_by_tag"] == pytest.approx(a, rel=1e-12)
    assert desloc["comm_per_step_s"] == pytest.approx(comm, rel=1e-12)
    assert desloc["speedup_vs_ddp"] == pytest.approx((c + t_ddp) / (c + comm), rel=1e-12)
    assert desloc["total_time_s"] == pytest.approx(15360 * c + 60 * a["params"] + 20 * a["exp_avg"]
                                                   + 10 * a["exp_avg_sq"], rel=1e-12)
    # ddp is not named (no grads, no bare codec): the uncompressed reference; reset-states takes no --compress;
    # mtdao's momenta are exp_avg_0/1, not exp_avg
    assert by["ddp"]["compression"] == {} and by["ddp"]["speedup_vs_ddp"] == 1 and by["ddp"]["bytes_ratio_vs_ddp"] == 1
    assert by["reset-states"]["compression"] == {} and by["reset-states"]["bytes_ratio_vs_ddp"] == 256
    assert by["mtdao"]["compression"] == {"params": "int4", "exp_avg_sq": "int8"}
    assert by["keep-states"]["bytes_ratio_vs_ddp"] == pytest.approx(4 * n * 256 / p["params"])
    assert record["sensitivity"]["base_speedup"] == pytest.approx(desloc["speedup_vs_ddp"], rel=1e-12)


@pytest.mark.parametrize("codec, p", [("int8", 1_062_500_000), ("int4", 562_500_000), ("bf16", 2_000_000_000),
                                      ("topk:0.01", 80_000_000)])
def test_compressed_row_by_hand_for_four_workers(capsys, codec, p):
    """M = 4, N = 1e9 (chunks of 2.5e8, a multiple of the 64-element block: p as for one buffer),
    16 Gb/s (2e9 B/s), alpha 1 ms, c = 0.1 s. A bare codec compresses every tag, ddp's gradient too (the
    reference stays uncompressed DDP): compressed C = 6 alpha + 2 * 3/4 p / W; all-reduce
    T = 6 alpha + 2 * 3/4 * 2e9 / 2e9 = 1.506 s."""
    assert _hand_nbytes(codec, 10**9) == p == _hand_sync_bytes(codec, 10**9, 4)
    record = run_json(capsys, "wallclock", "--models", "1b", "--workers", "4",
                      "--gpus-per-worker", "1", "--peak-tflops", "60", "--mfu", "1", "--batch-tokens", "4000",
                      "--seq-len", "1000", "--bandwidth-gbps", "16", "--latency-ms", "1", "--profiles", "free",
                      "--kx", "2", "--ku", "6", "--kv", "12", "--steps", "12", "--compress", codec)
    rows = {r["method"]: r for r in record["rows"] if r["profile"] == "custom"}
    a, t, c = 6e-3 + 1.5 * p / 2e9, 6e-3 + 1.5, 0.1
    ks = rows["keep-states"]
    assert ks["compute_s"] == pytest.approx(c) and ks["allreduce_s"] == pytest.approx(t)
    assert ks["compression"] == {"params": record["compression"]["*"]}
    assert ks["sync_s_by_tag"] == {"params": pytest.approx(a)}
    assert ks["time_per_step_s"] == pytest.approx(c + a / 2)
    assert ks["total_time_s"] == pytest.approx(12 * c + 6 * a)
    assert ks["bytes_per_step"] == pytest.approx(p / 2)
    assert ks["bytes_ratio_vs_ddp"] == pytest.approx(2e9 / (p / 2))
    assert ks["speedup_vs_ddp"] == pytest.approx((c + t) / (c + a / 2))
    ddp = rows["ddp"]  # compressed DDP against uncompressed DDP
    assert ddp["compression"] == {"grads": record["compression"]["*"]}
    assert ddp["time_per_step_s"] == pytest.approx(c + a) and ddp["total_time_s"] == pytest.approx(12 * (c + a))
    assert ddp["speedup_vs_ddp"] == pytest.approx((c + t) / (c + a))
    assert ddp["bytes_ratio_vs_ddp"] == pytest.approx(2e9 / p)
    # fewer bytes is less time: the same collective shape as the all-reduce, on p instead of N b (bf16 at
    # b = 2: the same bytes, the same time)
    assert (ddp["speedup_vs_ddp"] > 1) == (p < 2 * 10**9) == (codec != "bf16")
    rs = rows["reset-states"]  # takes no --compress: priced as without it
    assert rs["compression"] == {} and rs["time_per_step_s"] == pytest.approx(c + t / 2)
    for row in record["rows"]:
        if row["profile"] == "free":
            assert row["time_per_step_s"] == row["compute_s"]


def test_two_workers_compress_with_an_all_gather(capsys):
    """M = 2: the compressed sync is an all-gather of the one payload, alpha + p / W (the same bytes as
    the two halves; exact)."""
    record = run_json(capsys, "wallclock", "--models", "1b", "--workers", "2", "--bandwidth-gbps", "16",
                      "--latency-ms", "1", "--kx", "2", "--ku", "6", "--kv", "12", "--compress", "int8")
    ks = next(r for r in record["rows"] if r["profile"] == "custom" and r["method"] == "keep-states")
    assert ks["sync_s_by_tag"]["params"] == pytest.approx(1e-3 + 1_062_500_000 / 2e9)


def test_no_compress_is_unchanged(capsys):
    """No --compress, --compress none and a spec that compresses nothing print the same numbers;
    only a given spec adds the ``compression`` keys."""
    argv = ["wallclock", "--models", "1b,7b", "--profiles", "datacenter,home", "--kx", "16", "--ku", "48",
            "--kv", "96"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert main(argv + ["--compress", "none"]) == 0
    assert capsys.readouterr().out == text and "compressed" not in text
    plain = run_json(capsys, *argv)
    assert "compression" not in plain and all("compression" not in r for r in plain["rows"])
    assert run_json(capsys, *argv, "--compress", "none") == plain
    named = run_json(capsys, *argv, "--compress", "params=none,exp_avg=none")
    assert named["compression"] == {"params": "none", "exp_avg": "none"}
    assert [{k: v for k, v in r.items() if k != "compression"} for r in named["rows"]] == plain["rows"]
    assert all(r["compression"] == {} for r in named["rows"])


def test_compressed_human_output_names_codecs_and_the_reference(capsys):
    assert main(["wallclock", "--models", "7b", "--compress", PAPER_SPEC]) == 0
    out = capsys.readouterr().out
    for text in ("compressed", "params=int4,exp_avg=int8,exp_avg_sq=int8", "all-gather", "uncompressed DDP",
                 "reset-states takes no --compress", "2 (M-1)/M p / W"):
        assert text in out, text


@pytest.mark.parametrize("spec, needle", [
    ("momentum=int8", "'momentum'"),
    ("params=int4,exp_avg=int8,v=int8", "'v'"),
    ("int3", "'int3'"),
    ("params=topk:2", "topk"),
    ("params=int8,params=int4", "twice"),
    ("params=", "TAG=CODEC"),
])
def test_bad_compress_is_a_one_line_error(capsys, spec, needle):
    assert main(["wallclock", "--compress", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("desloc: error:") and err.count("\n") == 1 and needle in err and "--compress" in err, err
