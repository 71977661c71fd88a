"""A fault-tolerant desloc job on this machine, driven from Python: a Lighthouse and N workers
(``desloc train --ft``), each a real process, that can be SIGKILLed and restarted.

Used by ``benchmarks/ft_recovery.py`` (crash -> next sync, restart -> rejoin times) and
``tests/test_ft.py`` (kill / restart / reference), ``tests/test_ft_failures.py`` (injected
failures: ``extra_env={"DESLOC_FT_FAULT": ...}``). Needs torchft (``pip install -e '.[ft]'``).
Everything binds to 127.0.0.1.

    job = FtJob(out, workers=3, train_args=["--steps", "160", "--kx", "4"])
    job.start()                       # lighthouse + workers 0..N-1
    job.wait_step(2, 24); job.kill(2) # SIGKILL worker 2 once it has logged step 24
    job.launch(2)                     # the same command again: it rejoins and heals from a peer
    rcs = job.wait()                  # every worker's exit code
    job.rounds(0)                     # worker 0's ft.jsonl rows
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FtJob:
    def __init__(self, out: str | Path, workers: int, train_args: list[str], min_replicas: int = 2,
                 heartbeat_timeout_ms: int = 1000, launcher: str = "python", extra_env: dict | None = None):
        self.out = Path(out)
        self.workers = workers
        self.train_args = list(train_args)
        self.min_replicas = min_replicas
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.launcher = launcher  # "python" (a plain process) or "torchrun" (one agent per worker)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "RUST_LOG": "error", "PYTHONUNBUFFERED": "1",
                    **(extra_env or {})}
        self.lighthouse_addr = f"127.0.0.1:{free_port()}"
        self.lighthouse: subprocess.Popen | None = None
        self.procs: dict[int, subprocess.Popen] = {}
        self.lives: dict[int, int] = {}
        self.events: list[dict] = []  # what the harness did, with wall times (time.time())
        self.out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------- processes
    def start(self) -> None:
        self.start_lighthouse()
        for i in range(self.workers):
            self.launch(i)

    def start_lighthouse(self) -> None:
        log = open(self.out / "lighthouse.log", "w")
        self.lighthouse = subprocess.Popen(
            [sys.executable, "-m", "desloc", "ft-lighthouse", "--bind", self.lighthouse_addr, "--min-replicas",
             str(self.min_replicas), "--heartbeat-timeout-ms", str(self.heartbeat_timeout_ms),
             "--join-timeout-ms", "2000"], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + 60
        host, port = self.lighthouse_addr.split(":")
        while time.time() < deadline:
            if self.lighthouse.poll() is not None:
                raise RuntimeError(f"the lighthouse exited: {(self.out / 'lighthouse.log').read_text()}")
            try:
                socket.create_connection((host, int(port)), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the lighthouse did not start listening within 60 s")

    def command(self, i: int) -> list[str]:
        train = ["train", "--ft", "--replica-id", str(i), "--workers", str(self.workers), "--out", str(self.out),
                 "--lighthouse", self.lighthouse_addr, *self.train_args]
        if self.launcher == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "1",
                    "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                    "-m", "desloc", *train]
        return [sys.executable, "-m", "desloc", *train]

    def launch(self, i: int) -> subprocess.Popen:
        life = self.lives.get(i, 0)
        self.lives[i] = life + 1
        log = open(self.out / f"worker{i}.life{life}.log", "w")
        cmd = self.command(i)
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.events.append({"event": "launch", "worker": i, "t": time.time()})
        return self.procs[i]

    def worker_pid(self, i: int) -> int:
        """The pid of worker i's training process (under torchrun: the agent's child, from the lock file)."""
        if self.launcher == "python":
            return self.procs[i].pid
        lock = self.out / f"replica{i}" / ".lock"
        return int(lock.read_text().split()[0])

    def kill(self, i: int) -> float:
        """SIGKILL worker i's training process; returns the wall time of the kill."""
        pid = self.worker_pid(i)
        os.kill(pid, signal.SIGKILL)
        t = time.time()
        self.events.append({"event": "kill", "worker": i, "pid": pid, "t": t})
        if self.launcher == "python":
            self.procs[i].wait(30)
        return t

    def wait_step(self, i: int, step: int, timeout: float = 300) -> None:
        """Until worker i has logged a metrics row at or after ``step``."""
        path = self.out / f"replica{i}" / "metrics.jsonl"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        if json.loads(line)["step"] >= step:
                            return
                    except (ValueError, KeyError):
                        pass  # a line being written
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"worker {i} exited (rc {self.procs[i].returncode}) before step {step}:\n"
                                   + self.log(i))
            time.sleep(0.02)
        raise TimeoutError(f"worker {i} did not reach step {step} in {timeout} s:\n" + self.log(i))

    def wait(self, timeout: float = 600) -> dict[int, int]:
        deadline = time.time() + timeout
        rcs = {}
        for i, p in self.procs.items():
            try:
                rcs[i] = p.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                rcs[i] = -9
        return rcs

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(30)
        if self.lighthouse is not None and self.lighthouse.poll() is None:
            self.lighthouse.send_signal(signal.SIGTERM)
            try:
                self.lighthouse.wait(10)
            except subprocess.TimeoutExpired:
                self.lighthouse.kill()

    def __enter__(self) -> "FtJob":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --------------------------------------------------------------------------- records
    def log(self, i: int) -> str:
        life = self.lives.get(i, 1) - 1
        path = self.out / f"worker{i}.life{life}.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def rounds(self, i: int) -> list[dict]:
        path = self.out / f"replica{i}" / "ft.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def summary(self, i: int) -> dict:
        return json.loads((self.out / f"replica{i}" / "summary.json").read_text())

    def final_model(self, i: int, step: int) -> dict[str, torch.Tensor]:
        path = self.out / f"replica{i}" / "checkpoints" / f"step-{step:08d}" / "rank0.pt"
        return torch.load(path, map_location="cpu", weights_only=False)["model"]["module"]


def recovery_times(job: FtJob, victim: int, kill_t: float) -> dict:
    """From the records: the survivors' first committed round after the kill (crash -> next sync)
    and the victim's first round of its next life (restart -> rejoined), in seconds."""
    survivors = [i for i in range(job.workers) if i != victim]
    after = {}
    for i in survivors:
        commits = [r for r in job.rounds(i) if r["event"] == "commit" and r["committed"] and r["t"] > kill_t]
        after[i] = commits[0] if commits else None
    relaunch = [e["t"] for e in job.events if e["event"] == "launch" and e["worker"] == victim and e["t"] > kill_t]
    rejoin = [r for r in job.rounds(victim) if r["event"] == "round" and r["t"] > kill_t]
    healed = [r for r in rejoin if r.get("healed_from") is not None]
    return {
        "crash_to_next_sync_s": {i: (c["t"] - kill_t if c else None) for i, c in after.items()},
        "next_sync_step": {i: (c["step"] if c else None) for i, c in after.items()},
        "next_sync_participants": {i: (c["participants"] if c else None) for i, c in after.items()},
        "restart_to_rejoin_s": (rejoin[0]["t"] - relaunch[0]) if rejoin and relaunch else None,
        "rejoin_quorum_wait_s": rejoin[0]["quorum_s"] if rejoin else None,
        "healed_from": healed[0]["healed_from"] if healed else None,
        "healed_at_step": healed[0]["healed_step"] if healed else None,
    }
