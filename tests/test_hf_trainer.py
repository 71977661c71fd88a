"""The Hugging Face Trainer integration (``desloc.integrations.transformers``) under torchrun.

One ``torchrun --nproc_per_node 2`` spawn (gloo, CPU) runs this file as its worker (``python
tests/test_hf_trainer.py worker OUT``; spawning and importing transformers cost seconds, the runs
milliseconds) and every rank saves what it computed; the tests compare:

1. ``DeslocTrainer`` (DES-LOC, K_x = 2 and the default K_u = 6, K_v = 12, so every tag syncs;
   gradient accumulation 2; the Trainer's norm clipping and linear LR schedule) against the same
   model trained by ``build_method`` in a plain loop on the batches the Trainer fed that rank:
   parameters, optimizer states and the ledger bitwise equal (same kernels on the same tensors;
   the plain loop replays the Trainer's micro-batches with its loss normalizer
   ``num_items_in_batch``, the AdamW of ``args.optim`` with the args' weight decay, the Trainer's
   ``clip_grad_norm_`` and its linear schedule).
2. ``DeslocTrainer(method="ddp")`` against the stock ``Trainer`` (accelerate's DDP): bitwise equal
   at M = 2 (desloc sums then halves, DDP halves then sums: for two addends the same float, a
   division by 2 being exact).
3. Stopping at the step-6 checkpoint (``save_steps``) and resuming with ``resume_from_checkpoint``
   gives the uninterrupted run's parameters, optimizer states and ledger, bitwise.
4. ``examples/hf_trainer.py`` ends with one JSON line.

Also: the Trainer's log rows carry the method's bytes, the method stepped once per optimizer
step (not per micro-batch), and the model was not wrapped in DDP. Skipped without transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import cli_env  # noqa: E402

STEPS, SAVE_AT, GA, KX = 12, 6, 2, 2
SEQ, BATCH = 16, 2


def _tiny_model():
    sys.path.insert(0, str(ROOT / "examples"))
    import hf_trainer

    return hf_trainer.build_model(seed=0, n_layer=1, n_embd=16, n_head=2, seq_len=SEQ)


def _dataset():
    import numpy as np

    sys.path.insert(0, str(ROOT / "examples"))
    import hf_trainer

    tokens = np.random.default_rng(0).integers(0, 256, size=SEQ * 512).astype(np.uint16)
    return hf_trainer.Blocks(tokens, SEQ, 512)


def _args(out: Path, **extra):
    sys.path.insert(0, str(ROOT / "examples"))
    import hf_trainer

    return hf_trainer.training_args(str(out), STEPS, batch_size=BATCH, lr=3e-3, **extra)


def _snapshot(model, opt) -> dict:
    opt.wait_for_syncs()
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "states": {name: {n: t.clone() for n, t in opt.state[p].items()}  # by name: the Trainer groups
                       for name, p in model.named_parameters()},                # decay / no-decay apart
            "global_step": opt.global_step, "ledger": opt.comm.ledger.state_dict()}


def _worker(out: Path) -> None:
    """Every run on this rank; saves ``rank<r>.pt``."""
    from transformers import Trainer, get_linear_schedule_with_warmup

    from desloc import MethodConfig, build_method
    from desloc.comm.torch_dist import TorchDistComm
    from desloc.integrations.transformers import DeslocTrainer, state_roles_of

    class Recording(DeslocTrainer):
        """Keeps every micro-batch the Trainer feeds (the plain loop replays them)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen.append({k: v.clone() for k, v in inputs.items()})
            self.items.append(num_items_in_batch)
            self.wrapped_types.append(type(model).__name__)
            return super().training_step(model, inputs, num_items_in_batch)

    def run(cls, name, method=None, resume=None, **extra):
        kwargs = {"method": method} if method is not None else {}
        trainer = cls(model=_tiny_model(), args=_args(out / name, **extra), train_dataset=_dataset(), **kwargs)
        trainer.seen, trainer.items, trainer.wrapped_types = [], [], []
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    rank = int(os.environ["RANK"])
    res: dict = {}
    method = MethodConfig("desloc", period_x=KX)
    common = {"grad_accum": GA, "average_tokens_across_devices": False, "max_grad_norm": 1.0}

    # 1. the integration against a plain loop on the same batches
    full = run(Recording, "full", method, save_steps=SAVE_AT, **common)
    res["full"] = _snapshot(full.model, full.desloc_optimizer)
    res["log_history"] = full.state.log_history
    res["wrapped_types"] = sorted(set(full.wrapped_types))
    res["trainer_steps"] = full.state.global_step
    res["ckpt_files"] = sorted(os.listdir(out / "full" / f"checkpoint-{SAVE_AT}"))

    model = _tiny_model()
    cls, kw = Trainer.get_optimizer_cls_and_kwargs(full.args, model)
    inner = cls(model.parameters(), weight_decay=full.args.weight_decay, **kw)  # the Trainer's groups' decay
    opt = build_method(method, inner, TorchDistComm(), state_roles_of(inner))
    sched = get_linear_schedule_with_warmup(opt, 0, STEPS)
    model.train()
    for step in range(STEPS):
        micro = full.seen[step * GA:(step + 1) * GA]
        n_items = full.items[step * GA]  # the Trainer's loss normalizer of this window (its own count)
        for b in micro:
            model(**b, num_items_in_batch=n_items).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.zero_grad()
    opt.finish_syncs()
    res["plain"] = _snapshot(model, opt)

    # 3. resume from the step-6 checkpoint
    resumed = run(Recording, "resumed", method, resume=str(out / "full" / f"checkpoint-{SAVE_AT}"),
                  save_steps=SAVE_AT, **common)
    res["resumed"] = _snapshot(resumed.model, resumed.desloc_optimizer)
    res["resumed_batches_equal"] = all(
        all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(resumed.seen, full.seen[SAVE_AT * GA:]))
    res["resumed_batches"] = len(resumed.seen)

    # 2. method ddp against the Trainer's own DDP
    ddp = run(Recording, "ddp", "ddp", max_grad_norm=0.0)
    res["ddp"] = _snapshot(ddp.model, ddp.desloc_optimizer)
    stock = Trainer(model=_tiny_model(), args=_args(out / "stock", max_grad_norm=0.0), train_dataset=_dataset())
    stock.train()
    res["stock_wrapped"] = type(stock.model_wrapped).__name__
    res["stock"] = {"params": {k: v.detach().clone() for k, v in stock.model.named_parameters()}}
    torch.save(res, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("transformers", reason="the Trainer integration needs transformers (pip install '.[hf]')")
    pytest.importorskip("accelerate", reason="the Trainer integration needs accelerate (pip install '.[hf]')")
    out = tmp_path_factory.mktemp("hf")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "worker", str(out)]
    proc = subprocess.run(cmd, env=cli_env(out / "cache"), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what} {k}: max |diff| {(a[k] - b[k]).abs().max().item():.3e}"


