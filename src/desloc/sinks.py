"""Optional logging sinks: every metrics row of a run also to TensorBoard (``--tensorboard``) and / or
W&B (``--wandb``).

``metrics.jsonl`` stays the source of truth: a sink receives the same rows, after they are written
there, and nothing reads a sink back. The loop knows only :class:`MetricsSink` (``log(row)`` per
logging step, ``close()`` at the end, also after an error); what a row becomes in each tool is here.

A row's scalars (:func:`scalars`) are its numeric fields other than ``step``, which is the global
step: losses, ``lr``, norms, ``tokens``, ``workers``, ``bytes_sent``, ``elapsed_s``,
``modeled_time_s``; the bytes per state as ``bytes/<state>``; ``--state-dynamics`` as
``state_dynamics/<state>/<measure>``. A value that is ``None`` (no evaluation at this step, an idle
step) or not finite (written as ``null`` in the JSONL) is left out.

* TensorBoard: event files in ``RUN/tensorboard/``; the resolved configuration as text (tag
  ``config``) and as hparams (flattened, lists as text) once, when the directory gets its first
  events. Each row is flushed as it is written, so a crash loses no more than ``metrics.jsonl``.
  On ``--resume`` from step k the writer continues in the same directory and purges the events
  after step k (TensorBoard's ``purge_step``): rows that ``metrics.jsonl`` dropped for being after
  the checkpoint disappear from TensorBoard too, and are replaced by the recomputed ones.
* W&B: ``wandb.init`` with the configuration, its files under ``RUN/wandb/``; ``step`` is the
  x-axis of every metric (``define_metric``). Without credentials (no ``WANDB_API_KEY``, no
  ``~/.netrc`` entry for the W&B host) and without ``WANDB_MODE``, the run is logged offline (an
  air-gapped machine works; upload later with ``wandb sync RUN/wandb/offline-run-*``). The W&B run
  id is kept in ``RUN/wandb/desloc-run-id`` and reused on ``--resume`` (``resume="allow"``): online
  the W&B run continues; offline, W&B makes a new offline run directory per process with that same
  id, each synced on its own. The project is ``WANDB_PROJECT`` (default ``desloc``), the run's name
  its directory's name.

Only the process that writes the records opens sinks (rank 0, the engine's ``is_main``); the others
get a :class:`NullSink`.
"""

from __future__ import annotations

import importlib
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Protocol

from desloc.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "desloc-run-id"
WANDB_INSTALL = "`pip install wandb` (or desloc's extra: `pip install 'desloc[wandb]'`)"


class MetricsSink(Protocol):
    """Where the loop sends each metrics row besides ``metrics.jsonl``."""

    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """No sink: ranks that do not write records, runs without --tensorboard / --wandb."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Sinks:
    """Several sinks as one; ``close`` closes every one even if an earlier one fails."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    def log(self, row: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(row)

    def close(self) -> None:
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001 - close the others, then report the first
                errors.append(err)
        self.sinks = []
        if errors:
            raise errors[0]


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric fields other than ``step`` as ``{tag: value}``: nested dicts flattened with
    ``/`` (``bytes_by_state`` as ``bytes/<state>``), ``None`` and non-finite values left out."""
    out: dict[str, float] = {}

    def add(tag: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                add(f"{tag}/{key}", sub)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[tag] = float(value)

    for key, value in row.items():
        if key != "step":
            add("bytes" if key == "bytes_by_state" else key, value)
    return out


def _flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"method.period_x": 16, ...}``: numbers, strings and booleans as they are, lists as text,
    ``None`` left out (the hparams plugin has no null)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = ",".join(str(v) for v in value)
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
    return out


def _require(module: str, flag: str, package: str, install: str) -> Any:
    """Import ``module`` for ``flag``, or a ConfigError naming ``package`` and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{flag} needs the {package} package, which cannot be imported here ({err}); install "
                          f"it with {install}, or drop {flag}") from None


