"""A stock Hugging Face Trainer script, trained with a desloc method.

    torchrun --standalone --nproc_per_node 2 examples/hf_trainer.py --method desloc --kx 4 --max-steps 8

A GPT-2-architecture model built from a config (random init, nothing downloaded) learns the next
byte of the King James Bible (desloc's built-in corpus, byte tokenizer). The lines that make it
a desloc run are marked ``# desloc``; ``--method trainer-ddp`` runs the unchanged Trainer (its
DDP) for comparison. Rank 0 ends by printing one JSON line: ``bytes_sent`` (bytes one worker
sent), ``bytes_by_state``, ``ratio_vs_ddp`` (DDP's bytes over these, null when nothing was sent)
and ``final_loss`` (the last logged training loss, the mean over ranks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from desloc import MethodConfig  # desloc
from desloc.data import Corpus, DataConfig
from desloc.integrations.transformers import DeslocTrainer  # desloc


class Blocks(torch.utils.data.Dataset):
    """Consecutive ``seq_len``-token blocks of the corpus' training tokens (labels = inputs: the
    model shifts them)."""

    def __init__(self, tokens, seq_len: int, n_blocks: int):
        n_blocks = min(n_blocks, len(tokens) // seq_len)
        self.ids = torch.from_numpy(tokens[: n_blocks * seq_len].astype("int64")).view(n_blocks, seq_len)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, seq_len: int = 64):
    torch.manual_seed(seed)  # the same initial model on every rank
    config = GPT2Config(vocab_size=256, n_positions=seq_len, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                        bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def build_dataset(seq_len: int = 64, n_blocks: int = 4096) -> Blocks:
    corpus = Corpus.prepare(DataConfig(source="kjv", tokenizer="byte"))
    return Blocks(corpus.train_tokens, seq_len, n_blocks)


def training_args(out: str, max_steps: int, batch_size: int = 8, grad_accum: int = 1, lr: float = 1e-3,
                  save_steps: int = 0, logging_steps: int = 1, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=lr, weight_decay=0.0, warmup_steps=0,
        lr_scheduler_type="linear", logging_steps=logging_steps, report_to="none", disable_tqdm=True,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        use_cpu=not torch.cuda.is_available(), seed=0, dataloader_num_workers=0, **extra)


def make_trainer(method: str, kx: int, model, args, dataset) -> Trainer:
    if method == "trainer-ddp":
        return Trainer(model=model, args=args, train_dataset=dataset)
    return DeslocTrainer(model=model, args=args, train_dataset=dataset,  # desloc
                         method=MethodConfig(method, period_x=kx) if method != "ddp" else MethodConfig("ddp"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="desloc",
                    help="a desloc method (desloc, ddp, local-adam, diloco, ...) or trainer-ddp (the stock Trainer)")
    ap.add_argument("--kx", type=int, default=16, help="K_x, steps between parameter averages")
    ap.add_argument("--max-steps", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per rank and micro-batch")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0 = never)")
    ap.add_argument("--out", default=None, help="the Trainer's output_dir (default: a temporary folder)")
    ap.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    a = ap.parse_args()

    out = a.out or tempfile.mkdtemp(prefix="desloc-hf-")
    args = training_args(out, a.max_steps, a.batch_size, a.grad_accum, a.lr, a.save_steps)
    trainer = make_trainer(a.method, a.kx, build_model(seq_len=a.seq_len), args, build_dataset(a.seq_len))
    trainer.train(resume_from_checkpoint=a.resume)

    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    if isinstance(trainer, DeslocTrainer):
        summary = trainer.desloc_optimizer.comm_summary()
        ratio = summary["ratio_vs_ddp"]
        result = {"bytes_sent": summary["bytes_sent"], "bytes_by_state": summary["bytes_by_state"],
                  "ratio_vs_ddp": ratio if math.isfinite(ratio) else None}
    else:  # the Trainer's DDP all-reduces one model-sized gradient per step (computed: it counts nothing)
        sent = trainer.state.global_step * sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        result = {"bytes_sent": sent, "bytes_by_state": {"grads": sent}, "ratio_vs_ddp": 1.0}
    result["final_loss"] = losses[-1] if losses else None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