def _assert_same_run(x: dict, y: dict, what: str) -> None:
    _assert_equal(x["params"], y["params"], f"{what} param")
    assert sorted(x["states"]) == sorted(y["states"])
    for name in x["states"]:
        _assert_equal(x["states"][name], y["states"][name], f"{what} state of {name}:")
    assert x["global_step"] == y["global_step"] == STEPS
    assert x["ledger"] == y["ledger"], what


@pytest.mark.timeout(280)
def test_trainer_equals_plain_build_method_loop(ranks):
    for r, res in enumerate(ranks):
        assert res["trainer_steps"] == STEPS
        _assert_same_run(res["full"], res["plain"], f"rank {r}")
        assert res["wrapped_types"] == ["GPT2LMHeadModel"]  # never DistributedDataParallel
    # the ranks trained on different batches, but step 12 is a parameter average (K_x = 2)
    _assert_equal(ranks[0]["full"]["params"], ranks[1]["full"]["params"], "ranks after the final sync")
    tags = ranks[0]["full"]["ledger"]
    assert tags  # the ledger counted the syncs


def test_bytes_in_log_history(ranks):
    rows = [row for row in ranks[0]["log_history"] if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # one optimizer step per GA window
    param_bytes = sum(t.numel() * 4 for t in ranks[0]["full"]["params"].values())
    last = rows[-1]
    # K_x = 2, K_u = 6, K_v = 12: 6 parameter averages, 2 first-moment and 1 second-moment average
    assert last["desloc/bytes_params"] == 6 * param_bytes
    assert last["desloc/bytes_exp_avg"] == 2 * param_bytes
    assert last["desloc/bytes_exp_avg_sq"] == 1 * param_bytes
    assert last["desloc/bytes_sent"] == 9 * param_bytes
    assert last["desloc/ratio_vs_ddp"] == pytest.approx(STEPS / 9)
    assert rows[0]["desloc/bytes_sent"] == 0 and rows[1]["desloc/bytes_sent"] == param_bytes


def test_method_ddp_equals_trainer_ddp(ranks):
    for r, res in enumerate(ranks):
        assert res["stock_wrapped"] == "DistributedDataParallel"  # the stock Trainer did wrap it
        _assert_equal(res["ddp"]["params"], res["stock"]["params"], f"rank {r} ddp vs Trainer DDP, param")


def test_resume_from_checkpoint_is_bitwise(ranks):
    for r, res in enumerate(ranks):
        assert f"desloc-rank{r}-of-2.pt" in res["ckpt_files"]
        assert res["resumed_batches"] == (STEPS - SAVE_AT) * GA and res["resumed_batches_equal"]
        _assert_same_run(res["full"], res["resumed"], f"rank {r} resumed")


@pytest.mark.timeout(280)
def test_example_prints_one_json_line(tmp_path, token_cache_dir):
    pytest.importorskip("transformers", reason="the Trainer integration needs transformers (pip install '.[hf]')")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "hf_trainer.py"), "--method", "desloc", "--kx", "2", "--max-steps", "4",
           "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=cli_env(token_cache_dir), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"bytes_sent", "bytes_by_state", "ratio_vs_ddp", "final_loss"}
    assert result["bytes_sent"] == result["bytes_by_state"]["params"] > 0  # K_x = 2: two averages in 4 steps
    assert result["ratio_vs_ddp"] == pytest.approx(2.0)
    assert result["final_loss"] > 0


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    torch.set_num_threads(1)
    _worker(Path(sys.argv[2]))
