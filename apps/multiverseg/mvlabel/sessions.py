"""Slicer's sessions (an image uploaded for segmentation, not into the datastore), kept to their owner and
their expiry.

MONAI Label's ``Sessions`` hands a session to whoever names its id (a time-based uuid1, guessable), serves
an expired one until its clean-up pass (every five minutes) comes by, and answers with server file paths.
Here a session id is random (uuid4), only the user who uploaded it sees it (with authentication on; else all
users are one), it is gone the moment it expires, and its answers name the image file, not where it lies
when paths are hidden.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Optional

from monailabel.utils.sessions import SessionInfo, Sessions

from .guard import current_user

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class _PathsHidden(SessionInfo):
    """A session as the routes answer it when server paths are hidden: the image's file name only."""

    def to_json(self, indent=None) -> dict:
        out = super().to_json(indent)
        out.pop("path", None)
        out["image"] = os.path.basename(self.image)
        return out


class CheckedSessions(Sessions):
    hide_paths = False  # the app sets it when authentication is on

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        session_id, info = super().add_session(data_file, expiry, uncompress, session_id or str(uuid.uuid4()))
        info.meta = {**(info.meta or {}), "owner": current_user.get()}
        self._write_meta_info(session_id, info)
        return session_id, self._answer(info)

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True) -> Optional[SessionInfo]:
        """The caller's live session of that id, else None (a 404 for the routes)."""
        if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            return None
        info = super().get_session(session_id, update_ts=False, fetch_cache=fetch_cache)
        if info is None:
            return None
        if self._expired(info):
            self.remove_session(session_id)
            return None
        if (info.meta or {}).get("owner", current_user.get()) != current_user.get():
            return None  # another user's: as if it did not exist
        if update_ts:
            info.last_access_ts = int(time.time())
            self._write_meta_info(session_id, info)
        return self._answer(info)

    def remove_expired(self) -> int:
        """The periodic clean-up: every expired, unreadable or dangling session, whoever owns it."""
        if not os.path.isdir(self.store_path):
            return 0
        count = 0
        for session_id in os.listdir(self.store_path):
            folder = os.path.join(self.store_path, session_id)
            if os.path.isdir(folder):
                info = Sessions.get_session(self, session_id, update_ts=False, fetch_cache=False)
                if info is None and time.time() - os.path.getmtime(folder) < self.expiry:
                    continue  # an upload still being moved in: its meta file comes last
                if info is None or self._expired(info):
                    self.remove_session(session_id)
                    count += 1
        return count

    @staticmethod
    def _expired(info: SessionInfo) -> bool:
        return info.expiry > 0 and info.last_access_ts + info.expiry < time.time()

    def _answer(self, info: SessionInfo) -> SessionInfo:
        return (_PathsHidden if self.hide_paths else SessionInfo)(info.__dict__)
