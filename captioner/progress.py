"""Progress bars that suit where they are written.

On a terminal, :class:`Progress` is tqdm as usual: one line redrawn in place. Anywhere else
(a log file, a pipe, CI, a notebook's captured stderr) it writes whole lines, never frames
joined by ``\\r``: one line when a quarter of the work is done, at each further quarter, and
one at the end (a loop of unknown length: one line at the end). A 7-minute training run then
logs a handful of lines per epoch instead of thousands of frames.

``CAPTIONER_PROGRESS=lines`` or ``=bars`` forces either form.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm as _tqdm

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}]"


def _is_terminal(stream) -> bool:
    forced = os.environ.get("CAPTIONER_PROGRESS", "")
    if forced in ("lines", "bars"):
        return forced == "bars"
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or unusual streams
        return False


class Progress(_tqdm):
    """tqdm, writing whole lines at every ``every`` percent when its stream is not a terminal.

    Args:
        every: percent of the total between two lines in line mode (default 25).
        Everything else as for ``tqdm``.
    """

    def __init__(self, *args, every: float = 25.0, **kwargs) -> None:
        self._lines = not kwargs.get("disable") and not _is_terminal(kwargs.get("file") or sys.stderr)
        self._every, self._next_percent, self._written_n = every, every, 0
        if self._lines:
            kwargs.setdefault("mininterval", 0.0)  # display() decides when to write
        super().__init__(*args, **kwargs)

    def _write_line(self) -> None:
        meter = self.format_dict
        meter["bar_format"] = LINE_FORMAT if self.total else LINE_FORMAT_NO_TOTAL
        self.fp.write(self.format_meter(**meter).strip() + "\n")
        self.fp.flush()
        self._written_n = self.n

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self._lines:
            return super().display(msg, pos)
        if msg is not None:  # tqdm clearing the line on close: nothing to clear
            return False
        if self.total and self.n > self._written_n and 100.0 * self.n / self.total >= self._next_percent:
            self._write_line()
            while self._next_percent <= 100.0 * self.n / self.total:
                self._next_percent += self._every
        return True

    def close(self) -> None:
        if self._lines and not self.disable:
            if self.n > self._written_n:
                self._write_line()  # the last line: where the loop ended (complete or not)
            self.leave = False  # tqdm's own closing newline and redraw are for terminals
        super().close()


tqdm = Progress  # ``from captioner.progress import tqdm`` in place of ``from tqdm.auto import tqdm``
