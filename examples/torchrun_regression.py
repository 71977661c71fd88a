"""Wrap AdamW in DES-LOC on real processes.

    torchrun --standalone --nproc_per_node 4 examples/torchrun_regression.py --method desloc --kx 16

Each rank fits the same small MLP on its own shard of a synthetic regression task; the wrapper
averages parameters every K_x steps and the Adam moments every K_u / K_v steps over gloo (CPU)
or NCCL (GPU). Rank 0 prints the loss and the measured communication.
"""

import argparse

import torch
from torch import nn

from desloc import InnerConfig, MethodConfig, build_method
from desloc.comm.torch_dist import TorchDistComm, init_from_env, shutdown


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="desloc")
    ap.add_argument("--kx", type=int, default=16)
    ap.add_argument("--steps", type=int, default=256)
    args = ap.parse_args()

    backend = init_from_env()
    comm = TorchDistComm()
    device = "cuda" if backend == "nccl" else "cpu"
    torch.manual_seed(0)  # identical initialisation on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1)).to(device)
    true_w = torch.randn(16, 1, generator=torch.Generator().manual_seed(1)).to(device)
    data = torch.Generator().manual_seed(100 + comm.rank)  # each rank its own stream

    inner_cfg = InnerConfig("adamw", lr=3e-3)
    opt = build_method(MethodConfig(args.method, period_x=args.kx), inner_cfg.build(model.parameters()),
                       comm, inner_cfg.state_roles())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    for step in range(1, args.steps + 1):
        x = torch.randn(32, 16, generator=data).to(device)
        y = torch.tanh(x @ true_w / 2)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if comm.rank == 0 and step % (args.steps // 4) == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}")
    if comm.rank == 0:
        print({k: v for k, v in opt.comm_summary().items()})
    shutdown()


if __name__ == "__main__":
    main()
