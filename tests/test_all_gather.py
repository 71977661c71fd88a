"""Communicator.all_gather_flat: every worker's uint8 payload to every worker, in rank order.

The compressed syncs' collective (issue 20). Checked here: the simulator returns the stacked
payload rows; real gloo processes (2 and 3) each get the same [M, nbytes] tensor, equal bitwise to
what the simulator returns for the stacked payloads (a gather copies bytes: no arithmetic), also on
the asynchronous ``hidden_steps > 0`` path; the ledger counts encoded bytes identically on both
engines; listeners hear ``on_all_gather``; the time model's ring all-gather formula by hand.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from desloc import SimulatedComm
from desloc.comm.base import Communicator, PendingGather
from desloc.comm.ledger import CommLedger
from desloc.timing import NetworkProfile, TimeModel, VirtualClock

NET = NetworkProfile("test", bandwidth_bps=8e6, latency_s=0.01)  # 1 MB/s, 10 ms
SIZES = (13, 0, 257, 5)  # bytes per worker of each payload of a call (one empty)
TAGS = ("params", "exp_avg", "exp_avg_sq", "metrics")
HIDDEN = (0, 0, 2, 1)  # two blocking, then in flight for 1 and 2 steps (issued k = 1 first)


def _payload(rank: int, call: int, i: int) -> torch.Tensor:
    """Rank-, call- and payload-dependent bytes covering all 256 values (distinct on every rank)."""
    n = SIZES[i]
    return ((torch.arange(n, dtype=torch.int64) * (2 * rank + 1) + 37 * rank + 11 * call + 3 * i) % 256).to(torch.uint8)


def _stacked(world: int, call: int, i: int) -> torch.Tensor:
    return torch.stack([_payload(r, call, i) for r in range(world)])


class Recorder:
    def __init__(self):
        self.events: list[tuple] = []

    def on_all_reduce(self, nbytes, participants, hidden_steps=0):
        self.events.append(("all_reduce", nbytes, list(participants), hidden_steps))

    def on_all_gather(self, nbytes, participants, hidden_steps=0):
        self.events.append(("all_gather", nbytes, list(participants), hidden_steps))

    def on_mix(self, nbytes, links):
        self.events.append(("mix", nbytes, list(links)))


def _calls(comm: Communicator, world: int, stacked: bool) -> list[list[torch.Tensor]]:
    """Two all_gather_flat calls of the four payloads; every gathered tensor, after wait."""
    out = []
    for call in range(2):
        payloads = [(_stacked(world, call, i) if stacked else _payload(comm.rank, call, i)).contiguous()
                    for i in range(len(SIZES))]
        handles = comm.all_gather_flat(payloads, list(TAGS), hidden_steps=list(HIDDEN))
        assert all(isinstance(h, PendingGather) for h in handles)
        assert [h.done for h in handles][:2] == [True, True]  # blocking ones are done on return
        gathered = [h.wait() for h in handles]
        assert all(h.done for h in handles)
        assert all(h.wait() is g for h, g in zip(handles, gathered))  # idempotent
        out.append(gathered)
    return out


def _expected_summary(world: int) -> dict:
    """Hand-counted: 2 calls; each payload's tag gets its bytes per worker per call; metrics is observer."""
    return {"world_size": world, "total_bytes": 2 * (13 + 0 + 257),
            "bytes_by_tag": {"params": 2 * 13, "exp_avg": 0, "exp_avg_sq": 2 * 257},
            "syncs_by_tag": {"params": 2, "exp_avg": 2, "exp_avg_sq": 2}, "collectives": 2,
            "bytes_by_link": {}, "bytes_by_worker": {}}


# ------------------------------------------------------------------------------------ simulator
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_simulator_returns_the_payload_rows(world):
    comm = SimulatedComm(world)
    rec = Recorder()
    comm.add_listener(rec)
    gathered = _calls(comm, world, stacked=True)
    for call in range(2):
        for i in range(len(SIZES)):
            g = gathered[call][i]
            assert g.dtype == torch.uint8 and g.shape == (world, SIZES[i])
            for m in range(world):
                assert torch.equal(g[m], _payload(m, call, i))  # row m is worker m's payload
    assert comm.ledger.summary() == _expected_summary(world)
    assert comm.ledger.observer_bytes_by_tag == {"metrics": 2 * 5}
    # per call: the blocking bytes (13 + 0), then k = 2 (257); metrics (k = 1) is observer traffic
    assert rec.events == 2 * [("all_gather", 13, list(range(world)), 0), ("all_gather", 257, list(range(world)), 2)]


