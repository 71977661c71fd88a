"""Shared by the CLI tests: a refusal as the tests expect it (exit code 2 and one ``desloc: error:``
line), the tiny run most of them start from, and flag-list editing."""

from __future__ import annotations

from desloc.cli import main

# a 4-step run of a one-layer model on byte tokens: fast enough for any test that reaches training
TINY = ["--workers", "2", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--kx", "2", "--eval-every", "2",
        "--eval-batches", "1", "--log-every", "2", "--ckpt-every", "2", "--tokenizer", "byte", "--set", "n_layer=1",
        "--set", "n_embd=16", "--set", "n_head=2", "--set", "block_size=16"]


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
