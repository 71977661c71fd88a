"""Per-step cost of the Trainer integration against the same Trainer script with its own DDP, on ONE process.

One ``torchrun --nproc_per_node 1`` process (gloo, CPU, one thread) runs ``examples/hf_trainer.py``'s
model, data and TrainingArguments under three arms, interleaved (the arm order rotates every rep):

* ``trainer-ddp``    -- the stock ``transformers.Trainer`` (accelerate wraps the model in DDP; with
  one process its all-reduce moves nothing over a network),
* ``desloc``         -- ``DeslocTrainer(method=MethodConfig("desloc", period_x=KX))``: no DDP, the
  method's syncs through a one-process ``TorchDistComm`` every K_x / K_u / K_v steps,
* ``desloc-ddp``     -- ``DeslocTrainer(method="ddp")``: desloc's gradient all-reduce every step.

A step's time is the interval between consecutive ``on_step_end`` callbacks (forward, backward,
the Trainer's grad-norm, optimizer step, scheduler, logging), the first ``warmup`` steps of each
run dropped; a run's figure is the median over its steps, an arm's the median over reps, and the
ratio is that of medians (with the per-rep paired ratios and a bootstrap interval,
``_common.compare``). Sizes: the example's model (2 layers, d = 64) and a larger one
(4 layers, d = 256), where the Trainer's own per-step work dominates less.

    python benchmarks/hf_trainer_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

ARMS = ("trainer-ddp", "desloc", "desloc-ddp")
SIZES = {"example": {"n_layer": 2, "n_embd": 64, "n_head": 2}, "larger": {"n_layer": 4, "n_embd": 256, "n_head": 4}}


def _worker(cfg: dict) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback

    import hf_trainer
    from desloc import MethodConfig
    from desloc.integrations.transformers import DeslocTrainer

    torch.set_num_threads(1)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    dataset = hf_trainer.build_dataset(cfg["seq_len"], n_blocks=cfg["steps"] * cfg["batch_size"] + 64)
    out: dict = {}
    for size, shape in SIZES.items():
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for rep in range(cfg["reps"]):
            order = ARMS[rep % 3:] + ARMS[:rep % 3]
            for arm in order:
                model = hf_trainer.build_model(seq_len=cfg["seq_len"], **shape)
                args = hf_trainer.training_args(tempfile.mkdtemp(prefix="hfo-"), cfg["steps"], cfg["batch_size"],
                                                logging_steps=cfg["logging_steps"])
                clock = StepClock()
                if arm == "trainer-ddp":
                    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[clock])
                else:
                    method = MethodConfig("desloc", period_x=cfg["kx"]) if arm == "desloc" else MethodConfig("ddp")
                    trainer = DeslocTrainer(model=model, args=args, train_dataset=dataset, callbacks=[clock],
                                            method=method)
                trainer.train()
                if arm == "trainer-ddp":
                    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
                deltas = [b - a for a, b in zip(clock.ends, clock.ends[1:])][cfg["warmup"]:]
                times[arm].append(statistics.median(deltas))
        out[size] = {"shape": shape, "params": sum(p.numel() for p in model.parameters()),
                     "step_s_per_rep": times}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 reps of 20 steps (a smoke run, not a measurement)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        cfg = json.loads(Path(a.worker).read_text())
        Path(cfg["result"]).write_text(json.dumps(_worker(cfg)))
        return

    from _common import compare, quantiles, write_record

    cfg = {"reps": 3 if a.quick else 7, "steps": 20 if a.quick else 40, "warmup": 5, "batch_size": 8, "seq_len": 64,
           "kx": 16, "logging_steps": 10}
    with tempfile.TemporaryDirectory() as tmp:
        cfg["result"] = str(Path(tmp) / "result.json")
        (Path(tmp) / "cfg.json").write_text(json.dumps(cfg))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
               "--worker", str(Path(tmp) / "cfg.json")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-4000:])
        raw = json.loads(Path(cfg["result"]).read_text())
    summary = {}
    for size, rec in raw.items():
        t = rec["step_s_per_rep"]
        summary[size] = {
            "params": rec["params"],
            "median_step_ms": {arm: 1e3 * statistics.median(t[arm]) for arm in ARMS},
            "step_ms_quantiles": {arm: {k: 1e3 * v for k, v in quantiles(t[arm]).items()} for arm in ARMS},
            "desloc_vs_trainer_ddp": compare(t["desloc"], t["trainer-ddp"], seed=0),
            "desloc_ddp_vs_trainer_ddp": compare(t["desloc-ddp"], t["trainer-ddp"], seed=0),
        }
    path = write_record("hf_trainer_overhead", {"config": {k: v for k, v in cfg.items() if k != "result"},
                                                "raw": raw, "summary": summary, "target_ratio": 1.05})
    for size, s in summary.items():
        print(f"{size:8s} ({s['params']:,} params): step ms " +
              ", ".join(f"{arm} {ms:.2f}" for arm, ms in s["median_step_ms"].items()) +
              f"; desloc/trainer-ddp {s['desloc_vs_trainer_ddp']['ratio_of_medians']:.3f}"
              f", desloc-ddp/trainer-ddp {s['desloc_ddp_vs_trainer_ddp']['ratio_of_medians']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
