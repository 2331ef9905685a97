"""Errors a request can cause. They become an error response for that request only."""


class InvalidRequestError(ValueError):
    """The request is refused; the message names the problem (maps to Triton's INVALID_ARG)."""
