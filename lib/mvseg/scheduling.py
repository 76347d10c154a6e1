"""One network, many callers: interactive clicks go before background work.

:class:`PriorityLock` guards the model. A thread marked background (``with lock.background():``: zero-click
volumes, next-sample scoring, batch jobs) takes the lock only when no foreground caller (a click) is
waiting for it, and a background forward already running steps aside between network blocks
(:meth:`PriorityLock.yield_to_foreground`), so a click waits for about one block, not a whole forward (a
batch of four scoring images at context 16 is ~0.45 s on two cores). Background work must take the lock once
per forward, never around a whole job.
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

    def yield_to_foreground(self) -> None:
        """Called by the thread holding the lock at a safe point (between network blocks): a background
        holder lets every waiting click run first, then takes the lock back. A no-op for foreground
        holders and when no click waits."""
        if not getattr(self._local, "background", False):
            return
        with self._cond:
            if not self._foreground_waiting:
                return
            self._held = False
            self._cond.notify_all()
            while self._held or self._foreground_waiting:
                self._cond.wait()
            self._held = True
