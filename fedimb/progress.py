"""Progress display shared by single runs (a bar over rounds) and sweeps (a bar over cells).

On a terminal this is a rich progress bar. When disabled, or when stdout is not a
terminal (CI logs, ``| tee``, pytest capture), each update prints one plain line instead,
because a redrawn bar turns into thousands of control characters in a log file.

A run started inside a sweep adds its round bar *under* the sweep's cell bar (same live
display) instead of opening a second one, so the two never fight over the terminal.
Without a terminal, a run inside a sweep prints nothing: the sweep's one line per
finished cell is the log (a 72-cell sweep printed every round of every cell before).
"""

from __future__ import annotations

import math
import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# The live progress display currently on screen (the outermost bar), shared so that
# nested bars become extra rows of it.
_ACTIVE: Progress | None = None
# The outermost bar printing plain lines, if any: bars opened inside it stay silent.
_PLAIN_OUTER: _Bar | None = None


def _format_error(value: float | None) -> str:
    """Format a balanced error for display ("-" when unknown or not finite)."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4f}"


def stdout_is_terminal() -> bool:
    """Whether stdout is an interactive terminal (where a redrawn bar makes sense)."""
    # Under a live bar sys.stdout is rich's proxy, whose isatty() is always False.
    stream = getattr(sys.stdout, "rich_proxied_file", sys.stdout)
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _make_progress() -> Progress:
    """A rich Progress with the columns both bars use (``info`` is a free text field)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stdout),
    )


class _Bar:
    """A bar over ``total`` steps, or plain lines when disabled or not on a terminal.

    Parameters
    ----------
    total : int
        Number of steps (rounds or cells); must be >= 0.
    description : str
        Text shown before the bar / at the start of each plain line.
    enabled : bool
        False for quiet mode: plain lines, no bar.
    silent : bool
        Neither bar nor lines (e.g. a run inside a quiet sweep, which prints per cell).
    """

    def __init__(
        self, total: int, description: str, enabled: bool = True, silent: bool = False
    ) -> None:
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise ValueError(f"total must be an int >= 0, got {total!r}")
        self.total = total
        self.description = description
        self.silent = silent
        self.use_bar = enabled and not silent and stdout_is_terminal()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._owns_display = False
        self._owns_plain = False

    def __enter__(self) -> _Bar:
        global _ACTIVE, _PLAIN_OUTER
        if not self.use_bar:
            if _PLAIN_OUTER is not None:
                self.silent = True  # the outer bar's lines say how it went
            elif not self.silent:
                _PLAIN_OUTER, self._owns_plain = self, True
            return self
        if _ACTIVE is None:
            self._progress = _make_progress()
            self._progress.start()
            _ACTIVE = self._progress
            self._owns_display = True
        else:
            self._progress = _ACTIVE
        self._task = self._progress.add_task(self.description, total=self.total, info="")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _ACTIVE, _PLAIN_OUTER
        if self._owns_plain:
            _PLAIN_OUTER, self._owns_plain = None, False
        if self._progress is None:
            return
        if self._owns_display:
            self._progress.stop()
            _ACTIVE = None
        elif self._task is not None:
            # A nested bar disappears when done; the outer bar shows the outcome.
            self._progress.remove_task(self._task)
        self._progress = None
        self._task = None

    def _advance(self, completed: int, info: str, line: str) -> None:
        """Move the bar to ``completed`` steps, or print ``line`` in plain mode."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed, info=info)
        elif not self.silent:
            print(line, flush=True)


class RunProgress(_Bar):
    """Per-round progress of one run, used as a context manager.

    Examples
    --------
    >>> with RunProgress(3, "quickstart", enabled=False) as bar:
    ...     bar.update(1, 0.5)
    quickstart round 1/3 balanced_error=0.5000
    """

    def __init__(
        self, total_rounds: int, description: str, enabled: bool = True, silent: bool = False
    ) -> None:
        super().__init__(total_rounds, description, enabled, silent)

    def __enter__(self) -> RunProgress:
        super().__enter__()
        return self

    def update(self, round: int, balanced_error: float | None) -> None:
        """Report that ``round`` finished with global ``balanced_error``."""
        text = f"balanced error {_format_error(balanced_error)}"
        line = (
            f"{self.description} round {round}/{self.total} "
            f"balanced_error={_format_error(balanced_error)}"
        )
        self._advance(round, text, line)


class SweepProgress(_Bar):
    """Per-cell progress of a sweep, used as a context manager.

    Examples
    --------
    >>> with SweepProgress(2, "demo", enabled=False) as bar:
    ...     bar.update(1, "seed=0", "completed", 0.25, 1.5)
    demo [1/2] seed=0: completed final_balanced_error=0.2500 (1.5 s)
    """

    def __enter__(self) -> SweepProgress:
        super().__enter__()
        return self

    def update(
        self,
        done: int,
        cell: str,
        status: str,
        final_balanced_error: float | None,
        seconds: float | None = None,
    ) -> None:
        """Report that the ``done``-th cell (named ``cell``) ended with ``status``."""
        err = _format_error(final_balanced_error)
        took = f" ({seconds:.1f} s)" if seconds is not None else ""
        info = f"last: {cell} {status} BE {err}"
        line = (
            f"{self.description} [{done}/{self.total}] {cell}: {status} "
            f"final_balanced_error={err}{took}"
        )
        self._advance(done, info, line)