def require_sinks(config: dict[str, Any]) -> None:
    """Fail before any work when a sink the config asks for cannot be imported."""
    if config.get("tensorboard"):
        _require("torch.utils.tensorboard", "--tensorboard", "tensorboard", "`pip install tensorboard`")
    if config.get("wandb"):
        _require("wandb", "--wandb", "wandb", WANDB_INSTALL)


class TensorBoardSink:
    """Scalars in ``log_dir`` (``RUN/tensorboard``), global step = the row's step."""

    def __init__(self, log_dir: Path, config: dict[str, Any], start: int) -> None:
        tb = _require("torch.utils.tensorboard", "--tensorboard", "tensorboard", "`pip install tensorboard`")
        log_dir = Path(log_dir)
        continued = log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*"))
        # a resumed run: events after the checkpoint's step are hidden by TensorBoard (and re-logged)
        self.writer = tb.SummaryWriter(str(log_dir), purge_step=start + 1 if continued else None)
        if not continued:
            self._write_config(config)
        self.writer.flush()

    def _write_config(self, config: dict[str, Any]) -> None:
        import json

        from torch.utils.tensorboard.summary import hparams

        text = json.dumps(config, indent=2, sort_keys=True)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), global_step=0)
        # hparams in this run's own event file (SummaryWriter.add_hparams would open a sub-run)
        writer = self.writer._get_file_writer()
        for summary in hparams(_flat_config(config), {"val_loss": None, "train_loss": None}):
            writer.add_summary(summary)

    def log(self, row: dict[str, Any]) -> None:
        step = row["step"]
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_has_credentials(environ: dict[str, str] | None = None) -> bool:
    """A W&B API key in the environment, or a ``~/.netrc`` (``NETRC``) entry for the W&B host."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY"):
        return True
    from urllib.parse import urlsplit

    host = urlsplit(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        import netrc

        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
    """One W&B run per desloc run; offline when there are no credentials (see the module docstring)."""

    def __init__(self, run_path: Path, config: dict[str, Any], start: int) -> None:
        wandb = _require("wandb", "--wandb", "wandb", WANDB_INSTALL)
        run_path = Path(run_path)
        files = run_path / WANDB_DIR  # wandb.init(dir=RUN) writes under RUN/wandb/
        files.mkdir(parents=True, exist_ok=True)
        id_file = files / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(6)  # lowercase letters and digits, as W&B's own ids
            id_file.write_text(run_id + "\n")
        mode = None
        if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
            mode = "offline"
            print(f"desloc: --wandb: no W&B credentials (WANDB_API_KEY, ~/.netrc): logging offline to {files}; "
                  f"upload later with `wandb sync {files}/offline-run-*`", file=sys.stderr, flush=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "desloc"), name=run_path.name,
                                  dir=str(run_path), id=run_id, resume="allow", config=config, mode=mode,
                                  settings=wandb.Settings(console="off"))  # leave desloc's stdout / stderr alone
        except Exception as err:  # noqa: BLE001 - W&B's own errors (network, login) as one line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"--wandb: W&B could not start the run ({first}); check the credentials and the "
                              "network, or log offline with WANDB_MODE=offline, or drop --wandb") from err
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # rows re-logged after a resume keep their step

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({"step": row["step"], **scalars(row)})

    def close(self) -> None:
        self.run.finish()


def open_sinks(config: dict[str, Any], run_path: Path, start: int, is_main: bool) -> MetricsSink:
    """The sinks ``config`` (a resolved TrainConfig dict) asks for, for a run continuing after step
    ``start`` (0: from the beginning); a :class:`NullSink` on a process that writes no records."""
    if not is_main:
        return NullSink()
    sinks: list[MetricsSink] = []
    try:
        if config.get("tensorboard"):
            sinks.append(TensorBoardSink(Path(run_path) / TENSORBOARD_DIR, config, start))
        if config.get("wandb"):
            sinks.append(WandbSink(Path(run_path), config, start))
    except BaseException:
        Sinks(sinks).close()
        raise
    if not sinks:
        return NullSink()
    return sinks[0] if len(sinks) == 1 else Sinks(sinks)
