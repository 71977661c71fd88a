"""Train a Hugging Face ``transformers.Trainer`` script with any desloc method.

A stock Trainer script changes in three lines::

    from desloc.integrations.transformers import DeslocTrainer          # 1
    trainer = DeslocTrainer(model=model, args=args, train_dataset=ds,   # 2: was Trainer(
                            method=MethodConfig("desloc", period_x=16)) # 3
    trainer.train()

and is launched as before: ``torchrun --nproc_per_node M script.py`` (gloo on CPU, NCCL on GPU;
M = 1 works too).

Design: one ``Trainer`` subclass, not a callback plus an optimizer factory. The Trainer asks
accelerate to wrap the model in DDP under torchrun, and no callback runs between the two
(``Trainer._prepare_for_training`` -> ``accelerator.prepare(model, optimizer)``); the optimizer
checkpoint is written by rank 0 only, while a desloc worker's parameters and states differ from
the other workers' between syncs; and ``Trainer.log`` copies the logs into
``state.log_history`` before any callback sees them. Each of these needs a Trainer method
overridden, so the integration is one class that overrides them, each documented below:

* ``_wrap_model``: the training model goes through ``accelerator.prepare_model(...,
  evaluation_mode=True)`` -- device placement, mixed-precision autocast and ``torch.compile``
  as usual, but no ``DistributedDataParallel`` (accelerate 1.16 wraps in DDP only when
  ``evaluation_mode`` is False, and the model it marks prepared is not wrapped again by the
  Trainer's later ``accelerator.prepare``; transformers does the same for models it shards at
  load time). ``training_step`` refuses a DDP-wrapped model, should a later version wrap anyway.
  Gradients are therefore never all-reduced by DDP; the method's own syncs run in
  ``optimizer.step()`` over a :class:`~desloc.comm.torch_dist.TorchDistComm`, every byte in its
  ledger.
* ``create_optimizer``: the Trainer's own inner optimizer (``args.optim``, learning rate, betas,
  weight-decay groups), or desloc's (``inner=InnerConfig(...)``), wrapped by
  :func:`~desloc.algorithms.build_method`. The wrapper's ``param_groups`` are the inner's, so the
  Trainer's LR scheduler drives it; accelerate's ``AcceleratedOptimizer`` steps it only on the
  last micro-batch of each accumulation window, so with gradient accumulation the method steps
  (and counts sync periods in) optimizer steps, not micro-batches.
* ``_save_optimizer_and_scheduler`` / ``_load_optimizer_and_scheduler``: besides the Trainer's
  files, every rank writes ``desloc-rank<r>-of-<M>.pt`` into the checkpoint folder (its
  parameters and its ``SyncedOptimizer.state_dict()``: inner states, global step, outer state,
  ledger) and ``resume_from_checkpoint`` loads it back, so a resumed run continues bitwise
  (the Trainer restores the LR scheduler, the RNG state of every rank and the data position).
* ``log``: every log row (``state.log_history`` and every logger: TensorBoard, W&B, ...) gets
  ``desloc/bytes_sent``, ``desloc/bytes_<tag>`` per synced tensor (``params``, ``exp_avg``,
  ``exp_avg_sq``, DDP's ``grads``) and ``desloc/ratio_vs_ddp``: bytes one worker sent so far.

What differs from the Trainer's DDP, by design: ``args.max_grad_norm`` clips each worker's own
gradient (for ``method="ddp"`` that is before the average, where the Trainer's DDP clips after
it; use ``max_grad_norm=0`` and ``MethodConfig(clip_rho=...)`` for clipping the average), and
``evaluate()`` runs on each rank's own parameters, and ``save_model()`` writes rank 0's (equal
on every rank right after a parameter average: end training on a multiple of K_x for one
model). As with DDP, the model must start identical
on every rank (seed it before building it). With ``args.average_tokens_across_devices`` (the
default) the Trainer gathers the token count of every step across ranks: a few bytes, outside
desloc's ledger, but one collective per step; ``False`` keeps the workers independent between
syncs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer

from desloc.algorithms import MethodConfig, SyncedOptimizer, build_method, parse_method_spec
from desloc.comm.torch_dist import DEFAULT_BUCKET_BYTES, TorchDistComm
from desloc.errors import CheckpointMismatchError, ConfigError
from desloc.optim import ADOPT, InnerConfig
from desloc.optim.roles import StateRole

LOG_PREFIX = "desloc/"


def method_config(method: MethodConfig | str) -> MethodConfig:
    """``method`` as a MethodConfig: one already, or a spec ``name[+outer][@topology]``."""
    if isinstance(method, MethodConfig):
        return method
    if isinstance(method, str):
        return MethodConfig(**parse_method_spec(method))
    raise ConfigError(f"method must be a desloc MethodConfig or a method name such as 'desloc', got "
                      f"{type(method).__name__} {method!r}; e.g. method=MethodConfig('desloc', period_x=16)")


def state_roles_of(opt: torch.optim.Optimizer) -> dict[str, StateRole | str]:
    """The state roles of the Trainer's usual inner optimizers (Adam, AdamW -- fused or not --,
    ADOPT, SGD): first moment ``u``, second moment ``v``. Others need ``state_roles=``."""
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW, ADOPT)):
        return {"exp_avg": "u", "exp_avg_sq": "v"}
    if isinstance(opt, torch.optim.SGD):
        return {"momentum_buffer": "u"} if any(g.get("momentum", 0) for g in opt.param_groups) else {}
    raise ConfigError(
        f"DeslocTrainer does not know the states of the inner optimizer {type(opt).__name__} "
        f"(args.optim={getattr(opt, '_trainer_optim', '?')}); pass state_roles={{state name: 'u' | 'v'}}, "
        "e.g. state_roles={'exp_avg': 'u', 'exp_avg_sq': 'v'}, or inner=InnerConfig('adamw', lr=...)"
    )


def comm_logs(opt: SyncedOptimizer) -> dict[str, float]:
    """The method's communication so far as flat log entries (what ``DeslocTrainer.log`` adds)."""
    summary = opt.comm_summary()
    out: dict[str, float] = {f"{LOG_PREFIX}bytes_sent": summary["bytes_sent"]}
    for tag, nbytes in sorted(summary["bytes_by_state"].items()):
        out[f"{LOG_PREFIX}bytes_{tag}"] = nbytes
    if summary["bytes_sent"]:
        out[f"{LOG_PREFIX}ratio_vs_ddp"] = summary["ratio_vs_ddp"]
    return out


