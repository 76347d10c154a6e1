"""The one error type the app raises for bad input; ``main`` turns it into an HTTP 4xx with its message."""


class BadRequest(ValueError):
    """A request the server cannot serve as sent: ``status`` is the HTTP code (400, 404, 409, 415, 422)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status
