"""Zero-copy, overlapped and delayed syncs on real gloo processes (2 and 4 ranks).

The shared session run (``_dist_workload.session_gloo_run``) trains every method x inner combo
with the default syncs (zero-copy, state syncs overlapped: left in flight with ``async_op=True``
and waited for before the next inner step) and, in the same processes, with the variants of
``SESSION_VARIANTS``: fully blocking, the copying path, and the delayed parameter sync.

* Overlapped == blocking, bitwise, on every rank, M = 2 and 4 (the same buffers, reduced the same
  way, only waited for later).
* Zero-copy == copying: bitwise at M = 2; at M = 4 within the summation-order error bound
  (``_numerics.reorder_tolerance``), because gloo's ring sums each element in an order set by its
  position in the reduced buffer, and the copying path puts parameters and states in one bucket
  where zero-copy reduces one buffer per tag.
* The delayed parameter sync: simulator == gloo (bitwise at M = 2, within the same bound at 4,
  states included) and the same bytes as the blocking run.

Bitwise at M = 2: a 2-term sum is the same in either order, the division by 2 is exact, and every
other operation runs the same kernels on the same shapes in both engines (one intra-op thread
per process: ``rank_main`` and the simulator's caller set it).
* A checkpoint taken with a delayed parameter average and overlapped state syncs in flight
  (step 6 of K = 2 / 3 runs, d = K - 1) resumes on gloo bitwise equal to the uninterrupted run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned ranks inherit sys.path
import _dist_workload as wl  # noqa: E402
from _numerics import assert_within, reorder_tolerance  # noqa: E402

JOIN_TIMEOUT_S = {2: 120.0, 4: 200.0}
pytestmark = [pytest.mark.timeout(280), pytest.mark.numerics]

COMBO_IDS = [wl.combo_key(m, i) for m, i in wl.COMBOS]
DELAY_IDS = [wl.combo_key(m, i) for m, i in wl.COMBOS if wl.supports_delay(m)]


def _ranks(tmp_path_factory, world_size: int) -> list[dict]:
    ranks, _ = wl.session_gloo_run(world_size, lambda: tmp_path_factory.mktemp(f"gloo{world_size}"),
                                   JOIN_TIMEOUT_S[world_size])
    return ranks


def _assert_equal(a: dict, b: dict, what: str) -> None:
    for part in ("params", "states", "scalars"):
        assert a[part].keys() == b[part].keys(), f"{what}: {part} names differ"
        for name, x in a[part].items():
            y = b[part][name]
            if torch.is_tensor(x):
                assert torch.equal(x, y), f"{what}: {part} {name} max |diff| {(x - y).abs().max().item():.3e}"
            else:
                assert x == y, f"{what}: {part} {name}"


def _assert_within_reorder_bound(a: dict, b: dict, world_size: int, what: str) -> None:
    """Stacked snapshots (``wl.stack_ranks``) that differ only in the summation order of the
    run's ``world_size``-term means: within ``reorder_tolerance``, whose scale is the largest
    magnitude over *all* workers (a mean's rounding scales with its largest input, not with
    the result one rank holds)."""
    for part in ("params", "states"):
        assert a[part].keys() == b[part].keys(), f"{what}: {part} names differ"
        for name, x in a[part].items():
            assert_within(b[part][name], x, reorder_tolerance(x, world_size, wl.STEPS, wl.REORDER_GAIN),
                          f"{what}: {part} {name}")


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("key", COMBO_IDS)
def test_overlapped_and_zero_copy_equal_blocking_and_copying_on_gloo(tmp_path_factory, world_size, key):
    ranks = _ranks(tmp_path_factory, world_size)
    for rank, result in enumerate(ranks):
        runs = result[key]
        _assert_equal(runs["full#blocking"], runs["full"], f"{key} M={world_size} rank {rank}: overlapped vs blocking")
        if world_size == 2:
            _assert_equal(runs["full#copy"], runs["full"], f"{key} M=2 rank {rank}: zero-copy vs copying")
        else:
            assert runs["full#copy"]["scalars"].keys() == runs["full"]["scalars"].keys()
            for name, x in runs["full"]["scalars"].items():  # step counters: no sums in them
                y = runs["full#copy"]["scalars"][name]
                assert torch.equal(x, y) if torch.is_tensor(x) else x == y, f"{key} rank {rank}: {name}"
        assert runs["full#blocking"]["ledger"] == runs["full"]["ledger"]
        assert runs["full#copy"]["ledger"] == runs["full"]["ledger"]
    if world_size > 2:
        _assert_within_reorder_bound(wl.stack_ranks([r[key]["full"] for r in ranks]),
                                     wl.stack_ranks([r[key]["full#copy"] for r in ranks]), world_size,
                                     f"{key} M={world_size}: zero-copy vs copying")


_SIM: dict[int, dict] = {}


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("key", DELAY_IDS)
def test_delayed_param_sync_simulator_equals_gloo(tmp_path_factory, world_size, key):
    ranks = _ranks(tmp_path_factory, world_size)
    if world_size not in _SIM:
        combos = [c for c in wl.COMBOS if wl.supports_delay(c[0])]
        _SIM[world_size] = wl.run_job_sim(world_size, wl.make_job(("full",), combos=combos,
                                                                  sync=wl.SESSION_VARIANTS["delay"]))
    sim = _SIM[world_size][key]["full"]
    real = wl.stack_ranks([r[key]["full#delay"] for r in ranks])
    if world_size == 2:
        for part in ("params", "states"):
            for name, a in sim[part].items():
                b = real[part][name]
                assert torch.equal(a, b), f"{key} {part} {name}: max |diff| {(a - b).abs().max().item():.3e}"
    else:  # 4-term sums in another order (ADOPT's eps keeps reset-states well-conditioned)
        _assert_within_reorder_bound(sim, real, 4, f"{key} delayed, simulator vs gloo")
    blocking = ranks[0][key]["full"]
    assert ranks[0][key]["full#delay"]["ledger"]["bytes_by_tag"] == blocking["ledger"]["bytes_by_tag"]
    assert not torch.equal(real["params"][next(iter(real["params"]))],
                           wl.stack_ranks([r[key]["full"] for r in ranks])["params"][next(iter(real["params"]))])


def test_checkpoint_with_syncs_in_flight_resumes_bitwise_on_gloo(tmp_path):
    combos = [c for c in wl.COMBOS if wl.supports_delay(c[0])]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    job = wl.make_job(("full", "save", "resume"), combos=combos, save_at=6, ckpt_dir=ckpt,
                      sync=wl.SESSION_VARIANTS["delay"])
    ranks = wl.spawn_ranks(2, job, tmp_path / "run", JOIN_TIMEOUT_S[2])
    for rank, result in enumerate(ranks):
        for method, inner in combos:
            key = wl.combo_key(method, inner)
            _assert_equal(result[key]["full"], result[key]["resumed"], f"{key} rank {rank}: resumed at 6")
    saved = torch.load(wl.checkpoint_path(ckpt, "local-adam", "adamw", 0), weights_only=False)
    assert saved["optim"]["desloc"]["extra"]["delayed_params"]["apply_step"] == 8  # K 3, d 2: in flight at 6
