"""DDP: average the gradient over workers every step, then one inner-optimizer step.

    g^m = grad F(x; xi^m)                  (local)
    g   = E_m[g^m]                         (all-reduce, tag "grads")
    g   = clip(g, rho)                     (optional)
    x   = OPT.step(x, g)                   (identical on every worker)

Zero-copy: the gradients are views of a flat buffer (``p.grad`` bound to it after the first
backward; the training loop zeroes gradients in place -- ``zero_grad(set_to_none=False)`` --
as with DDP's ``gradient_as_bucket_view``), so the all-reduce runs on that buffer in place.
Gradients set to None are re-created by backward and copied into the buffer at the next sync.

Communication: one model-sized tensor (the gradient) per step (schedule ``{"grads": 1}``) -- the reference that every
``ratio_vs_ddp`` divides. Parameters stay identical on all workers if they start identical.
This is the quality upper bound of the DES-LOC paper. Reduces to: single-worker OPT at M = 1.

Compressed (``compression={"grads": codec}`` or ``{"*": codec}``, ``--compress``): the
compression literature's baseline -- each worker encodes g^m + e^m with the codec, keeps
e^m <- (g^m + e^m) - decode(payload) (error feedback), the payloads are all-gathered and every
worker takes g = (1/M) sum_m decode(payload_m) (rows in rank order: bitwise the same on every
worker and engine). :mod:`desloc.algorithms.fastsync`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from desloc.algorithms import fastsync
from desloc.algorithms.base import SyncedOptimizer
from desloc.algorithms.schedule import SyncSchedule
from desloc.algorithms.spec import MethodSpec
from desloc.errors import ConfigError


class DDP(SyncedOptimizer):
    algorithm = "ddp"

    def __init__(self, *args, compression: Mapping[str, str] | str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = SyncSchedule({"grads": 1})
        self.compression = self._resolve_compression(compression)
        self._compressed: fastsync.CompressedTag | None = None
        self._saved_error: dict[str, Any] | None = None  # a checkpoint's buffers, until the first step lays them out

    def _resolve_compression(self, compression) -> dict[str, str]:
        if not compression:
            return {}
        from desloc.comm.codecs import parse_compression

        spec = compression if isinstance(compression, Mapping) else parse_compression(compression)
        unknown = [t for t in spec if t not in ("*", "grads")]
        if unknown:
            raise ConfigError(f"ddp sends only its gradient (tag 'grads'); compression names {unknown}. Use e.g. "
                              "--compress int8 or --compress grads=int8")
        codec = spec.get("grads", spec.get("*", "none"))
        if codec == "none":
            return {}
        if not self.zero_copy or not self.comm.has_all_gather:
            raise ConfigError(f"compressed gradients need the zero-copy path and an all-gather of encoded payloads, "
                              f"which {type(self.comm).__name__} does not provide; drop --compress")
        return {"grads": codec}

    def _flat_tags(self) -> list[str]:
        return ["grads"]

    def _before_local_step(self) -> None:
        for p in self.params:
            if p.grad is None:  # every worker must contribute the same tensors
                p.grad = torch.zeros_like(p)
        if self.compression:
            self._compressed_sync()
        else:
            self._sync(["grads"])
        self._clip()

    @torch.no_grad()
    def _compressed_sync(self) -> None:
        """g <- (1/M) sum_m decode(encode(g^m + e^m)), with error feedback (module docstring)."""
        from desloc.comm.codecs import get_codec

        buffers = self.flat_buffers("grads")
        if self._compressed is None:
            self._compressed = fastsync.CompressedTag(get_codec(self.compression["grads"]), buffers, None)
            if self._saved_error is not None:
                self._compressed.load_state_dict(self._saved_error)
        comp = self._compressed
        m = self.comm.world_size
        tags = ["grads"] * len(buffers)
        if not fastsync.two_stage(m):  # M = 2: the all-gather (exact, the same bytes)
            payloads = [comp.message(g, None, e) for g, e in zip(buffers, comp.error)]
            for g, h in zip(buffers, self.comm.all_gather_flat(payloads, tags)):
                g.copy_(comp.combine(h.wait(), g.shape[-1], None, False).expand_as(g))
            return
        payloads = [comp.chunked_message(g, None, e, m) for g, e in zip(buffers, comp.error)]
        for b, (g, first) in enumerate(zip(buffers, self.comm.all_to_all_flat(payloads, tags))):
            reduce = functools.partial(comp.reduce_chunk, n=g.shape[-1], world_size=m, key=f"0:{b}")
            gathered = fastsync.TwoStageReduce(self.comm, "grads", first, reduce).wait()
            g.copy_(comp.combine_chunks(gathered, g.shape[-1], None, False).expand_as(g))

    def _extra_state(self) -> dict[str, Any]:
        if self._compressed is not None:
            return {"compressed": {"grads": self._compressed.state_dict()}}
        return {"compressed": {"grads": self._saved_error}} if self._saved_error else {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("compressed", {}).get("grads")
        if saved is not None and saved.get("error") is not None:
            if self._compressed is not None:
                self._compressed.load_state_dict(saved)
            else:  # the gradient buffers are laid out at the first step: restored then
                self._saved_error = saved

    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), **({"compression": dict(self.compression)} if self.compression else {})}


def _build(cfg, inner, comm, roles, kwargs) -> DDP:
    kwargs.setdefault("compression", cfg.compression)
    return DDP(inner, comm, **kwargs)


SPEC = MethodSpec("all-reduce the gradient every step", _build, frozenset({"clip_rho", "compression"}),
                  why_fixed="syncs every step", syncs_params=False)
