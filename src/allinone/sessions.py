"""Stored conversations: an embedded SQLite store of sessions and their messages.

A session is a conversation kept on the server under an id the client chooses (or the store
generates). The HTTP task routes read the recent history of a session before answering and
append the new user message and the reply afterwards, so a conversation survives a restart of
the server. The store is safe to share between threads: one connection, one lock.

Schema (``PRAGMA user_version = 1``)::

    sessions(id TEXT PRIMARY KEY, created_at REAL, updated_at REAL)
    messages(id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT -> sessions.id ON DELETE CASCADE,
             role TEXT, content TEXT, sentiment TEXT NULL (JSON), created_at REAL)

Times are Unix seconds (UTC).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, SessionExistsError, SessionNotFoundError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id          TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id  TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role        TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content     TEXT NOT NULL,
    sentiment   TEXT,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session_id, id);
"""

#: what a session id may look like: 1-128 of letters, digits, '.', '_', ':', '-', not starting
#: with '.' (HTTP clients normalize the paths ``/v1/sessions/.`` and ``/..``: such a session
#: could be created but not read or deleted)
SESSION_ID_PATTERN = r"^[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}$"
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


@dataclass(frozen=True)
class StoredMessage:
    """One message of a stored conversation. ``sentiment`` is the analyze result of a user
    message (``{"label", "scores", "truncated"}``) when it was sent through analyze."""

    role: str
    content: str
    created_at: float
    sentiment: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content, "created_at": int(self.created_at)}
        if self.sentiment is not None:
            out["sentiment"] = self.sentiment
        return out


@dataclass(frozen=True)
class Session:
    """A stored conversation with its messages, oldest first."""

    id: str
    created_at: float
    updated_at: float
    messages: list[StoredMessage] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "session", "created_at": int(self.created_at),
            "updated_at": int(self.updated_at), "messages": [m.to_dict() for m in self.messages],
        }


def check_session_id(session_id: object) -> str:
    """Return ``session_id`` if it matches :data:`SESSION_ID_PATTERN`.

    Raises:
        InvalidInputError: anything else (``param="session_id"``).
    """
    if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
        raise InvalidInputError(
            "session_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'", param="session_id"
        )
    return session_id


class SessionStore:
    """Conversations in one SQLite file (or ``":memory:"``).

    Args:
        path: the database file; its folder is created. ``":memory:"`` keeps nothing on disk.

    Every method may be called from any thread; calls are serialized by a lock (SQLite writes
    are serialized anyway, and the queries are tiny next to a model call).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # check_same_thread=False: requests run on a thread pool; the lock above serializes them.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA foreign_keys = ON")
            if self.path != ":memory:":
                # WAL: readers never block the writer, and a crash mid-write leaves the file intact.
                self._db.execute("PRAGMA journal_mode = WAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- reading ------------------------------------------------------------------------
    def get(self, session_id: str) -> Session:
        """The session with all its messages.

        Raises:
            InvalidInputError: a malformed id.
            SessionNotFoundError: no such session.
        """
        check_session_id(session_id)
        with self._lock:
            row = self._db.execute(
                "SELECT created_at, updated_at FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            if row is None:
                raise SessionNotFoundError(f"no session {session_id!r}", param="session_id")
            rows = self._db.execute(
                "SELECT role, content, created_at, sentiment FROM messages WHERE session_id = ? ORDER BY id",
                (session_id,),
            ).fetchall()
        return Session(session_id, row[0], row[1], [_message(r) for r in rows])

    def history(self, session_id: str, limit: int | None = None) -> list[dict[str, str]]:
        """The last ``limit`` messages (all if ``None``) as ``[{"role", "content"}]``, oldest
        first, ready to be sent to the model. An unknown session has an empty history.

        A window that would start on an assistant message is moved on to the next user
        message, so the model never sees a reply without its question.
        """
        check_session_id(session_id)
        query = "SELECT role, content FROM messages WHERE session_id = ? ORDER BY id DESC"
        params: tuple[Any, ...] = (session_id,)
        if limit is not None:
            query += " LIMIT ?"
            params += (max(0, int(limit)),)
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        messages = [{"role": role, "content": content} for role, content in reversed(rows)]
        while messages and messages[0]["role"] == "assistant":
            messages.pop(0)
        return messages

    def exists(self, session_id: str) -> bool:
        check_session_id(session_id)
        with self._lock:
            return self._db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is not None

    # -- writing ------------------------------------------------------------------------
    def create(self, session_id: str | None = None) -> Session:
        """Create an empty session (a random id if none is given).

        Raises:
            InvalidInputError: a malformed id.
            SessionExistsError: a session with this id already exists.
        """
        session_id = check_session_id(session_id) if session_id is not None else uuid.uuid4().hex
        now = time.time()
        with self._lock:
            try:
                self._db.execute("INSERT INTO sessions (id, created_at, updated_at) VALUES (?, ?, ?)",
                                 (session_id, now, now))
            except sqlite3.IntegrityError:
                raise SessionExistsError(f"session {session_id!r} already exists", param="session_id") from None
        return Session(session_id, now, now)

    def append(self, session_id: str, messages: Sequence[dict[str, Any]]) -> None:
        """Append messages (``{"role", "content", "sentiment"?}``) to a session, creating the
        session if needed. All messages are written in one transaction: all or none.

        Raises:
            InvalidInputError: a malformed id or role.
        """
        check_session_id(session_id)
        now = time.time()
        rows = []
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise InvalidInputError("a stored message needs a role and text content", param="messages")
            sentiment = m.get("sentiment")
            rows.append((session_id, m["role"], m["content"],
                         json.dumps(sentiment, ensure_ascii=False) if sentiment is not None else None, now))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO sessions (id, created_at, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at",
                    (session_id, now, now),
                )
                self._db.executemany(
                    "INSERT INTO messages (session_id, role, content, sentiment, created_at) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def delete(self, session_id: str) -> None:
        """Delete a session and all its messages.

        Raises:
            InvalidInputError: a malformed id.
            SessionNotFoundError: no such session.
        """
        check_session_id(session_id)
        with self._lock:
            deleted = self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount
        if not deleted:
            raise SessionNotFoundError(f"no session {session_id!r}", param="session_id")

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "SessionStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _message(row: tuple) -> StoredMessage:
    role, content, created_at, sentiment = row
    return StoredMessage(role, content, created_at, json.loads(sentiment) if sentiment else None)
