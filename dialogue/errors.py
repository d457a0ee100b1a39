"""Errors raised by the turn pipeline; the family's base lives in memory.errors (the lowest room)."""

from memory.errors import InvalidInput, NotFound, RapportError, StoreUnavailable


class GenerationError(RapportError):
    """The model failed to produce a reply (after a retry); nothing was recorded."""


class AlreadyHandled(RapportError):
    """A channel's event (a Telegram update, a Chatwoot message) whose turn was recorded before: a redelivery."""


class Overloaded(RapportError):
    """This process is answering as many turns as it takes at once; the message was not taken. Try again later."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


__all__ = ["AlreadyHandled", "Overloaded", "GenerationError", "InvalidInput", "NotFound", "RapportError", "StoreUnavailable"]