class DeslocTrainer(Trainer):
    """``transformers.Trainer`` whose optimizer is a desloc method and whose model is not DDP-wrapped.

    method: the method (``MethodConfig``, or a name such as ``"desloc"``; default DES-LOC with its
        default periods).
    inner: desloc's inner optimizer (``InnerConfig``) over all trainable parameters; None (default)
        = the Trainer's own (``args.optim`` with its learning rate, betas and weight-decay groups).
    state_roles: state name -> role ("u", "u<j>", "v") of the inner optimizer, for one whose states
        desloc does not know (see :func:`state_roles_of`); ignored with ``inner``.
    bucket_bytes: the communicator's all-reduce bucket size.
    Everything else is ``Trainer``'s.
    """

    def __init__(self, *args: Any, method: MethodConfig | str = "desloc", inner: InnerConfig | None = None,
                 state_roles: Mapping[str, StateRole | str] | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, **kwargs: Any):
        if inner is not None and not isinstance(inner, InnerConfig):
            raise ConfigError(f"inner must be a desloc InnerConfig or None (the Trainer's optimizer), got "
                              f"{type(inner).__name__}; e.g. inner=InnerConfig('adamw', lr=3e-4)")
        self.desloc_method = method_config(method)
        self.desloc_inner = inner
        self.desloc_state_roles = dict(state_roles) if state_roles is not None else None
        self.desloc_bucket_bytes = bucket_bytes
        self.desloc_optimizer: SyncedOptimizer | None = None
        self._desloc_checked_wrap = False
        super().__init__(*args, **kwargs)
        if self.desloc_method.name == "ddp" and self.args.max_grad_norm and self.args.max_grad_norm > 0:
            warnings.warn(f"DeslocTrainer(method='ddp') clips each worker's gradient to max_grad_norm="
                          f"{self.args.max_grad_norm} before the average (the Trainer's DDP clips the average); "
                          "set max_grad_norm=0 for the Trainer's DDP numbers", stacklevel=2)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The inner optimizer (the Trainer's or ``inner``'s) wrapped in the method, once."""
        current = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper or the optimizer
        if isinstance(current, SyncedOptimizer):
            return self.optimizer
        if self.desloc_inner is not None and self.optimizer is None:
            opt_model = self.model if model is None else model
            inner = self.desloc_inner.build([p for p in opt_model.parameters() if p.requires_grad])
            roles: Mapping[str, StateRole | str] = self.desloc_inner.state_roles()
        else:
            inner = super().create_optimizer(model)  # given through optimizers=(opt, sched), or args.optim's
            roles = self.desloc_state_roles if self.desloc_state_roles is not None else state_roles_of(inner)
        comm = TorchDistComm(bucket_bytes=self.desloc_bucket_bytes)
        self.desloc_optimizer = build_method(self.desloc_method, inner, comm, roles)
        self.optimizer = self.desloc_optimizer
        return self.optimizer

    # ------------------------------------------------------------------ no DDP
    def _wrap_model(self, model: torch.nn.Module, training: bool = True, dataloader: Any = None) -> torch.nn.Module:
        """The Trainer's wrapping, then accelerate's preparation without its DDP wrap (training only)."""
        wrapped = super()._wrap_model(model, training, dataloader)
        if training and wrapped is self.model and not getattr(wrapped, "_is_accelerate_prepared", False):
            wrapped = self.accelerator.prepare_model(wrapped, evaluation_mode=True)
        return wrapped

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        if not self._desloc_checked_wrap:
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                raise RuntimeError(
                    "DeslocTrainer: the training model is wrapped in DistributedDataParallel, which would "
                    "all-reduce every gradient on top of the method's syncs; this transformers/accelerate "
                    "version prepares models differently than DeslocTrainer expects (tested: transformers 5.24, "
                    "accelerate 1.16)")
            self._desloc_checked_wrap = True
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        out = super().train(*args, **kwargs)
        if self.desloc_optimizer is not None:
            self.desloc_optimizer.finish_syncs()  # a delayed parameter average lands before the model is used
        return out

    # ------------------------------------------------------------------ logs
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the method's bytes so far to every row, before the Trainer stores and reports it."""
        if self.desloc_optimizer is not None:
            logs.update(comm_logs(self.desloc_optimizer))
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def desloc_checkpoint_path(self, checkpoint: str) -> str:
        """This rank's file in a checkpoint folder."""
        comm = self.desloc_optimizer.comm
        return os.path.join(checkpoint, f"desloc-rank{comm.rank}-of-{comm.world_size}.pt")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.desloc_optimizer is None:
            return
        os.makedirs(output_dir, exist_ok=True)  # rank 0 made it for the model; the others may be ahead
        blob = {"model": self.accelerator.unwrap_model(self.model).state_dict(),
                "optimizer": self.desloc_optimizer.state_dict()}
        torch.save(blob, self.desloc_checkpoint_path(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # the scheduler (and rank 0's optimizer file)
        if checkpoint is None or self.desloc_optimizer is None:
            return
        path = self.desloc_checkpoint_path(checkpoint)
        if not os.path.isfile(path):
            found = sorted(f for f in os.listdir(checkpoint) if f.startswith("desloc-rank"))
            raise CheckpointMismatchError(
                f"resume_from_checkpoint={checkpoint!r} has no {os.path.basename(path)} "
                f"({'it holds ' + ', '.join(found) if found else 'it was not written by DeslocTrainer'}); "
                "resume with the number of processes that wrote it, from a DeslocTrainer checkpoint")
        device = self.args.device
        blob = torch.load(path, map_location="cpu" if device.type == "cpu" else device,  # not "cpu:0": torch
                          weights_only=True)                                           # cannot restore that
        self.accelerator.unwrap_model(self.model).load_state_dict(blob["model"])
        self.desloc_optimizer.load_state_dict(blob["optimizer"])


__all__ = ["DeslocTrainer", "comm_logs", "method_config", "state_roles_of"]