def test_simulator_refuses_bad_payloads():
    comm = SimulatedComm(2)
    with pytest.raises(ValueError, match="uint8"):
        comm.all_gather_flat([torch.zeros(2, 4)], ["params"])
    with pytest.raises(ValueError, match=r"\[M=2, numel\]"):
        comm.all_gather_flat([torch.zeros(3, 4, dtype=torch.uint8)], ["params"])
    with pytest.raises(ValueError, match="hidden_steps"):
        comm.all_gather_flat([torch.zeros(2, 4, dtype=torch.uint8)], ["params"], hidden_steps=[-1])
    with pytest.raises(ValueError, match="tags"):
        comm.all_gather_flat([torch.zeros(2, 4, dtype=torch.uint8)], ["params", "x"])
    assert comm.ledger.collectives == 0 and not comm.ledger.sent_by_tag  # nothing counted


def test_listener_without_on_all_gather_is_told_what_is_missing():
    class Old:
        def on_all_reduce(self, nbytes, participants, hidden_steps=0):
            pass

    comm = SimulatedComm(2)
    comm.add_listener(Old())
    comm.all_reduce_mean_flat([torch.zeros(2, 3)], ["params"])  # an old listener still hears all-reduces
    with pytest.raises(TypeError, match="on_all_gather"):
        comm.all_gather_flat([torch.zeros(2, 3, dtype=torch.uint8)], ["params"])


class _ReduceOnly(Communicator):
    """A user's communicator with all-reduce only: no all-gather."""

    world_size = 2
    ledger = CommLedger(2)
    stacked = False

    def all_reduce_mean(self, tensors, tags):
        pass

    def worker_numel(self, tensor):
        return tensor.numel()


def test_has_all_gather():
    assert SimulatedComm(3).has_all_gather
    comm = _ReduceOnly()
    assert not comm.has_all_gather
    with pytest.raises(NotImplementedError, match="all_gather_flat"):
        comm.all_gather_flat([torch.zeros(4, dtype=torch.uint8)], ["params"])
    from desloc.comm.mesh import MeshComm
    from desloc.comm.torch_dist import TorchDistComm
    from desloc.comm.torchft_comm import TorchftComm

    # class-level checks (building them needs a process group / a torchft manager)
    assert TorchDistComm.has_all_gather.fget is Communicator.has_all_gather.fget
    assert TorchDistComm._gather_flat is not Communicator._gather_flat
    assert MeshComm.has_all_gather.fget(None) is False
    ft = TorchftComm(manager=None, world_size=2)
    assert not ft.has_all_gather
    with pytest.raises(NotImplementedError, match="TorchftComm"):
        ft.all_gather_flat([torch.zeros(4, dtype=torch.uint8)], ["params"])
    assert ft.ledger.collectives == 0


# ------------------------------------------------------------------------------------ real gloo
def _gloo_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from desloc.comm.torch_dist import TorchDistComm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        comm = TorchDistComm()
        rec = Recorder()
        comm.add_listener(rec)
        gathered = _calls(comm, world, stacked=False)
        torch.save({"gathered": gathered, "summary": comm.ledger.summary(), "events": rec.events,
                    "observer": dict(comm.ledger.observer_bytes_by_tag), "issued": comm.gathers_issued},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.numerics
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_gloo_gathers_what_the_simulator_returns(world):
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_gloo_rank, args=(world, os.path.join(d, "init"), d), nprocs=world, join=True,
                           start_method="spawn")
        results = [torch.load(os.path.join(d, f"{r}.pt")) for r in range(world)]
    sim = SimulatedComm(world)
    sim_rec = Recorder()
    sim.add_listener(sim_rec)
    sim_gathered = _calls(sim, world, stacked=True)
    for r, res in enumerate(results):
        for call in range(2):
            for i in range(len(SIZES)):
                got, want = res["gathered"][call][i], sim_gathered[call][i]
                assert got.dtype == torch.uint8 and got.shape == want.shape == (world, SIZES[i])
                assert torch.equal(got, want), f"rank {r} call {call} payload {i}"
        assert res["summary"] == sim.ledger.summary() == _expected_summary(world)
        assert res["observer"] == dict(sim.ledger.observer_bytes_by_tag)
        assert res["events"] == sim_rec.events
        assert res["issued"] == 2 * 3  # one network all-gather per non-empty payload


