"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class RecsysError(Exception):
    """A user-facing problem (bad input, bad flag, bad config): the message is printed as one line."""


def require(condition: bool, message: str) -> None:
    """Raise RecsysError(message) unless condition holds."""
    if not condition:
        raise RecsysError(message)
