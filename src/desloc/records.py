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
* Every write names its file when it fails (:func:`writing`): the OS's errors and torch's
  serializer's RuntimeError become one ``OSError`` with the file's name, which the CLI prints as
  one line (``cannot write <file>: ...``, or "no space left on device while writing <file>").
* Every record read back is validated: ``config.json`` must be a JSON object, every
  ``metrics.jsonl`` row an object with an integer ``step``, ``summary.json`` an object with the
  fields of its ``status`` (:func:`summary_problem`), ``latest.json`` and the checksum files
  integers in range, a checkpoint a dict with its ``step``. A bad one is skipped with a warning
  where the record can be recomputed, and otherwise refused with a RunDirError naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch

from desloc.errors import RunDirError

# What desloc itself writes into a run directory (``--overwrite`` removes only these).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "loss.png", "loss_vs_bytes.png", "loss_vs_time.png",
             "checkpoints", "tensorboard", "wandb")  # the last two: --tensorboard / --wandb (desloc.sinks)
LOCK_FILE = ".lock"


def warn(message: str) -> None:
    print(f"desloc: warning: {message}", file=sys.stderr, flush=True)


def _file_mode() -> int:
    """Mode of a new ordinary file under the current umask (mkstemp would give 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# torch's serializer reports a failed write (a full disk among others) as a RuntimeError without an
# errno; with less free space than this left on the file system, it is taken to be a full disk
DISK_FULL_BYTES = 1 << 20


@contextlib.contextmanager
def writing(path: str | Path, serializer: bool = True) -> Iterator[None]:
    """Writes of ``path`` inside this block that fail raise one ``OSError`` naming ``path``: the OS's
    errors keep their errno; with ``serializer`` (the block only serializes, no collective that could
    fail with a RuntimeError of its own), torch's serializer's RuntimeError becomes ENOSPC when the
    file system has less than :data:`DISK_FULL_BYTES` free, else EIO with torch's first line."""
    try:
        yield
    except OSError as err:
        if err.filename == str(path):
            raise
        raise OSError(err.errno or errno.EIO, err.strerror or str(err) or type(err).__name__, str(path)) from err
    except RuntimeError as err:
        if not serializer or type(err) is not RuntimeError:  # DivergenceError and the like: not a write failure
            raise
        try:
            full = shutil.disk_usage(Path(path).parent).free < DISK_FULL_BYTES
        except OSError:
            full = False
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OSError(errno.EIO, f"torch could not write it ({first})", str(path)) from err


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``; the temporary file never outlives a failure,
    and a failure names ``path`` (:func:`writing`)."""
    with writing(path):
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
        return (f"no space left on device while writing {where}; free some space, then repeat the command "
                "(desloc train: continue with --resume; the last complete checkpoint is kept)")
    return f"cannot write {where}: {err.strerror or err}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# summary.json: the fields each status must hold, and what each must be
_SUMMARY_FIELDS: dict[str, tuple[str, ...]] = {
    "complete": ("method", "steps", "tokens", "final_val_loss", "final_val_ppl", "bytes_sent", "bytes_by_state",
                 "ratio_vs_ddp", "wall_time_s", "periods", "seed"),
    "diverged": ("diverged_at_step",),
}
_SUMMARY_KINDS: dict[str, tuple[str, Any]] = {
    "method": ("a string", lambda v: isinstance(v, str)),
    "steps": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "tokens": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "bytes_sent": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "seed": ("an integer", _is_int),
    "diverged_at_step": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "final_val_loss": ("a finite number", _is_number),
    "final_val_ppl": ("a finite number", _is_number),
    "wall_time_s": ("a finite number", _is_number),
    "ratio_vs_ddp": ("a finite number", _is_number),
    "bytes_by_state": ("an object", lambda v: isinstance(v, dict)),
    "periods": ("an object", lambda v: isinstance(v, dict)),
}


def summary_problem(summary: Any) -> str | None:
    """None if ``summary`` is a usable summary.json, else what is wrong with it."""
    if not isinstance(summary, dict):
        return f"it holds a JSON {type(summary).__name__}, not an object"
    status = summary.get("status", "complete")
    if status not in _SUMMARY_FIELDS:
        return f"its status {status!r} is none of {sorted(_SUMMARY_FIELDS)}"
    for key in _SUMMARY_FIELDS[status]:
        what, ok = _SUMMARY_KINDS[key]
        if key not in summary:
            return f"it has no {key!r}"
        if not ok(summary[key]):
            return f"its {key!r} is {summary[key]!r}, not {what}"
    return None


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
            config = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunDirError(f"{f} is not valid JSON ({err}); it was not written by desloc or was "
                              "damaged") from None
        except OSError as err:
            raise RunDirError(f"cannot read {f}: {err.strerror or err}") from None
        if not isinstance(config, dict):
            raise RunDirError(f"{f} holds a JSON {type(config).__name__}, not the object desloc writes; it was not "
                              "written by desloc or was damaged")
        return config

    def append_metrics(self, row: dict[str, Any]) -> None:
        f = self.path / "metrics.jsonl"
        with writing(f), open(f, "a") as out:
            out.write(dumps(row) + "\n")

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
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and _is_int(row.get("step")) and row["step"] >= 0:
                rows.append(row)
                continue
            if i == len(lines) - 1:
                self._warn(f"dropping the torn last line of {f} (a crash while it was written)")
                break
            what = "is not JSON" if row is None else "is not a metrics row (an object with an integer 'step')"
            raise RunDirError(f"{f} line {i + 1} {what}; remove that line to continue")
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """Keep rows logged up to ``after_step`` (later ones are recomputed when resuming)."""
        rows = [r for r in self.read_metrics() if r["step"] <= after_step]
        atomic_write_bytes(self.path / "metrics.jsonl", "".join(dumps(r) + "\n" for r in rows).encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json, or None when there is none; a damaged one is ignored with a warning."""
        summary, why = self._load_summary()
        if why is not None:
            self._warn(f"{self.path / 'summary.json'} is damaged: {why}; ignoring it")
        return summary

    def summary_damage(self) -> str | None:
        """What is wrong with summary.json (:func:`summary_problem`); None if it is missing or usable."""
        return self._load_summary()[1]

    def _load_summary(self) -> tuple[dict[str, Any] | None, str | None]:
        f = self.path / "summary.json"
        try:
            summary = json.loads(f.read_text())
        except FileNotFoundError:
            return None, None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return None, f"it is not valid JSON ({err})"
        except OSError as err:
            return None, f"it cannot be read ({err.strerror or err})"
        why = summary_problem(summary)
        return (summary if why is None else None), why

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
            step = json.loads(f.read_text())["step"]
            if not (_is_int(step) and step >= 1):
                raise ValueError(step)
            return step
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
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
                expected, size = meta["sha256"], meta["bytes"]
                if not (isinstance(expected, str) and _is_int(size) and size >= 0):
                    raise ValueError(meta)
            except FileNotFoundError:
                if self._legacy():
                    continue  # written before checksums existed: loadability is all we can check
                return f"{f.name} has no checksum (its write never completed)"
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
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
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is the same to the user
            raise RunDirError(f"cannot load {f}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
        if not isinstance(state, dict) or state.get("step") != step:
            got = state.get("step") if isinstance(state, dict) else type(state).__name__
            raise RunDirError(f"{f} is not the checkpoint of step {step} (it holds {got!r}); it was not written by "
                              "desloc or was moved: remove it to fall back to an older checkpoint")
        return state


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically (a failure names ``path``) and close it."""
    import matplotlib.pyplot as plt

    try:
        _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".")))
    finally:
        plt.close(fig)


def plot_run(path: Path, rows: list[dict[str, Any]], title: str, time_label: str | None = None) -> None:
    """loss.png (train and validation loss vs step), loss_vs_bytes.png and loss_vs_time.png.
    ``time_label``: the network and compute model the modeled time assumes
    (:meth:`desloc.timing.TimeConfig.describe`), written under loss_vs_time.png's time axis."""
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
    save_figure(fig, path / "loss.png")
    timed = [(r["modeled_time_s"], r["val_loss"]) for r in rows
             if r.get("val_loss") is not None and r.get("modeled_time_s") is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([t for t, _ in timed], [v for _, v in timed], "o-", ms=3)
        ax.set_xlabel(f"modeled time (s)\n{time_label}" if time_label else "modeled time (s)", fontsize=9)
        ax.set_ylabel("validation loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, path / "loss_vs_time.png")
    if val:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([max(v[2], 1) for v in val], [v[1] for v in val], "o-", ms=3)
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per worker (log)")
        ax.set_ylabel("validation loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        save_figure(fig, path / "loss_vs_bytes.png")