# ------------------------------------------------------------------------------------ time model
def test_all_gather_time_by_hand_m4():
    """m = 4, 1 MB/s, 10 ms, n = 1000 bytes: 3 x 0.01 + 3 x 1000 / 1e6 = 0.033 s; the slowest link
    paces it (a quarter-speed link: 3 x 0.01 + 3 x 1000 / 0.25e6 = 0.042 s)."""
    model = TimeModel(NET, 0.1, 4)
    assert model.all_gather_time(1000, [0, 1, 2, 3]) == pytest.approx(0.033, abs=1e-15)
    assert model.all_reduce_time(1000, [0, 1, 2, 3]) == pytest.approx(0.06 + 1.5e-3, abs=1e-15)
    slow = TimeModel(NET, 0.1, 4, link_speeds=[1, 1, 0.25, 1])
    assert slow.all_gather_time(1000, [0, 1, 2, 3]) == pytest.approx(0.042, abs=1e-15)
    assert slow.all_gather_time(1000, [0, 1]) == pytest.approx(0.011, abs=1e-15)
    assert model.all_gather_time(1000, [2]) == 0.0 and model.all_gather_time(0, [0, 1]) == 0.0
    # cheaper than the fp32 all-reduce of the full tensor iff payload / full < 2 / M, latency aside
    free_latency = TimeModel(NetworkProfile("bw", 8e6, 0.0), 0.1, 4)
    full = 4000
    assert free_latency.all_gather_time(full * 0.49, range(4)) < free_latency.all_reduce_time(full, range(4))
    assert free_latency.all_gather_time(full * 0.51, range(4)) > free_latency.all_reduce_time(full, range(4))


def test_clock_all_gather_blocking_and_hidden():
    """Two workers, c = 0.5 s, alpha = 0, 1 MB/s: an all-gather of n bytes lasts n / 1e6 s (M-1 = 1)."""
    model = TimeModel(NetworkProfile("bw", 8e6, 0.0), 0.5, 2)
    clock = VirtualClock(model)
    clock.local_step([0, 1])
    clock.on_all_gather(200_000, [0, 1])  # blocking 0.2 s
    assert clock.time == pytest.approx([0.7, 0.7])
    clock.on_all_gather(300_000, [0, 1], hidden_steps=1)  # 0.3 s hidden behind the next 0.5 s step
    assert clock.time == pytest.approx([0.7, 0.7]) and clock.now == pytest.approx(1.0)
    clock.local_step([0, 1])
    assert clock.time == pytest.approx([1.2, 1.2])
    clock.on_all_gather(800_000, [0, 1], hidden_steps=1)  # 0.8 s: 0.3 s show after the 0.5 s step
    clock.local_step([0, 1])
    assert clock.time == pytest.approx([2.0, 2.0])
    clock.on_all_gather(900_000, [0, 1], hidden_steps=2)  # 0.9 s behind two steps: hidden
    clock.on_all_reduce(100_000, [0, 1])  # a blocking all-reduce waits for the link: 2.0 + 0.9 + 0.1
    assert clock.time == pytest.approx([3.0, 3.0])
    # the same sequence with all-reduces costs more (2 (M-1)/M = 1 here, but 2 latencies once alpha > 0)
    lat = TimeModel(NetworkProfile("lat", 8e6, 0.01), 0.5, 2)
    a, b = VirtualClock(lat), VirtualClock(lat)
    a.on_all_gather(1000, [0, 1])
    b.on_all_reduce(1000, [0, 1])
    assert a.time == pytest.approx([0.011, 0.011]) and b.time == pytest.approx([0.021, 0.021])


def test_replay_knows_all_gather_events():
    """--step-time measured: the clock records all-gathers and replays them at the median step."""
    model = TimeModel(NET, 0.0, 3)
    clock = VirtualClock(model, events=[])
    comm = SimulatedComm(3)
    comm.add_listener(clock)
    for step in range(3):
        clock.local_step([0, 1, 2])
        clock.measure(0.1 * (step + 1))
        comm.all_gather_flat([torch.zeros(3, 1000, dtype=torch.uint8)], ["params"], hidden_steps=[step % 2])
    assert [e[0] for e in clock.events] == ["step", "all_gather"] * 3
    replayed, after = clock.replay(0.2)
    # by hand: all-gather of 1000 bytes over 3 = 2 x 0.01 + 2 x 1000 / 1e6 = 0.022 s
    # step 1: 0.2, blocking -> 0.222; step 2: 0.422, hidden 1 -> ends 0.444 (now counts it); step 3: 0.622,
    # blocking (link free at 0.444) -> 0.644
    assert after == pytest.approx([0.222, 0.444, 0.644])  # step 2 ends with its gather in flight
    assert replayed.now == pytest.approx(0.644)
    restored = VirtualClock(TimeModel(NET, 0.0, 3), events=[])
    restored.load_state_dict(clock.state_dict())
    assert restored.replay(0.2)[1] == pytest.approx(after)
