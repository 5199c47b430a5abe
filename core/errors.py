"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class RecsysError(Exception):
    """A user-facing problem (bad input, bad flag, bad config): the message is printed as one line."""


def require(condition: bool, message: str) -> None:
    """Raise RecsysError(message) unless condition holds."""
    if not condition:
        raise RecsysError(message)


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters other than newline and tab (ESC, BEL, ... from
    ids in a user's data) written as ``\\xNN``, so that they show instead of acting on the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in text)
