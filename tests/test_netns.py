"""The rate-limited namespace network of ``benchmarks/slow_network.py`` builds, limits, carries gloo
and is always removed.

Root only (network namespaces, veth, tc): skipped with the reason elsewhere. One ``SlowNetwork``
with 2 workers at 50mbit: ``tc qdisc show`` lists tbf on both ends of each link; a 1 MB TCP
transfer takes at least the time the rate allows in both directions (and less time without the
qdisc, so the limit, not the machine, set it); a 2-rank gloo all-reduce across the two
namespaces gives the right sum. After the ``with`` block no namespace with the network's prefix
remains, also when the body raises.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import slow_network as sn

pytestmark = pytest.mark.timeout(120)

AVAILABLE, WHY = sn.netns_available()
needs_netns = pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces unavailable: {WHY}")

RATE = "50mbit"
NBYTES = 1_000_000  # 0.16 s at 50 Mbit/s


def _prefix(tag: str) -> str:
    return f"desloc-snt-{tag}-"  # SlowNetwork appends the pid


@needs_netns
def test_rate_limited_network_carries_gloo_and_is_removed():
    prefix = _prefix("main")
    with sn.SlowNetwork(2, prefix=prefix) as net:
        assert sorted(sn.list_namespaces(net.prefix)) == sorted(net.namespaces())
        fast = [sn.transfer_seconds(net, 0, 1, NBYTES), sn.transfer_seconds(net, 1, 0, NBYTES)]
        net.set_rate(RATE)
        for rank in (0, 1):
            shown = net.qdiscs(rank)
            for side in ("worker_side", "bridge_side"):
                assert "tbf" in shown[side] and "50Mbit" in shown[side], (rank, side, shown[side])
        floor = NBYTES * 8 / sn.rate_bps(RATE)  # the payload alone, headers not counted
        for src, dst, unlimited in ((0, 1, fast[0]), (1, 0, fast[1])):
            t = sn.transfer_seconds(net, src, dst, NBYTES)
            assert t >= 0.95 * floor, f"{src}->{dst}: {NBYTES} B in {t:.3f} s, faster than {RATE} allows"
            assert t < 20 * floor, f"{src}->{dst}: {t:.3f} s, far slower than {RATE}"
            assert t > 2 * unlimited, f"{src}->{dst}: {t:.3f} s limited vs {unlimited:.3f} s without the qdisc"
        out = sn.gloo_allreduce(net, numel=1000, reps=2, timeout=90)
        assert out["check_sum"] == 3.0  # ranks contribute 1 and 2
        assert len(out["seconds_max_over_ranks"]) == 2
        net.set_rate(None)
        assert "tbf" not in net.qdiscs(0)["worker_side"]
        names = net.namespaces()
    assert not sn.list_namespaces(prefix), "namespaces left behind"
    assert not any(os.path.exists(f"/run/netns/{n}") for n in names)


@needs_netns
def test_teardown_when_the_body_raises():
    prefix = _prefix("raise")
    net = sn.SlowNetwork(2, prefix=prefix)
    with pytest.raises(RuntimeError, match="boom"), net:
        net.set_rate(RATE)
        assert len(sn.list_namespaces(prefix)) == 3
        raise RuntimeError("boom")
    assert not sn.list_namespaces(prefix), "namespaces left behind after an exception"
    net.teardown()  # idempotent


def test_rate_parsing_and_burst():
    assert sn.rate_bps("20mbit") == 20e6
    assert sn.rate_bps("1Gbit") == 1e9
    assert sn.rate_bps("500kbit") == 5e5
    with pytest.raises(ValueError):
        sn.rate_bps("20mbps")
    assert sn.tbf_burst("20mbit") == 32 * 1024  # the floor
    assert sn.tbf_burst("1gbit") == 125_000  # 1 ms of the rate
    net = sn.SlowNetwork(4, prefix="desloc-snt-names-")
    assert all(len(n) <= 15 for n in (net.bridge, *net.worker_if, *net.bridge_if))
    assert net.exec_prefix(2) == ["ip", "netns", "exec", net.worker_ns[2]]
    assert net.addr(0) == "10.213.0.1"
