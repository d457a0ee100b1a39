"""Errors raised by the turn pipeline; the family's base lives in memory.errors (the lowest room)."""

from memory.errors import InvalidInput, NotFound, RapportError, StoreUnavailable


class GenerationError(RapportError):
    """The model failed to produce a reply (after a retry); nothing was recorded."""


class AlreadyHandled(RapportError):
    """A channel's event (a Telegram update, a Chatwoot message) whose turn was recorded before: a redelivery."""


__all__ = ["AlreadyHandled", "GenerationError", "InvalidInput", "NotFound", "RapportError", "StoreUnavailable"]
