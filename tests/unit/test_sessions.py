"""The SQLite conversation store: round trips, windows, deletion, persistence, threads."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from allinone.errors import InvalidInputError
from allinone.sessions import SCHEMA_VERSION, SessionNotFoundError, SessionStore


@pytest.fixture
def store(tmp_path):
    with SessionStore(tmp_path / "db" / "sessions.sqlite3") as s:
        yield s


def turn(i: int) -> list[dict]:
    return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]


def test_append_creates_the_session_and_reads_back_in_order(store):
    store.append("chat-1", [{"role": "user", "content": "你好 😀", "sentiment": {"label": "positive"}},
                            {"role": "assistant", "content": "hi"}])
    store.append("chat-1", turn(2))
    session = store.get("chat-1")
    assert [m.content for m in session.messages] == ["你好 😀", "hi", "q2", "a2"]
    assert session.messages[0].sentiment == {"label": "positive"}
    assert session.messages[1].sentiment is None
    assert session.created_at <= session.updated_at
    body = session.to_dict()
    assert body["id"] == "chat-1" and body["object"] == "session"
    assert body["messages"][0]["sentiment"] == {"label": "positive"}
    assert "sentiment" not in body["messages"][1]
    assert isinstance(body["created_at"], int)


def test_history_is_the_recent_window_and_never_starts_with_a_reply(store):
    for i in range(5):
        store.append("s", turn(i))
    assert store.history("s") == [m for i in range(5) for m in turn(i)]
    assert store.history("s", limit=4) == turn(3) + turn(4)
    # a window of 3 would start on the reply a3: it starts at the next question instead
    assert store.history("s", limit=3) == turn(4)
    assert store.history("s", limit=0) == []
    assert store.history("unknown") == []


def test_delete_removes_the_session_and_its_messages(store, tmp_path):
    store.append("gone", turn(1))
    store.append("kept", turn(2))
    store.delete("gone")
    with pytest.raises(SessionNotFoundError):
        store.get("gone")
    with pytest.raises(SessionNotFoundError):
        store.delete("gone")
    assert store.history("gone") == []
    assert store.history("kept") == turn(2)
    rows = store._db.execute("SELECT COUNT(*) FROM messages WHERE session_id = 'gone'").fetchone()[0]
    assert rows == 0  # ON DELETE CASCADE really ran


def test_conversations_survive_reopening_the_file(tmp_path):
    path = tmp_path / "s.sqlite3"
    with SessionStore(path) as first:
        first.append("persist", turn(1))
    with SessionStore(path) as second:
        assert second.history("persist") == turn(1)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_create_gives_random_ids_and_refuses_a_taken_one(store):
    a, b = store.create(), store.create()
    assert a.id != b.id and store.exists(a.id)
    store.create("mine")
    with pytest.raises(InvalidInputError, match="already exists"):
        store.create("mine")
    assert store.get("mine").messages == []


@pytest.mark.parametrize("bad", ["", "a" * 129, "has space", "../etc", "semi;colon", None, 5, ".", "..", ".hidden"])
def test_malformed_session_ids_are_rejected(store, bad):
    with pytest.raises(InvalidInputError):
        store.history(bad)
    with pytest.raises(InvalidInputError):
        store.append(bad, turn(1))


def test_a_bad_message_writes_nothing(store):
    with pytest.raises(InvalidInputError):
        store.append("atomic", [{"role": "user", "content": "ok"}, {"role": "tool", "content": "x"}])
    assert not store.exists("atomic")


def test_concurrent_appends_from_threads_all_land(store):
    def work(k: int) -> None:
        for i in range(20):
            store.append(f"t{k % 2}", turn(i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.get("t0").messages) + len(store.get("t1").messages) == 6 * 20 * 2


def test_in_memory_store_works(tmp_path):
    with SessionStore(":memory:") as mem:
        mem.append("m", turn(1))
        assert mem.history("m") == turn(1)
    assert not list(tmp_path.iterdir())
