"""TorchDistComm's bucketing: many small buckets, mixed dtypes, strided tensors, buffer reuse."""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from _numerics import assert_within, mean_reorder_bound

pytestmark = pytest.mark.numerics  # .ci/run runs these again under ATEN_CPU_CAPABILITY=default

WORLD = 3


def _tensors(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return [
        torch.randn(7, 5, generator=g),                       # float32
        torch.randn(11, generator=g, dtype=torch.float64),     # float64
        torch.randn(6, 4, generator=g).t(),                    # strided (non-contiguous)
        torch.randn(3, generator=g).to(torch.bfloat16),        # bfloat16
        torch.randn(40, generator=g),                          # larger than a bucket
    ]


def _rank(rank, init_file, out_dir):
    import torch.distributed as dist

    from desloc.comm.torch_dist import TorchDistComm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        comm = TorchDistComm(bucket_bytes=64)  # forces several buckets per dtype
        for _ in range(2):  # the second call reuses the flat buffers
            ts = _tensors(rank)
            comm.all_reduce_mean(ts, [f"t{i}" for i in range(len(ts))])
        torch.save({"tensors": ts, "ledger": comm.ledger.state_dict(), "buckets": comm.buckets_reduced},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_bucketed_mean_matches_sum_then_divide():
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_rank, args=(os.path.join(d, "init"), d), nprocs=WORLD, join=True,
                           start_method="spawn")
        results = [torch.load(os.path.join(d, f"{r}.pt")) for r in range(WORLD)]
    inputs = [_tensors(r) for r in range(WORLD)]
    for i, expected_inputs in enumerate(zip(*inputs)):
        stacked = torch.stack([t.double() for t in expected_inputs])
        expected = stacked.sum(0) / WORLD  # in float64: within (gamma_2 + u) max_i |x_i| (fp64) of exact
        # gloo sums the 3 values in the tensor's dtype in some order and divides by 3: within
        # (gamma_2 + u) max_i |x_i| (that dtype) of the exact mean; the two together are within
        # the two-order bound of the tensor's dtype.
        tol = mean_reorder_bound(WORLD, expected_inputs[0].dtype) * stacked.abs().amax(0)
        for r in range(WORLD):
            got = results[r]["tensors"][i]
            assert got.dtype == expected_inputs[0].dtype and got.shape == expected_inputs[0].shape
            assert_within(got, expected, tol, f"tensor {i} ({got.dtype}) rank {r}")
        # every rank holds the identical result
        assert all(torch.equal(results[0]["tensors"][i], results[r]["tensors"][i]) for r in range(WORLD))
    ledger = results[0]["ledger"]
    assert ledger["bytes_by_tag"]["t0"] == 2 * 35 * 4 and ledger["bytes_by_tag"]["t3"] == 2 * 3 * 2
    assert results[0]["buckets"] > 2 * 4  # several buckets per call ...
    assert ledger["collectives"] == 2  # ... and the ledger counts calls (as the simulator does)
