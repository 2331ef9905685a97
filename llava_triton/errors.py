"""Errors a request can cause. They become an error response for that request only."""


class InvalidRequestError(ValueError):
    """The request is refused; the message names the problem (maps to Triton's INVALID_ARG)."""


class ServerBusyError(RuntimeError):
    """The request is valid but a queue is full (maps to Triton's UNAVAILABLE): retry later."""
