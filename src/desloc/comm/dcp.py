"""Checkpoints of sharded replica groups (``--shard``) with ``torch.distributed.checkpoint`` (DCP).

Replica groups diverge between syncs, so each writes its own DCP checkpoint with its shard group
as the process group (:func:`save_sharded` / :func:`load_sharded`): the DTensors go to DCP, and
everything else -- a *skeleton* of the state with a plain reference where each DTensor was
(:func:`split_dtensors`) -- is what each process saves with ``torch.save``. Where the files go is
the sharded engine's checkpoint layout (:mod:`desloc.runtime.sharded`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from desloc.comm.fsdp import ReplicaMesh

_REF = "__desloc_dtensor__"


def _placement_spec(p) -> list:
    if isinstance(p, Shard):
        return ["shard", p.dim]
    if isinstance(p, Replicate):
        return ["replicate"]
    raise ValueError(f"cannot checkpoint a DTensor placed {p!r} (only Shard and Replicate)")


def _placement(spec: list):
    return Shard(int(spec[1])) if spec[0] == "shard" else Replicate()


def split_dtensors(tree: Any, prefix: str = "") -> tuple[Any, dict[str, DTensor]]:
    """``tree`` with every DTensor replaced by a plain reference (what ``torch.save`` of a
    skeleton can hold), and the DTensors by key (what DCP saves)."""
    found: dict[str, DTensor] = {}

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, DTensor):
            found[key] = x
            return {_REF: key, "shape": list(x.shape), "stride": list(x.stride()), "dtype": str(x.dtype),
                    "local_shape": list(x.to_local().shape),
                    "placements": [_placement_spec(p) for p in x.placements]}
        if isinstance(x, dict):
            return {k: walk(v, f"{key}/{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            out = [walk(v, f"{key}/{i}") for i, v in enumerate(x)]
            return out if isinstance(x, list) else tuple(out)
        return x

    return walk(tree, prefix), found


def _refs(skeleton: Any):
    """Every DTensor reference in ``skeleton``."""
    if isinstance(skeleton, dict) and _REF in skeleton:
        yield skeleton
    elif isinstance(skeleton, dict):
        for v in skeleton.values():
            yield from _refs(v)
    elif isinstance(skeleton, (list, tuple)):
        for v in skeleton:
            yield from _refs(v)


def _dtype(ref: dict) -> torch.dtype:
    return getattr(torch, ref["dtype"].removeprefix("torch."))


def _templates(skeleton: Any, mesh: DeviceMesh, device: torch.device) -> dict[str, DTensor]:
    """An empty DTensor of each reference's global shape, placement and local shape on ``mesh``."""
    return {ref[_REF]: DTensor.from_local(torch.empty(ref["local_shape"], dtype=_dtype(ref), device=device), mesh,
                                          [_placement(p) for p in ref["placements"]], run_check=False,
                                          shape=torch.Size(ref["shape"]), stride=tuple(ref["stride"]))
            for ref in _refs(skeleton)}


def _fill(skeleton: Any, tensors: dict[str, DTensor]) -> Any:
    if isinstance(skeleton, dict) and _REF in skeleton:
        return tensors[skeleton[_REF]]
    if isinstance(skeleton, dict):
        return {k: _fill(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_fill(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(_fill(v, tensors) for v in skeleton)
    return skeleton


def save_sharded(state: dict[str, Any], directory: Path, rmesh: ReplicaMesh) -> Any:
    """Write ``state``'s DTensors as one DCP checkpoint of this replica group in ``directory``
    (collective over the group's shards); returns the skeleton (everything else, with references)
    for the caller to save per process."""
    import torch.distributed.checkpoint as dcp

    skeleton, tensors = split_dtensors(state)
    dcp.save(tensors, checkpoint_id=str(directory), process_group=rmesh.shard_group)
    return skeleton


def load_sharded(skeleton: Any, directory: Path, rmesh: ReplicaMesh, device: torch.device | str = "cpu") -> Any:
    """The state :func:`save_sharded` wrote: DTensors read from the replica group's DCP checkpoint in
    ``directory`` into ``skeleton``'s references (same mesh: each process reads its own shards)."""
    import torch.distributed.checkpoint as dcp

    tensors = _templates(skeleton, rmesh.shard_mesh, torch.device(device))
    dcp.load(tensors, checkpoint_id=str(directory), process_group=rmesh.shard_group)
    return _fill(skeleton, tensors)


def load_sharded_offline(skeleton: Any, directory: Path) -> Any:
    """A replica group's checkpoint as whole tensors, in one process without a process group
    (``desloc sample`` on a ``--shard`` run): every DTensor reference becomes a plain tensor of
    its global shape, read from the group's DCP checkpoint in ``directory``."""
    import warnings

    import torch.distributed.checkpoint as dcp

    tensors = {ref[_REF]: torch.empty(ref["shape"], dtype=_dtype(ref)) for ref in _refs(skeleton)}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(tensors, checkpoint_id=str(directory), no_dist=True)
    return _fill(skeleton, tensors)
