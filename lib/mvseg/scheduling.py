"""One network, many callers: interactive clicks go before background work.

:class:`PriorityLock` guards the model. A thread marked background (``with lock.background():``: zero-click
volumes, next-sample scoring, batch jobs) takes the lock only when no foreground caller (a click) is
waiting for it, so a click waits for at most the one forward already running. Background work must
therefore take the lock once per forward, never around a whole job.
"""

from __future__ import annotations

import contextlib
import threading


class PriorityLock:
    def __init__(self):
        self._cond = threading.Condition()
        self._held = False
        self._foreground_waiting = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def background(self):
        """Mark this thread's acquisitions as background for the duration."""
        before = getattr(self._local, "background", False)
        self._local.background = True
        try:
            yield
        finally:
            self._local.background = before

    def __enter__(self):
        background = getattr(self._local, "background", False)
        with self._cond:
            if not background:
                self._foreground_waiting += 1
            try:
                while self._held or (background and self._foreground_waiting):
                    self._cond.wait()
            finally:
                if not background:
                    self._foreground_waiting -= 1
            self._held = True
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._held = False
            self._cond.notify_all()
