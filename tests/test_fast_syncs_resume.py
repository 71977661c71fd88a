"""A ``desloc train`` resume is bitwise the uninterrupted run with streamed, delayed and
compressed syncs in flight (issue 20, item 6), on the simulator and under torchrun.

DES-LOC (K_x = 4, K_u = 4, K_v = 8) with ``--fragments 2 --param-delay 1 --state-delay 1
--compress params=int4,exp_avg=int8,exp_avg_sq=int8``, and DiLoCo (H = 4, outer Nesterov) with
fragments and int8: fragment syncs fall at steps 2, 4, 6, ... (r = 2 and 0 for F = 2), each
applied one step later, so stopping after odd steps leaves averages in flight (their snapshot and
received average are saved) along with the error-feedback buffers and the shared values. Steps
1..12, stops after 3, 5 and 9. The last checkpoint and the summary's numbers must equal the
uninterrupted run's bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from desloc.algorithms import MethodConfig
from desloc.data import DataConfig
from desloc.records import RunDir
from desloc.train import TrainConfig, train
from test_resume_matrix import _assert_equal, train_in_stops

STEPS = 12
STOPS = (3, 5, 9)
SUMMARY_NUMBERS = ("steps", "tokens", "final_val_loss", "bytes_sent", "bytes_by_state", "ddp_equivalent_bytes",
                   "modeled_time_s", "fragments", "state_delay", "compression")
METHODS = {
    "desloc": dict(name="desloc", period_x=4, period_u=4, period_v=8, fragments=2, param_delay=1, state_delay=1,
                   compression="params=int4,exp_avg=int8,exp_avg_sq=int8"),
    "diloco": dict(name="diloco", period_x=4, fragments=2, param_delay=1, compression="int8"),
    "ddp": dict(name="ddp", compression="int8"),
}

pytestmark = pytest.mark.usefixtures("token_cache", "no_plots")


def _config(method: str) -> TrainConfig:
    return TrainConfig(method=MethodConfig(**METHODS[method]), workers=2, steps=STEPS, batch_size=2, seq_len=16,
                       eval_every=STEPS, eval_batches=1, log_every=4, ckpt_every=4, data=DataConfig(tokenizer="byte"),
                       model_overrides=dict(n_layer=1, n_embd=16, n_head=2, block_size=16))


def _last_checkpoint(out: Path) -> dict:
    ckpt = RunDir(out).load_checkpoint(0)
    assert ckpt["step"] == STEPS
    ckpt.pop("elapsed_s")
    return ckpt


@pytest.mark.timeout(240)
@pytest.mark.parametrize("method", list(METHODS))
def test_resume_is_bitwise_with_fast_syncs_in_flight(tmp_path, method):
    cfg = _config(method)
    straight = train(cfg, tmp_path / "straight", progress=False)
    chained = tmp_path / "chained"
    resumed = train_in_stops(cfg, chained, STOPS)
    _assert_equal(_last_checkpoint(tmp_path / "straight"), _last_checkpoint(chained), method)
    for key in SUMMARY_NUMBERS:
        assert resumed[key] == straight[key], f"summary {key}: {resumed[key]!r} vs {straight[key]!r}"
    assert straight["compression"], "the run must compress something"


@pytest.mark.timeout(240)
def test_the_last_step_rule_is_in_the_ledger(tmp_path):
    """T = 12 with --state-delay 1, F = 2: u (K_u = 4) sends fragments at 2, 4, 6, 8, 10 but not at 12
    (12 + 1 >= T); v (K_v = 8, shifted by one step) at 3 and 7 but not at 11 -- so the ledger holds 5
    u-fragment syncs and 2 v-fragment syncs, traced by hand from the schedule's rule."""
    s = train(_config("desloc"), tmp_path / "run", progress=False)
    from desloc.comm.codecs import get_codec

    numel = s["params"]
    int8 = get_codec("int8")
    half = (numel // 2, numel - numel // 2)  # fragments 0 and 1 of the one flat buffer
    # u: residues r(1, 0) = 2 - shift, r(1, 1) = 4 - shift; shift = 1 * (4 // 2) // 3 = 0
    u_frags = [0, 1, 0, 1, 0]  # steps 2, 4, 6, 8, 10
    assert s["bytes_by_state"]["exp_avg"] == sum(int8.nbytes(half[f]) for f in u_frags)
    # v: K_v = 8, shift = 2 * 2 // 3 = 1: residues 3 and 7 -> steps 3, 7 (11: 11 + 1 >= 12, not sent)
    assert s["bytes_by_state"]["exp_avg_sq"] == int8.nbytes(half[0]) + int8.nbytes(half[1])
