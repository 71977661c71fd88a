"""How a command ends: the one mapping from an error to the exit code and the line on stderr, and the
one-line description of a failed torch.distributed collective."""

from __future__ import annotations

import os
import re

from desloc.errors import (CheckpointMismatchError, ConfigError, DivergenceError, Interrupted, RunComplete,
                           RunDirError)


_COLLECTIVE_HINTS = re.compile(r"gloo|nccl|timed out|by peer|broken pipe|connection (?:reset|closed|refused)",
                               re.IGNORECASE)


def collective_failure_message(err: BaseException, timeout_s: float | None, env: dict | None = None) -> str | None:
    """One line for a failed torch.distributed collective (a timeout, a peer that died), or None
    when ``err`` is not one. Names the rank that is not answering when it can be told: the
    message names a peer address, or there are only two ranks."""
    text = str(err).strip()
    dist_error = any(c.__name__.startswith("Dist") for c in type(err).__mro__)
    if not (dist_error or _COLLECTIVE_HINTS.search(text)):
        return None
    env = os.environ if env is None else env
    rank = env.get("RANK", "")
    world = env.get("WORLD_SIZE", "")
    core = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h)(?::\d+)?\]\s*", "", text.splitlines()[0] if text else type(err).__name__)
    timed_out = re.search(r"timed out|timeout", text, re.IGNORECASE) is not None
    peer = re.search(r"\[([0-9a-fA-F.:]+|[\w.-]+)\]:(\d+)", text)
    at = f" (peer {peer.group(1)}:{peer.group(2)})" if peer else ""
    if rank.isdigit() and world.isdigit() and int(world) == 2:
        who = f"rank {1 - int(rank)}{at} is not answering"
    elif peer:
        who = f"the rank at {peer.group(1)}:{peer.group(2)} is not answering"
    elif world.isdigit():
        who = (f"one of the other {int(world) - 1} ranks is not answering (the ranks that report no such error "
               "are the suspects)")
    else:
        who = "another rank is not answering"
    me = f"rank {rank}" if rank.isdigit() else "this process"
    limit = f"{timeout_s:g} s" if timeout_s is not None else "the collective timeout"
    if timed_out:
        what = f"{me} waited {limit} in a collective and {who}: it may be stopped (SIGSTOP), hung or dead"
    else:
        what = f"a collective failed on {me}; {who}: it may have crashed or been killed"
    return (f"{what} [{core}]; check that worker's process and log, then continue with --resume. "
            f"Change how long a collective waits with --timeout SECONDS"
            + (f" (now {timeout_s:g})" if timeout_s is not None else ""))


def exit_code_for(err: BaseException, timeout_s: float | None = None) -> tuple[int, str | None] | None:
    """The exit code of a command that raised ``err`` and the line it prints on stderr (None: nothing),
    or None when ``err`` is not one a user can act on from a message (a bug: its traceback is kept).

    0: the run is already complete, or the reader of stdout went away (``| head``); an interruption's
    own code (only rank 0 reports it); 3: the loss diverged; 2: a configuration, checkpoint, run
    directory or file error, another OS error (disk full, permissions), or a collective that timed out
    or lost its peer under torchrun (``timeout_s``: the --timeout it waited)."""
    if isinstance(err, RunComplete):
        return 0, f"desloc: {err}"
    if isinstance(err, Interrupted):
        return err.exit_code, f"desloc: {err}" if int(os.environ.get("RANK", "0")) == 0 else None
    if isinstance(err, DivergenceError):
        return 3, f"desloc: error: {err}"
    if isinstance(err, (ConfigError, CheckpointMismatchError, RunDirError, FileNotFoundError)):
        return 2, f"desloc: error: {err}"
    if isinstance(err, BrokenPipeError):  # the reader went away (e.g. `| head`): nothing left to say
        return 0, None
    if isinstance(err, OSError):
        from desloc.records import describe_os_error

        return 2, f"desloc: error: {describe_os_error(err)}"
    if isinstance(err, RuntimeError):  # a collective that timed out or lost its peer (gloo / NCCL)
        message = collective_failure_message(err, timeout_s)
        return None if message is None else (2, f"desloc: error: {message}")
    return None
