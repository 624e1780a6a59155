"""Progress bars for long work: tqdm's on a terminal; where the CLI's output goes to a file or a pipe (a nohup or
cron job, a container's log), a plain line a minute instead, which a log keeps and a person can read.

Every long loop in clipkit makes its bar with `progress_bar(progress, ...)`, which takes clipkit's `progress`
argument (True shows it, False hides it, None leaves it to where the output goes) and tqdm's others.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm
from tqdm.std import tqdm as plain_tqdm

#: Set by the CLI when its stderr is no terminal (and -q was not given): bars left to where the output goes
#: (`progress=None`) then print a line a minute.
lines = False


def _seconds(text: str | None, default: float = 60.0) -> float:
    try:
        return max(float(text), 0.0) if text else default
    except ValueError:
        return default  # (a typo in the environment does not stop every command)


LINE_SECONDS = _seconds(os.environ.get("CLIPKIT_PROGRESS_SECONDS"))  # seconds between lines


class _LinesFile:
    """A file that passes on only lines with something in them (tqdm ends a bar with a bare newline)."""

    def __init__(self, file):
        self.file = file

    def write(self, text: str) -> None:
        if text.strip():
            self.file.write(text)

    def flush(self) -> None:
        self.file.flush()


class _Lines(plain_tqdm):
    """A tqdm bar that prints its state as a line of its own, at most every LINE_SECONDS (however often tqdm
    redraws it: a postfix set every step too), and once more at the end of work that printed any (a run
    shorter than that prints nothing: its summary says enough)."""

    def __init__(self, *args, **kwargs):
        kwargs.update(disable=False, mininterval=LINE_SECONDS, file=_LinesFile(kwargs.get("file") or sys.stderr),
                      dynamic_ncols=False, ncols=100, ascii=True)
        self._last_line, self._last_n, self._closing = None, None, False
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        started = getattr(self, "start_t", None)  # (None: drawn from __init__, before tqdm sets it)
        if not self.n or started is None:
            return True
        now = time.time()  # (the clock tqdm sets start_t by)
        last_words = self._closing and self._last_line is not None and self.n != self._last_n  # (news since)
        if last_words or (not self._closing and now - (self._last_line or started) >= LINE_SECONDS):
            self.fp.write(f"{self.__str__() if msg is None else msg}\n")
            self.fp.flush()
            self._last_line, self._last_n = now, self.n
        return True

    def close(self):
        self._closing = True
        super().close()


def progress_bar(progress: bool | None, *args, **kwargs) -> tqdm:
    """A progress bar (tqdm's other arguments) for clipkit's `progress` argument: True shows it, False hides
    it, None leaves it to where the output goes (a terminal: a bar; the CLI writing to a file or a pipe: a
    line a minute; elsewhere: none)."""
    if progress is None and lines:
        return _Lines(*args, **kwargs)
    return tqdm(*args, disable=None if progress is None else not progress, **kwargs)
