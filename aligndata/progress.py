"""Byte-based progress for long reads: silent when stderr is not a terminal or the work is quick."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from aligndata.read.reader import RecordStream

DELAY_S = 1.0


class FileProgress:
    """Call `update()` often; a bar appears only once a file has taken more than DELAY_S seconds."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._stream: RecordStream | None = None
        self._started = 0.0
        self._calls = 0

    def start_file(self, stream: RecordStream, label: str) -> None:
        self._stream = stream
        self._label = label
        self._started = time.monotonic()
        if self._progress is not None:
            self._task = self._progress.add_task(label, total=stream.total_bytes)

    def update(self, records: int = 1) -> None:
        if not self.enabled or self._stream is None:
            return
        before = self._calls
        self._calls += records
        if self._calls // 256 == before // 256:
            return
        if self._progress is None:
            if time.monotonic() - self._started < DELAY_S:
                return
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TimeRemainingColumn(), console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=self._stream.total_bytes)
        self._progress.update(self._task, completed=self._stream.bytes_read())

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
