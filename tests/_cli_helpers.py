"""Shared by the CLI tests: a refusal as the tests expect it (exit code 2 and one ``desloc: error:``
line), the torchrun environment variables to clear, and flag-list editing."""

from __future__ import annotations

from desloc.cli import main

# what torchrun sets for its workers: cleared where a test must not look like one of them
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def without(args: list[str], *flags: str) -> list[str]:
    """``args`` minus each flag in ``flags`` and its value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def error_line(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit code 2 and a one-line ``desloc: error:`` with no traceback."""
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("desloc: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return errors[0]
