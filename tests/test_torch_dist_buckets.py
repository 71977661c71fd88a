"""TorchDistComm's bucketing: many small buckets, mixed dtypes, strided tensors, buffer reuse."""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

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
        expected = torch.stack([t.float() for t in expected_inputs]).sum(0) / WORLD
        for r in range(WORLD):
            got = results[r]["tensors"][i]
            assert got.dtype == expected_inputs[0].dtype and got.shape == expected_inputs[0].shape
            tol = 1e-2 if got.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
        # every rank holds the identical result
        assert all(torch.equal(results[0]["tensors"][i], results[r]["tensors"][i]) for r in range(WORLD))
    ledger = results[0]["ledger"]
    assert ledger["bytes_by_tag"]["t0"] == 2 * 35 * 4 and ledger["bytes_by_tag"]["t3"] == 2 * 3 * 2
    assert results[0]["buckets"] > 2 * 4  # several buckets per call ...
    assert ledger["collectives"] == 2  # ... and the ledger counts calls (as the simulator does)
