"""Clients that stop sending or stop reading hold nothing of the server's for longer than a bounded wait."""

import asyncio
import sys
import time

import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
from mvlabel import guard  # noqa: E402


def test_a_client_that_stops_reading_frees_its_worker_thread(monkeypatch):
    """40 clients that sent a request and never read the answer held the 40 worker threads for good: no click,
    next sample or /info/ was answered until they went away."""
    monkeypatch.setattr(guard, "SEND_TIMEOUT", 0.3)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 1000})

    async def never_drains(message):  # the transport's write buffer is full and the client reads nothing
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def run():
        start = time.monotonic()
        with pytest.raises(guard.ClientStalled, match="read nothing"):
            await guard._in_worker_thread(app, {"type": "http"}, receive, never_drains)
        assert guard._off_loop_threads().borrowed_tokens == 0  # the thread is back for other requests
        return time.monotonic() - start

    assert asyncio.run(run()) < 30


def test_a_request_body_that_stops_coming_is_a_408(monkeypatch):
    monkeypatch.setattr(guard, "BODY_IDLE_TIMEOUT", 0.3)
    parts = [{"type": "http.request", "body": b"abc", "more_body": True}]

    async def receive():
        if parts:
            return parts.pop()
        await asyncio.Event().wait()  # the rest of the body never comes

    async def run():
        await guard.Guard._read_body(type("G", (), {"max_body": 1 << 20})(), receive)

    with pytest.raises(guard.Refusal) as refused:
        asyncio.run(run())
    assert refused.value.status == 408
