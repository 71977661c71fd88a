"""The sharded path on one GPU with NCCL: FSDP2 + MeshComm + DCP on CUDA, against the unsharded path.

A lent device machine has one GPU, and NCCL does not put two ranks of a communicator on one GPU,
so a 2 x 2 mesh cannot run there. What one GPU can check, under ``torchrun --nproc_per_node 1``
with NCCL (a 1 x 1 mesh: one replica group of one shard):

1. ``same_numerics``: a GPT trained by DES-LOC on CUDA with ``fully_shard`` + :class:`MeshComm`
   equals, bit for bit, the same training with the plain model + :class:`TorchDistComm` (with one
   shard FSDP's all-gather and reduce-scatter are copies): parameters and both Adam moments.
2. ``dcp_roundtrip``: the sharded run's checkpoint state written with DCP from CUDA DTensors and
   read back into fresh ones is bitwise equal.
3. ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` of each arm, and the step time.
4. ``two_ranks_one_gpu`` (``--try-two-ranks``, run separately with ``--nproc_per_node 2``): whether
   NCCL accepts a 1 x 2 mesh on one GPU; the error is recorded if not.

    torchrun --standalone --nproc_per_node 1 benchmarks/sharded_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def _gpt(preset: str, vocab: int, device: str):
    from desloc.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset(preset, vocab_size=vocab)).to(device)


def _train(model, comm, steps: int, batch: int, seq: int, vocab: int, device: str) -> tuple[object, float]:
    from desloc import InnerConfig, MethodConfig, build_method

    inner = InnerConfig("adamw", lr=1e-3, weight_decay=0.1)
    opt = build_method(MethodConfig("desloc", period_x=2, period_u=3, period_v=5), inner.build(list(model.parameters())),
                       comm, inner.state_roles())
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
        torch.cuda.synchronize() if device.startswith("cuda") else None
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        _, loss = model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        loss.backward()
        opt.step()
        torch.cuda.synchronize() if device.startswith("cuda") else None
        times.append(time.perf_counter() - t0)
    return opt, sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="125m")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--try-two-ranks", action="store_true")
    p.add_argument("--diagnose", action="store_true", help="one step: loss, gradient, AdamW (foreach or not) bits")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch.distributed as dist

    from desloc.comm.dcp import load_sharded, save_sharded
    from desloc.comm.fsdp import init_mesh, shard_model
    from desloc.comm.mesh import MeshComm
    from desloc.comm.torch_dist import TorchDistComm, init_from_env

    if a.try_two_ranks and torch.cuda.is_available():  # every rank on the one GPU
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
        backend, device = "nccl", "cuda:0"
    else:
        backend = init_from_env()
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if backend == "nccl" else "cpu"
    record: dict = {"backend": backend, "device": torch.cuda.get_device_name() if backend == "nccl" else "cpu",
                    "torch": torch.__version__, "world_size": dist.get_world_size(), "config": vars(a)}
    if a.try_two_ranks:
        try:
            rmesh = init_mesh(dist.get_world_size(), "cuda" if backend == "nccl" else "cpu")
            model = shard_model(_gpt("tiny", 256, device), rmesh)
            _train(model, MeshComm(rmesh), 2, 2, 64, 256, device)
            record["two_ranks_one_gpu"] = "ran"
        except Exception as err:  # noqa: BLE001 - the point is to record what NCCL says
            record["two_ranks_one_gpu"] = f"{type(err).__name__}: {str(err)[:500]}"
        if dist.get_rank() == 0:
            (out / "two_ranks.json").write_text(json.dumps(record, indent=2))
        print(json.dumps(record, indent=2))
        os._exit(0)  # a failed NCCL communicator may hang in destroy

    if a.diagnose:  # where do the sharded and unsharded paths part? (one step, both models alive)
        rmesh = init_mesh(1, "cuda" if backend == "nccl" else "cpu")
        diag = {}
        for foreach in (None, False):
            plain = _gpt(a.preset, a.vocab, device)
            model = shard_model(_gpt(a.preset, a.vocab, device), rmesh)
            g = torch.Generator().manual_seed(1)
            tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g).to(device)
            x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            losses = []
            for m in (plain, model):
                _, loss = m(x, y)
                loss.backward()
                losses.append(loss.detach())
            named = dict(model.named_parameters())
            grads = {n: (p.grad, _full(named[n].grad)) for n, p in plain.named_parameters()}
            opts = [torch.optim.AdamW(list(m.parameters()), lr=1e-3, weight_decay=0.1, foreach=foreach)
                    for m in (plain, model)]
            for o in opts:
                o.step()
            params = {n: (p.detach(), _full(named[n]).detach()) for n, p in plain.named_parameters()}
            diag[f"foreach={foreach}"] = {
                "loss_bitwise": bool(torch.equal(losses[0], _full(losses[1]))),
                "grads_bitwise": all(torch.equal(u, v) for u, v in grads.values()),
                "grads_max_abs_diff": max((u - v).abs().max().item() for u, v in grads.values()),
                "params_after_adamw_bitwise": all(torch.equal(u, v) for u, v in params.values()),
                "params_max_abs_diff": max((u - v).abs().max().item() for u, v in params.values())}
            del plain, model, opts
        record["diagnose"] = diag
        if dist.get_rank() == 0:
            (out / "diagnose.json").write_text(json.dumps(record, indent=2))
        print(json.dumps(record, indent=2))
        dist.destroy_process_group()
        return

    # 1. unsharded
    plain = _gpt(a.preset, a.vocab, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    opt_p, step_p = _train(plain, TorchDistComm(), a.steps, a.batch, a.seq, a.vocab, device)
    peak_p = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    ref = {n: p.detach().clone() for n, p in plain.named_parameters()}
    ref_states = {f"{n}.{k}": v.detach().clone() for n, p in plain.named_parameters()
                  for k, v in opt_p.inner.state[p].items() if k != "step"}
    del plain, opt_p
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # 2. sharded (1 x 1 mesh)
    rmesh = init_mesh(1, "cuda" if backend == "nccl" else "cpu")
    model = shard_model(_gpt(a.preset, a.vocab, device), rmesh)
    opt_s, step_s = _train(model, MeshComm(rmesh), a.steps, a.batch, a.seq, a.vocab, device)
    peak_s = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    params = {n: _full(p).detach() for n, p in model.named_parameters()}
    states = {f"{n}.{k}": _full(v).detach() for n, p in model.named_parameters()
              for k, v in opt_s.inner.state[p].items() if k != "step"}
    same = {"params": all(torch.equal(params[n], ref[n]) for n in ref),
            "states": all(torch.equal(states[k], ref_states[k]) for k in ref_states),
            "params_max_abs_diff": max((params[n].float() - ref[n].float()).abs().max().item() for n in ref),
            "n_params": sum(t.numel() for t in ref.values()), "n_states": len(ref_states)}
    record["same_numerics"] = same
    record["is_dtensor"] = type(next(model.parameters())).__name__
    # 3. DCP round trip from CUDA DTensors
    state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "optimizer": opt_s.state_dict()}
    skeleton = save_sharded(state, out / "dcp", rmesh)
    back = load_sharded(skeleton, out / "dcp", rmesh, device)
    pairs = list(zip(back["model"].values(), state["model"].values()))
    record["dcp_roundtrip"] = {"tensors": len(pairs), "bitwise": all(torch.equal(_full(x), _full(y)) for x, y in pairs),
                               "device": str(_full(pairs[0][0]).device)}
    record["peak_memory_bytes"] = {"unsharded": peak_p, "sharded_1x1": peak_s}
    record["median_step_s"] = {"unsharded": step_p, "sharded_1x1": step_s}
    record["ledger_bytes_by_state"] = opt_s.comm.ledger.method_bytes_by_tag
    (out / "sharded_gpu.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
