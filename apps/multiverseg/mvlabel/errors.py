"""The one error type the app raises for bad input; ``main`` turns it into an HTTP 4xx with its message."""

MAX_MESSAGE = 600  # characters: a message may quote the input, which can be megabytes


def shorten(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message``, cut to ``limit`` characters where it quotes a long input."""
    return message if len(message) <= limit else message[: limit - 20] + " ... (message cut)"


class BadRequest(ValueError):
    """A request the server cannot serve as sent: ``status`` is the HTTP code (4xx; 502/503 where the PACS failed)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(shorten(message))
        self.status = status
