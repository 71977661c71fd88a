"""TorchftComm: desloc's syncs through a torchft Manager (the engine of ``desloc train --ft``).

Two replica groups run as threads against a real torchft Lighthouse on 127.0.0.1 (the recipe of
shared/environment.md). Skipped when torchft is not installed (``pip install -e '.[ft]'``).

* local-adam through torchft equals the simulator bit for bit at M = 2 (same SUM-then-divide).
* A sync that a replica group reports as failed is all-or-nothing inside that group: its tensors
  go back exactly to their values before the call and its ledger does not count the call. (torchft
  decides commits per replica group; the healthy group keeps the average. Undoing the rest of the
  step and healing the failed group at its redo's round is :mod:`desloc.ft`'s part, tested with
  real processes in tests/test_ft_failures.py.)
"""

from __future__ import annotations

import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch

torchft = pytest.importorskip("torchft", reason="torchft is an optional extra: pip install -e '.[ft]'")

from torch.distributed import TCPStore  # noqa: E402

from desloc.algorithms import MethodConfig, build_method  # noqa: E402
from desloc.comm.torchft_comm import TorchftComm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_workload as wl  # noqa: E402

STEPS = 6  # K = 2: syncs after steps 2, 4, 6


def _replicas(body, n: int = 2):
    """Run ``body(i, comm)`` in n replica threads; returns their results (re-raises failures)."""
    from torchft import Manager, ProcessGroupGloo
    from torchft.coordination import LighthouseServer

    for i in range(n):
        MODELS[i] = wl.make_model()
    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=n)
    results, errors = {}, []

    def run(i: int) -> None:
        try:
            store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
            manager = Manager(pg=ProcessGroupGloo(), load_state_dict=lambda sd: None, state_dict=lambda: {},
                              min_replica_size=n, use_async_quorum=False, init_sync=False, rank=0, world_size=1,
                              store_addr="127.0.0.1", store_port=store.port, lighthouse_addr=lighthouse.address(),
                              replica_id=f"replica{i}", timeout=timedelta(seconds=30),
                              quorum_timeout=timedelta(seconds=30))
            try:
                results[i] = body(i, TorchftComm(manager))
            finally:
                manager.shutdown(wait=False)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    lighthouse.shutdown()
    if errors:
        raise errors[0]
    assert len(results) == n, "a replica did not finish"
    return [results[i] for i in range(n)]


MODELS: dict[int, torch.nn.Module] = {}


def _build(comm, i):
    model = MODELS[i]  # built in the main thread: make_model seeds the global RNG, not thread-safe
    icfg = wl.inner_config("adamw")
    opt = build_method(MethodConfig("local-adam", period_x=2), icfg.build(model.parameters()), comm,
                       icfg.state_roles())
    return model, opt


@pytest.mark.timeout(200)
def test_local_adam_through_torchft_equals_the_simulator_bitwise():
    def body(i, comm):
        model, opt = _build(comm, i)
        wl.train_dist(model, opt, i, 0, STEPS)
        return wl.snapshot_dist(model, opt), comm.committed_syncs

    results = _replicas(body)
    real = wl.stack_ranks([snap for snap, _ in results])
    replicas = wl.StackedReplicas(wl.make_model(), 2)
    icfg = wl.inner_config("adamw")
    sim_opt = build_method(MethodConfig("local-adam", period_x=2), icfg.build(replicas.parameters()),
                           wl.SimulatedComm(2), icfg.state_roles())
    wl.train_sim(replicas, sim_opt, 0, STEPS)
    sim = wl.snapshot_sim(replicas, sim_opt)
    for part in ("params", "states"):
        for name, value in sim[part].items():
            assert torch.equal(value, real[part][name]), f"{part} {name}"
    assert [n for _, n in results] == [3, 3]
    assert results[0][0]["ledger"]["sent_by_tag"] == sim["ledger"]["sent_by_tag"]


@pytest.mark.timeout(200)
def test_a_failed_sync_is_all_or_nothing_in_its_replica_group():
    def body(i, comm):
        model, opt = _build(comm, i)
        wl.train_dist(model, opt, i, 0, 3)  # synced after step 2
        if i == 1:  # replica 1's next sync fails after its all-reduce, before the commit
            commit = comm.manager.should_commit

            def failing_commit(*args, **kwargs):
                comm.manager.report_error(RuntimeError("injected failure"))
                return commit(*args, **kwargs)

            comm.manager.should_commit = failing_commit
        handed = {}
        flat_call = comm.all_reduce_mean_flat

        def spy(buffers, tags, hidden_steps=None):
            handed.update({tag: b.clone() for b, tag in zip(buffers, tags)})  # the values before the sync
            return flat_call(buffers, tags, hidden_steps)

        comm.all_reduce_mean_flat = spy
        sent = dict(comm.ledger.sent_by_tag)
        wl.train_dist(model, opt, i, 3, 4)  # step 4: the sync that fails
        synced = {tag: opt._flat[tag].buffers[0].clone() for tag in handed}
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        return handed, synced, after, sent, dict(comm.ledger.sent_by_tag), comm.failed_syncs

    results = _replicas(body)
    (handed0, synced0, after0, sent0, sent_after0, failed0), (handed1, synced1, after1, sent1, sent_after1, failed1) = \
        results
    assert (failed0, failed1) == (0, 1)
    assert set(handed1) == {"params", "exp_avg", "exp_avg_sq"}
    for tag, value in handed1.items():  # the failing group: every tensor exactly as before the call
        assert torch.equal(synced1[tag], value), tag
    for tag, value in handed0.items():  # the healthy group kept the average of both groups' values
        assert torch.equal(synced0[tag], (value + handed1[tag]) / 2), tag
    assert sent_after1 == sent1 and sent_after0 != sent0
