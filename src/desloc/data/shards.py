"""The shards: a corpus's training tokens partitioned across workers, and each worker's batches.

Partition (``WorkerStreams``), M = world_size, T = seq_len, S = shard_tokens: each document's
train part is cut into contiguous blocks of S tokens (a tail shorter than T + 1 joins the
block before it; a document shorter than T + 1 tokens is dropped).

* iid: blocks are shuffled with ``seed`` and dealt round-robin: worker m gets perm[m::M].
* dirichlet (label skew, Hsu et al. 2019): for each document d, p_d ~ Dir(alpha * 1_M) and the
  document's B_d blocks (shuffled) go to workers in counts round(p_d * B_d) (largest
  remainder); a worker left without blocks takes one from the worker holding the most.

Batches: a window of T + 1 tokens starts uniformly at any position of the worker's blocks where it
fits inside the block (so it never crosses a block or document boundary); x = window[:-1],
y = window[1:]. The starts come from a ``torch.Generator`` seeded by SeedSequence((seed, worker,
step)): stateless, so resuming at any step is exact and the simulator and one-process-per-worker
runs draw identical batches.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from desloc.data.corpus import Corpus, DataConfig, _is_int
from desloc.errors import ConfigError


def _cut_blocks(doc_offsets: np.ndarray, shard: int, min_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, document) of every block; see the module docstring for the rule."""
    starts, lengths, docs = [], [], []
    for d, (a, b) in enumerate(zip(doc_offsets[:-1].tolist(), doc_offsets[1:].tolist())):
        n = b - a
        if n < min_len:
            continue
        k, rem = divmod(n, shard)
        lens = [shard] * k + ([rem] if rem >= min_len or k == 0 else [])
        lens[-1] += n - sum(lens)  # a tail too short for one window joins the block before it
        starts += [a + shard * i for i in range(len(lens))]  # all blocks but the last are full
        lengths += lens
        docs += [d] * len(lens)
    return np.asarray(starts, np.int64), np.asarray(lengths, np.int64), np.asarray(docs, np.int64)


