"""Sending a round's messages and waiting for the replies, stoppable from another thread.

Under Ray the server runs in a thread of its own: Ctrl-C, SIGTERM or the simulation
runtime stopping set a :class:`ServerStop`, and :func:`exchange` polls for replies in
short waits so that it notices and ends the run.
"""

from __future__ import annotations

import threading
import time

from flwr.app import Message
from flwr.serverapp import Grid

from fedimb.server.errors import SimulationEnded

# Seconds between polls for replies under Ray. Flower's grid polls every 0.1 s; a
# shorter wait shortens each round (benchmarks/README.md).
PULL_INTERVAL = 0.02


class ServerStop(threading.Event):
    """Set from another thread to end the server's wait for replies (see :func:`exchange`).

    :meth:`set` (Ctrl-C, SIGTERM) interrupts the run, which can be resumed;
    :meth:`fail` says that the simulation runtime itself stopped, and the run is
    recorded as failed, with that cause.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cause: BaseException | None = None

    def fail(self, cause: BaseException) -> None:
        if not self.is_set():  # an interruption stays one
            self.cause = cause
            self.set()

    def raise_reason(self) -> None:
        if self.cause is None:
            raise KeyboardInterrupt  # recorded by run_server as an interruption
        raise SimulationEnded(self.cause) from self.cause


def exchange(
    grid: Grid, messages: list[Message], timeout: float | None, stop: ServerStop | None
) -> list[Message]:
    """Send ``messages`` on ``grid``; their replies, all or those come within ``timeout``.

    Without ``stop``, the grid's own ``send_and_receive``; with it, pushes and then pulls
    every ``PULL_INTERVAL`` seconds, raising KeyboardInterrupt (or SimulationEnded) in
    this thread once ``stop`` is set.
    """
    if stop is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        if stop.is_set():
            stop.raise_reason()
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending -= {reply.metadata.reply_to_message_id for reply in got}
        if deadline is not None and time.monotonic() >= deadline:
            break
        if pending:
            stop.wait(PULL_INTERVAL)
    return replies
