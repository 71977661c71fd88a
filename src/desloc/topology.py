r"""Gossip topologies: who averages with whom in each round, as mixing weights.

A round's mixing is a doubly stochastic matrix W (rows and columns sum to 1, W_ij >= 0, W = W^T),
given as neighbour lists ``nbrs[i] = [(j, W_ij), ...]`` (including i itself, ascending j): after
mixing, worker i holds sum_j W_ij xbar_j. Only pairs with W_ij > 0, i != j, exchange data.

    complete    W_ij = 1/M                            (an all-reduce; GASLoC == DiLoCo here)
    ring        i with i-1 and i+1 (mod M), 1/3 each  (static; M = 2: 1/2 each)
    one-peer    a random perfect matching per round, pairs average 1/2-1/2 (odd M: one worker idle)
    two-peer    a random cycle per round, each worker with its two cycle neighbours, 1/3 each
    none        W = I, no communication (independent local training)

Random topologies draw from ``numpy.random.default_rng((seed, round))``: every worker computes the
same matching without communicating, and it changes every round (time-varying graph).
"""

from __future__ import annotations

import numpy as np
import torch

from desloc.errors import ConfigError

TOPOLOGIES = ("complete", "ring", "one-peer", "two-peer", "none")
RANDOM_TOPOLOGIES = ("one-peer", "two-peer")  # drawn from the gossip seed every round; the others are fixed
# Peers each worker sends its model to in a round (complete: an all-reduce of everyone, no degree).
DEGREE = {"one-peer": 1, "two-peer": 2, "ring": 2, "none": 0}
Neighbours = list[list[tuple[int, float]]]


def _cycle(order: list[int]) -> Neighbours:
    m = len(order)
    if m == 1:
        return [[(0, 1.0)]]
    if m == 2:
        return [[(0, 0.5), (1, 0.5)], [(0, 0.5), (1, 0.5)]]
    nbrs: Neighbours = [[] for _ in range(m)]
    for k, i in enumerate(order):
        peers = {order[(k - 1) % m], i, order[(k + 1) % m]}
        nbrs[i] = [(j, 1.0 / 3.0) for j in sorted(peers)]
    return nbrs


def mixing(kind: str, world_size: int, round_index: int, seed: int = 0) -> Neighbours:
    """Neighbour lists of round ``round_index`` for ``world_size`` workers."""
    m = world_size
    if kind not in TOPOLOGIES:
        raise ConfigError(f"unknown topology {kind!r}; choose one of {TOPOLOGIES}")
    if kind == "complete":
        return [[(j, 1.0 / m) for j in range(m)] for _ in range(m)]
    if kind == "none" or m == 1:
        return [[(i, 1.0)] for i in range(m)]
    if kind == "ring":
        return _cycle(list(range(m)))
    rng = np.random.default_rng((seed, round_index))
    perm = [int(v) for v in rng.permutation(m)]
    if kind == "two-peer":
        return _cycle(perm)
    nbrs: Neighbours = [[(i, 1.0)] for i in range(m)]  # one-peer: pair consecutive entries
    for a, b in zip(perm[0::2], perm[1::2]):
        lo, hi = min(a, b), max(a, b)
        nbrs[a] = nbrs[b] = [(lo, 0.5), (hi, 0.5)]
    return nbrs


def matrix(nbrs: Neighbours, dtype=torch.float64) -> torch.Tensor:
    """The dense W of neighbour lists (for tests and analysis)."""
    m = len(nbrs)
    w = torch.zeros(m, m, dtype=dtype)
    for i, row in enumerate(nbrs):
        for j, weight in row:
            w[i, j] = weight
    return w


def spectral_gap(w: torch.Tensor) -> float:
    """1 - |lambda_2(W)|: how much one round contracts disagreement (1 = complete, 0 = none)."""
    eig = torch.linalg.eigvalsh(w).abs().sort(descending=True).values
    return float(1.0 - eig[1]) if len(eig) > 1 else 1.0
