"""The error family every room raises; the edges (REPL, API, Telegram) turn these into words."""


class RapportError(Exception):
    """Base of every error Rapport raises on purpose; its message is fit to show a user."""


class InvalidInput(RapportError):
    """The caller sent something we refuse: empty, oversized, malformed or hostile."""


class NotFound(RapportError):
    """The named record (turn, memory, FAQ entry, adapter version) does not exist."""


class StoreUnavailable(RapportError):
    """A store (database, Chroma, model cache) cannot be reached or is held by another process."""
