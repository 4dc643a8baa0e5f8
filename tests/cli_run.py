"""Running `modfit` in the test process: its exit status and what it printed, shared by the CLI tests."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modfit import cli


@dataclass(frozen=True)
class Run:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_cli(*argv: str | Path) -> Run:
    """`modfit ARGV...` with stdout and stderr captured here (usable where capsys is not, e.g. in
    module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main([str(a) for a in argv])
    return Run(status, out.getvalue(), err.getvalue())
