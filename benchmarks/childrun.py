"""The one way the benchmarks run a measurement: in a fresh process that prints `RESULT {json}`."""

from __future__ import annotations

import json
import subprocess
import sys


def child_result(cmd: list[str], what: str, env: dict | None = None) -> dict | None:
    """Run `cmd`; its RESULT line as a dict, or None after printing the end of its stderr (naming `what`)."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    result = result_line(r.stdout)
    if result is None:
        print(f"{what} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
    return result


def result_line(stdout: str, tag: str = "RESULT") -> dict | None:
    """The `RESULT {json}` line (`tag`: another word) of a child's output, as a dict (None: it printed none)."""
    for line in stdout.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    return None
