"""Progress of long work (convert, quantize, quant-report, video sampling, model build): one callback type,
shown as tqdm bars on a terminal.

Library functions take an optional `progress` callback and call it as `progress(what, done, total)`;
they never print. `bars()` is the callback the command line hands them: a tqdm bar on stderr per
`what`, or None (nothing at all) with `--quiet` or when stderr is not a terminal (logs and pipes get
no carriage-return noise).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

Progress = Callable[[str, int, int], None]  # (what, done, total)


class Bars:
    """A progress callback drawing one tqdm bar at a time: a new `what` (or total) closes the previous bar."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._bar = None
        self._key: tuple[str, int] | None = None

    def __call__(self, what: str, done: int, total: int) -> None:
        """Show `done` of `total` steps of `what`; the bar goes away when it is complete."""
        from tqdm import tqdm

        if self._key != (what, total):
            self.close()
            self._bar = tqdm(total=total, desc=what, file=self.stream, leave=False, dynamic_ncols=True)
            self._key = (what, total)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        """Remove the current bar, if any."""
        if self._bar is not None:
            self._bar.close()
        self._bar, self._key = None, None


def step_bar(desc: str, total: int, initial: int = 0, stream: TextIO | None = None):  # -> tqdm | None
    """A tqdm bar for a training loop (the caller sets its postfix: loss, held-out accuracy) when `stream`
    (stderr) is a terminal; otherwise None, and the loop's log lines are the record."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    return tqdm(total=total, initial=initial, desc=desc, file=stream, dynamic_ncols=True) if stream.isatty() else None


def bars(quiet: bool = False, stream: TextIO | None = None) -> Progress | None:
    """tqdm bars on `stream` (stderr) when it is a terminal and not `quiet`; otherwise None (no output)."""
    stream = stream or sys.stderr
    if quiet or not stream.isatty():
        return None
    return Bars(stream)