def _largest_remainder(p: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportions ``p``."""
    raw = p * total
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _assign_iid(n_blocks: int, world: int, rng: np.random.Generator) -> np.ndarray:
    owner = np.empty(n_blocks, np.int64)
    owner[rng.permutation(n_blocks)] = np.arange(n_blocks) % world
    return owner


def _assign_dirichlet(block_doc: np.ndarray, world: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    owner = np.empty(len(block_doc), np.int64)
    for d in np.unique(block_doc):
        p = np.nan_to_num(rng.dirichlet(np.full(world, alpha)))
        if p.sum() <= 0:  # every component underflowed (alpha tiny): all to one worker
            p = np.eye(world)[rng.integers(world)]
        counts = _largest_remainder(p / p.sum(), int((block_doc == d).sum()))
        owner[rng.permutation(np.flatnonzero(block_doc == d))] = np.repeat(np.arange(world), counts)
    for worker in range(world):  # every worker needs >= 1 block
        if not (owner == worker).any():
            donor = np.bincount(owner, minlength=world).argmax()
            donor_blocks = np.flatnonzero(owner == donor)
            owner[donor_blocks[rng.integers(len(donor_blocks))]] = worker
    return owner


def _positive_int(name: str, value: object, example: str) -> None:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}; e.g. {example}")


class WorkerStreams:
    """Each worker's own training stream (a disjoint shard of blocks) + a shared validation set."""

    def __init__(self, corpus: Corpus, cfg: DataConfig, world_size: int, seq_len: int, batch_size: int,
                 seed: int):
        _positive_int("world_size", world_size, "world_size=4")
        _positive_int("seq_len", seq_len, "seq_len=256")
        _positive_int("batch_size", batch_size, "batch_size=16")
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}; e.g. seed=0")
        shard_tokens = cfg.shard_tokens if cfg.shard_tokens is not None else 4 * (seq_len + 1)
        if shard_tokens < seq_len + 1:
            raise ConfigError(
                f"shard_tokens must be >= seq_len + 1 = {seq_len + 1} so a training window fits in "
                f"one block, got shard_tokens={shard_tokens}; raise DataConfig.shard_tokens "
                f"(e.g. {max(2048, 8 * (seq_len + 1))}) or lower seq_len"
            )
        self.corpus, self.cfg = corpus, cfg
        self.world_size, self.seq_len, self.batch_size, self.seed = world_size, seq_len, batch_size, seed
        self.shard_tokens = shard_tokens
        starts, lengths, block_doc = _cut_blocks(corpus.train_doc_offsets, shard_tokens, seq_len + 1)
        if len(starts) < world_size:
            raise ConfigError(self._too_small(len(starts), shard_tokens))
        rng = np.random.default_rng(seed)
        if cfg.partition == "iid":
            owner = _assign_iid(len(starts), world_size, rng)
        else:
            owner = _assign_dirichlet(block_doc, world_size, float(cfg.alpha), rng)
        self._block_start, self._block_len, self._block_doc = starts, lengths, block_doc
        self._blocks = [np.flatnonzero(owner == m) for m in range(world_size)]  # ascending position
        # window w of worker m lies in block j where cum[j-1] <= w < cum[j]
        self._windows_cum = [np.cumsum(lengths[b] - seq_len) for b in self._blocks]

    def _too_small(self, n_blocks: int, shard_tokens: int) -> str:
        """The "too little text" message, with numbers that would fit."""
        offsets, seq_len, world = self.corpus.train_doc_offsets, self.seq_len, self.world_size

        def blocks(t: int) -> int:
            shard = self.cfg.shard_tokens if self.cfg.shard_tokens is not None else 4 * (t + 1)
            return len(_cut_blocks(offsets, shard, t + 1)[0])

        lo, hi = 0, seq_len - 1  # the largest seq_len < the current one that gives every worker a block
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if blocks(mid) >= world else (lo, mid - 1)
        fixes = []
        if lo >= 1 and blocks(lo) >= world:
            fixes.append(f"lower seq_len to {lo} (--seq-len {lo})")
        if self.cfg.shard_tokens is not None:
            fixes.append("lower shard_tokens")
        if n_blocks >= 1:
            fixes.append(f"use {n_blocks} worker{'s' * (n_blocks > 1)} (--workers {n_blocks})")
        if self.cfg.tokenizer == "bpe":
            fixes.append("use the byte tokenizer (--tokenizer byte: several times more tokens from the same text)")
        fixes.append(f"or use a larger text (about {world * shard_tokens:,} training tokens or more)")
        return (f"the training text is too small: its {int(offsets[-1]):,} training tokens make only {n_blocks} "
                f"blocks of shard_tokens={shard_tokens} (windows of seq_len + 1 = {seq_len + 1}) but "
                f"world_size={world} workers each need at least one; " + ", ".join(fixes))

    def _check_worker(self, worker: int) -> None:
        if not _is_int(worker) or not 0 <= worker < self.world_size:
            raise ValueError(f"worker must be in [0, {self.world_size}), got {worker!r}")

    def shard_ranges(self, worker: int) -> list[tuple[int, int]]:
        """[start, stop) ranges of ``train_tokens`` that form the worker's shard, ascending."""
        self._check_worker(worker)
        b = self._blocks[worker]
        return list(zip(self._block_start[b].tolist(), (self._block_start[b] + self._block_len[b]).tolist()))

    def window_starts(self, worker: int, step: int) -> np.ndarray:
        """Positions in ``train_tokens`` of the ``batch_size`` windows of (worker, step)."""
        self._check_worker(worker)
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        state = np.random.SeedSequence([self.seed, int(worker), int(step)]).generate_state(2, np.uint32)
        gen = torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))
        cum = self._windows_cum[worker]
        w = torch.randint(0, int(cum[-1]), (self.batch_size,), generator=gen).numpy()
        j = np.searchsorted(cum, w, side="right")
        block = self._blocks[worker][j]
        return self._block_start[block] + w - (cum[j] - (self._block_len[block] - self.seq_len))

    def _windows(self, tokens: np.ndarray, starts: np.ndarray, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        xy = torch.from_numpy(tokens[idx].astype(np.int64)).view(batch_size, self.seq_len + 1)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()  # (B, T) each

    def batch(self, worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y int64 (batch_size, seq_len), y = x shifted by one; a pure function of (seed, worker, step)."""
        return self._windows(self.corpus.train_tokens, self.window_starts(worker, step), self.batch_size)

    def val_batches(self, n_batches: int, batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Evenly spaced windows over the validation tails (never crossing a document boundary);
        identical for every worker."""
        bs = self.batch_size if batch_size is None else batch_size
        _positive_int("n_batches", n_batches, "n_batches=8")
        _positive_int("batch_size", bs, "batch_size=16")
        offsets = self.corpus.val_doc_offsets
        n = np.diff(offsets)
        ok = n >= self.seq_len + 1
        cum = np.cumsum(n[ok] - self.seq_len)
        if len(cum) == 0:
            raise ConfigError(self._val_too_small(n))
        k = n_batches * bs
        w = ((2 * np.arange(k) + 1) * int(cum[-1])) // (2 * k)  # centres of k equal slices
        j = np.searchsorted(cum, w, side="right")
        starts = offsets[:-1][ok][j] + w - (cum[j] - (n[ok][j] - self.seq_len))
        return [self._windows(self.corpus.val_tokens, s, bs) for s in starts.reshape(n_batches, bs)]

    def _val_too_small(self, val_lengths: np.ndarray) -> str:
        """The "too little validation text" message (no document's tail holds a window), with
        numbers that would fit; ``val_lengths``: each document's validation tokens."""
        vf = self.corpus.config.val_fraction
        longest_tail = int(val_lengths.max()) if len(val_lengths) else 0
        longest_doc = int((np.diff(self.corpus.train_doc_offsets) + val_lengths).max(initial=0))
        fixes = []
        if longest_tail >= 2:
            fixes.append(f"lower seq_len to {longest_tail - 1} (--seq-len {longest_tail - 1})")
        if longest_doc > self.seq_len + 1:
            need = math.ceil((self.seq_len + 1) / longest_doc * 100) / 100
            if need < 1:
                fixes.append(f"raise val_fraction to {need:g}")
        else:
            fixes.append("raise val_fraction")
        if self.corpus.config.tokenizer == "bpe":
            fixes.append("use the byte tokenizer (--tokenizer byte)")
        fixes.append("or use a larger text")
        return (f"the validation text is too small: no document's validation tail (the last "
                f"val_fraction={vf} of it; the longest holds {longest_tail} tokens) holds seq_len + 1 = "
                f"{self.seq_len + 1} tokens; " + ", ".join(fixes))

    def shard_sizes(self) -> list[int]:
        """Training tokens held by each worker."""
        return [int(self._block_len[b].sum()) for b in self._blocks]

    def skew(self) -> dict:
        """Per-worker document distribution (token fractions) and its mean total-variation
        distance 0.5 * sum_d |p_m(d) - p(d)| from the distribution over all shards."""
        n_docs = len(self.corpus.documents)
        counts = np.stack([np.bincount(self._block_doc[b], weights=self._block_len[b], minlength=n_docs)
                           for b in self._blocks])  # (M, n_docs)
        dist = counts / counts.sum(axis=1, keepdims=True)
        overall = counts.sum(axis=0) / counts.sum()
        tv = 0.5 * np.abs(dist - overall).sum(axis=1)
        return {"doc_distribution": dist.tolist(), "mean_tv_distance": float(tv.mean())}
