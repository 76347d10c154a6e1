"""The one error type the app raises for bad input; ``main`` turns it into an HTTP 4xx with its message."""

import os

MAX_MESSAGE = 600  # characters: a message may quote the input, which can be megabytes


def shorten(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message``, cut to ``limit`` characters where it quotes a long input."""
    return message if len(message) <= limit else message[: limit - 20] + " ... (message cut)"


def calling(message: str, path: str, name: str) -> str:
    """``message`` with a server file ``path`` (a request's temporary copy of an upload) called ``name``, as
    the client knows it."""
    return message.replace(path, name).replace(os.path.basename(path), name)


class BadRequest(ValueError):
    """A request the server cannot serve as sent: ``status`` is the HTTP code (4xx; 502/503 where the PACS failed)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(shorten(message))
        self.status = status
