"""Turn SIGTERM/SIGINT (a scheduler's preemption, Ctrl-C) into a request to stop after the current step.

The handler only sets a flag; the loop checks it at a step boundary, agrees on it across ranks (one
all-reduce), saves a checkpoint and exits with a distinct code. A second signal while stopping falls
back to the default behaviour, so a stuck save can still be killed.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """Raised by the loop after it saved the last state in response to a stop signal."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; last state saved to {checkpoint}")


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopFlag:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. not inside some test runners)
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        log.warning("received %s: finishing the current step, then saving and exiting", signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
