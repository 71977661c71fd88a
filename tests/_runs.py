"""Helpers shared by the end-to-end tests: the environment of a ``desloc`` subprocess, run the CLI
(optionally under torchrun) and compare the final per-worker state of two runs, whichever engine
wrote them."""

import os
import subprocess
import sys

import torch

from desloc.records import RunDir

# what torchrun sets for its workers: cleared where a process must not look like one of them
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def cli_env(cache=None, **extra: str) -> dict[str, str]:
    """``os.environ`` for a ``desloc`` subprocess: one thread (the machine is shared), none of
    torchrun's variables (a plain ``desloc`` must not take itself for a torchrun worker),
    ``DESLOC_CACHE=cache`` where given, then ``extra``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in TORCHRUN_VARS:
        env.pop(k, None)
    if cache is not None:
        env["DESLOC_CACHE"] = str(cache)
    env.update(extra)
    return env


def desloc(args, env, torchrun=0, timeout=240):
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "desloc"] + args
    else:
        cmd = [sys.executable, "-m", "desloc"] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def final_state(run, workers=2):
    """Per-worker parameters and optimizer state of the last checkpoint, engine-independent."""
    rd = RunDir(run)
    first = rd.load_checkpoint(0)
    if "stacked" in first["model"]:
        params = [{k: v[m] for k, v in first["model"]["stacked"].items()} for m in range(workers)]
        opt = first["optimizer"]["inner"]["state"]
        states = [{i: {n: t[m] for n, t in s.items() if t.dim() > 0} for i, s in opt.items()} for m in range(workers)]
    else:
        ck = [rd.load_checkpoint(r) for r in range(workers)]
        params = [c["model"]["module"] for c in ck]
        states = [{i: {n: t for n, t in s.items() if t.dim() > 0} for i, s in c["optimizer"]["inner"]["state"].items()}
                  for c in ck]
    return params, states


def assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert len(pa) == len(pb)
    for m in range(len(pa)):
        assert sorted(pa[m]) == sorted(pb[m])
        for k in pa[m]:
            assert torch.equal(pa[m][k], pb[m][k]), f"worker {m} param {k}"
        assert sorted(sa[m]) == sorted(sb[m])
        for i in sa[m]:
            for n in sa[m][i]:
                assert torch.equal(sa[m][i][n], sb[m][i][n]), f"worker {m} state {i}/{n}"


def stop_and_resume(args, env, out, stop_after=7):
    """``desloc train ARGS --stop-after N`` into ``out``, then ``--resume`` to the end."""
    first = desloc(["train", *args, "--out", str(out), "--stop-after", str(stop_after)], env)
    assert first.returncode == 0, first.stderr
    assert RunDir(out).latest_step() == stop_after and not (out / "summary.json").exists()
    second = desloc(["train", "--out", str(out), "--resume"], env)
    assert second.returncode == 0, second.stderr
