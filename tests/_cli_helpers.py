"""A CLI refusal as the tests expect it: exit code 2 and one ``desloc: error:`` line."""

from __future__ import annotations

from desloc.cli import main


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
