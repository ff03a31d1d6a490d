"""Preemption: SIGTERM and SIGINT recorded instead of ending the process, so that a run stops at a
point of its choosing (a saved checkpoint) with a clean message, whatever moment the signal came.

A Python signal handler that raises (KeyboardInterrupt) can fire anywhere, even inside a garbage
collector callback that swallows the exception; recording the signal and checking it between steps
never loses it. Contexts nest: an inner one starts with what the outer one received (a signal during
the CLI's imports reaches the training loop) and hands what it received back to the outer one.
"""

from __future__ import annotations

import signal

_active: list[Preemption] = []


class Preemption:
    """A context: inside it SIGTERM and SIGINT are recorded (`received`: the first one's number,
    else None) instead of ending the process; the previous handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> Preemption:
        self.received = _active[-1].received if _active else None
        self._previous = {sig: signal.signal(sig, self._record) for sig in self.SIGNALS}
        _active.append(self)
        return self

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        if _active and _active[-1].received is None:
            _active[-1].received = self.received
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
