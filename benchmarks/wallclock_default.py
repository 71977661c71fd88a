"""Record `desloc wallclock`'s default table (the DES-LOC paper's setting) in results/wallclock_default.json.

A model, not a measurement: nothing is timed. The record holds the command, the versions and the
whole JSON the command prints (rows, assumptions, the paper's claim, the sensitivity table).

    python benchmarks/wallclock_default.py
"""

from __future__ import annotations

import contextlib
import io
import json

from _common import write_record

from desloc.cli import main

COMMAND = ["wallclock", "--json"]

if __name__ == "__main__":
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(COMMAND) == 0
    path = write_record("wallclock_default", {"command": "desloc " + " ".join(COMMAND),
                                              "note": "a model, not a measurement", "result": json.loads(out.getvalue())})
    print(f"wrote {path}")
