"""A run directory: resolved config, metrics (JSONL), summary, plots and verified checkpoints.

    <run>/config.json       resolved configuration
    <run>/metrics.jsonl     one JSON object per logged step
    <run>/summary.json      final numbers (``status``: complete | diverged)
    <run>/loss.png, loss_vs_bytes.png, loss_vs_time.png (validation loss vs modeled time)
    <run>/checkpoints/step-<t>/rank<r>.pt      (+ rank<r>.sha256: checksum and size)
    <run>/checkpoints/latest.json              the newest complete checkpoint
    <run>/.lock                                held (flock) by the process writing the run

Guarantees, each tested in ``tests/test_run_dir.py``:

* Files are written to a temporary name and renamed into place, with the permissions the
  umask gives ordinary files. ``latest.json`` moves only after every rank's checkpoint and
  checksum are complete, so a crash mid-write leaves the previous checkpoint loadable.
* Every checkpoint file has a sha256 beside it. Loading verifies it and loads with
  ``weights_only=True``; a truncated, empty or corrupted checkpoint is skipped with a warning
  and the newest valid older one is used. If ``latest.json`` is lost, the newest valid
  checkpoint on disk is found by scanning.
* One writer at a time: :meth:`RunDir.lock` takes an exclusive ``flock`` on ``.lock`` (freed by
  the kernel when the process dies, even by SIGKILL); a second writer gets an error naming the
  holder's pid.
* JSON records are strict: NaN and infinities are written as ``null``. A torn last line of
  ``metrics.jsonl`` (a crash mid-append) is dropped with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from desloc.errors import RunDirError

# What desloc itself writes into a run directory (``--overwrite`` removes only these).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "loss.png", "loss_vs_bytes.png", "loss_vs_time.png",
             "checkpoints")
LOCK_FILE = ".lock"


def warn(message: str) -> None:
    print(f"desloc: warning: {message}", file=sys.stderr, flush=True)


def _file_mode() -> int:
    """Mode of a new ordinary file under the current umask (mkstemp would give 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``; the temporary file never outlives a failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write)


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON (non-finite floats become null)."""
    return json.dumps(finite_json(obj), allow_nan=False, default=str, **kw)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (dumps(obj, indent=2) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> str:
    """Save ``obj`` atomically; returns the sha256 of the bytes written."""
    digest: dict[str, str] = {}

    def write(tmp: str) -> None:
        torch.save(obj, tmp)
        digest["sha256"] = _sha256(Path(tmp))

    _atomic_write(path, write)
    return digest["sha256"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_diff(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """``["steps: 5 -> 20", "method.period_x: 4 -> 8"]``: where two config dicts differ."""
    out = []
    for key in sorted(set(saved) | set(wanted), key=str):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def describe_os_error(err: OSError) -> str:
    """One line for a failed write: says "no space left" when the disk is full."""
    where = err.filename or "the run directory"
    if err.errno == errno.ENOSPC:
        return (f"no space left on device while writing {where}; free some space, then continue "
                "with --resume (the last complete checkpoint is kept)")
    return f"cannot write {where}: {err.strerror or err}"


class RunDir:
    """One run's directory. ``quiet`` silences warnings (ranks other than 0 under torchrun)."""

    def __init__(self, path: str | Path, quiet: bool = False):
        self.path = Path(path)
        self.ckpt_root = self.path / "checkpoints"
        self.quiet = quiet
        self._lock_fd: int | None = None

    def _warn(self, message: str) -> None:
        if not self.quiet:
            warn(message)

    # ------------------------------------------------------------- ownership
    def lock(self) -> None:
        """Create the directory and take its lock; a second writer gets a RunDirError."""
        import fcntl

        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file, not a directory; choose a directory path")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, _file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"{self.path} is in use by another desloc process (pid {holder}); wait for "
                              "it to finish or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def contents(self) -> list[str]:
        """Entries of the directory other than the lock file."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE)

    def start_fresh(self, config: dict[str, Any], overwrite: bool = False) -> None:
        """Begin a new run here: refuse a non-empty directory unless ``overwrite``."""
        entries = self.contents()
        if entries and not overwrite:
            shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
            raise RunDirError(f"--out {self.path} is not empty ({shown}); pass --resume to continue the "
                              "run there, --overwrite to replace it, or choose another --out")
        if entries:
            ours = lambda name: name in RUN_FILES or (name.startswith(".") and name.endswith(".tmp"))  # noqa: E731
            foreign = [e for e in entries if not ours(e)]
            if foreign:
                raise RunDirError(f"--overwrite replaces only desloc's records, but {self.path} also holds "
                                  f"{foreign}; choose another --out")
            for name in entries:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        self.write_config(config)
        atomic_write_bytes(self.path / "metrics.jsonl", b"")

    # ----------------------------------------------------------------- records
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / "config.json", config)

    def read_config(self) -> dict[str, Any]:
        f = self.path / "config.json"
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: --resume needs the --out of an earlier run")
        try:
            return json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunDirError(f"{f} is not valid JSON ({err}); it was not written by desloc or was "
                              "damaged") from None

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every logged row; a torn last line (crash mid-append) is dropped with a warning."""
        f = self.path / "metrics.jsonl"
        if not f.exists():
            return []
        lines = f.read_text(errors="replace").splitlines()
        rows = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    self._warn(f"dropping the torn last line of {f} (a crash while it was written)")
                    break
                raise RunDirError(f"{f} line {i + 1} is not JSON; remove that line to continue") from None
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """Keep rows logged up to ``after_step`` (later ones are recomputed when resuming)."""
        rows = [r for r in self.read_metrics() if r["step"] <= after_step]
        atomic_write_bytes(self.path / "metrics.jsonl", "".join(dumps(r) + "\n" for r in rows).encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def read_summary(self) -> dict[str, Any] | None:
        f = self.path / "summary.json"
        try:
            return json.loads(f.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._warn(f"{f} is not valid JSON; ignoring it")
            return None

    # ------------------------------------------------------------- checkpoints
    def checkpoint_file(self, step: int, rank: int) -> Path:
        return self.ckpt_root / f"step-{step:08d}" / f"rank{rank}.pt"

    def save_checkpoint(self, step: int, rank: int, state: dict[str, Any]) -> None:
        """Write this rank's file, then its checksum (a file without one is never trusted)."""
        f = self.checkpoint_file(step, rank)
        digest = atomic_torch_save(f, state)
        atomic_write_json(f.with_suffix(".sha256"), {"sha256": digest, "bytes": f.stat().st_size})

    def publish_checkpoint(self, step: int, ranks: int = 1, keep: int = 2) -> None:
        """Point ``latest.json`` at ``step`` (after every rank saved) and prune older ones."""
        atomic_write_json(self.ckpt_root / "latest.json", {"step": step, "ranks": ranks})
        older = [s for s in self.checkpoint_steps() if s < step]
        for old in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(self.ckpt_root / f"step-{old:08d}", ignore_errors=True)

    def checkpoint_steps(self) -> list[int]:
        steps = []
        for p in self.ckpt_root.glob("step-*"):
            try:
                steps.append(int(p.name.split("-", 1)[1]))
            except ValueError:
                continue
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The step ``latest.json`` names (None if it is missing or unreadable)."""
        f = self.ckpt_root / "latest.json"
        try:
            return int(json.loads(f.read_text())["step"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self._warn(f"{f} is malformed; looking for checkpoints on disk instead")
            return None

    def verify_checkpoint(self, step: int, ranks: list[int]) -> str | None:
        """None if every rank's file of ``step`` matches its checksum, else what is wrong."""
        for rank in ranks:
            f = self.checkpoint_file(step, rank)
            if not f.exists():
                return f"{f.name} is missing"
            try:
                meta = json.loads(f.with_suffix(".sha256").read_text())
                expected, size = str(meta["sha256"]), int(meta["bytes"])
            except FileNotFoundError:
                if self._legacy():
                    continue  # written before checksums existed: loadability is all we can check
                return f"{f.name} has no checksum (its write never completed)"
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                return f"{f.with_suffix('.sha256').name} is malformed"
            actual = f.stat().st_size
            if actual != size:
                return f"{f.name} has {actual} bytes, its checksum file says {size} (truncated?)"
            if _sha256(f) != expected:
                return f"{f.name} does not match its sha256 (corrupted)"
        return None

    def _legacy(self) -> bool:
        """A run written by a desloc without checkpoint checksums (its latest.json has no "ranks")."""
        try:
            legacy = "ranks" not in json.loads((self.ckpt_root / "latest.json").read_text())
        except (OSError, ValueError, TypeError):
            return False
        if legacy and not getattr(self, "_legacy_warned", False):
            self._legacy_warned = True
            self._warn(f"the checkpoints in {self.ckpt_root} were written by an older desloc without checksums; "
                       "they are loaded unverified")
        return legacy

    def resume_step(self, ranks: list[int]) -> int | None:
        """The newest checkpoint every rank in ``ranks`` can load; warns about each one skipped."""
        latest = self.latest_step()
        steps = self.checkpoint_steps()
        if latest is None and steps:
            self._warn(f"{self.ckpt_root / 'latest.json'} is missing or unreadable; using the newest valid "
                       "checkpoint on disk")
        for step in reversed([s for s in steps if latest is None or s <= latest]):
            why = self.verify_checkpoint(step, ranks)
            if why is None:
                if latest is not None and step != latest:
                    self._warn(f"falling back to the checkpoint of step {step}")
                return step
            self._warn(f"skipping the checkpoint of step {step}: {why}")
        return None

    def load_checkpoint(self, rank: int, step: int | None = None) -> dict[str, Any]:
        """Load one rank's verified checkpoint (the newest valid one if ``step`` is None)."""
        if step is None:
            step = self.resume_step([rank])
            if step is None:
                raise FileNotFoundError(f"no valid checkpoint in {self.ckpt_root}")
        else:
            why = self.verify_checkpoint(step, [rank])
            if why is not None:
                raise RunDirError(f"checkpoint of step {step} in {self.ckpt_root} is unusable: {why}")
        f = self.checkpoint_file(step, rank)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is the same to the user
            raise RunDirError(f"cannot load {f}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def plot_run(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """loss.png (train and validation loss vs step), loss_vs_bytes.png and loss_vs_time.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    steps = [r["step"] for r in rows]
    val = [(r["step"], r["val_loss"], r["bytes_sent"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [math.nan if r.get("train_loss") is None else r["train_loss"] for r in rows]
    ax.plot(steps, train, lw=0.8, alpha=0.6, label="train (mean over workers)")
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path / "loss.png", dpi=110)
    plt.close(fig)
    timed = [(r["modeled_time_s"], r["val_loss"]) for r in rows
             if r.get("val_loss") is not None and r.get("modeled_time_s") is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([t for t, _ in timed], [v for _, v in timed], "o-", ms=3)
        ax.set_xlabel("modeled time (s)")
        ax.set_ylabel("validation loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path / "loss_vs_time.png", dpi=110)
        plt.close(fig)
    if val:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([max(v[2], 1) for v in val], [v[1] for v in val], "o-", ms=3)
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per worker (log)")
        ax.set_ylabel("validation loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        fig.savefig(path / "loss_vs_bytes.png", dpi=110)
        plt.close(fig)
