"""Fault injection for the tests: a chat file, killing a process at a point, a disk that fills up.

    write_chats(path, n)                 n copies of one ShareGPT conversation, as JSON Lines
    wait_for(condition, proc); sigkill(proc)
    run_cli("aligndata", "convert", ..., limit=BYTES)    a CLI run whose files may not grow past BYTES
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

CHAT = {"conversations": [{"from": "human", "value": "What is the weather in Paris?"},
                          {"from": "gpt", "value": "It is sunny in Paris today."}]}


def write_chats(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(CHAT) + "\n" for _ in range(n)), encoding="utf-8")
    return path


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll until `condition()` holds; the process must still be running then (else the kill point was missed)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"process ended (rc {proc.returncode}) before the kill point"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.005)


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def full_disk(limit: int):
    """preexec_fn: files may not grow past `limit` bytes; writes beyond fail with EFBIG, as on a full disk."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def run_cli(module: str, *args, limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=120, preexec_fn=full_disk(limit) if limit else None)
