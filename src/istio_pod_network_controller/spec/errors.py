"""Errors of the spec layer: raised where a value is parsed, reported once at the edge.

``SpecError`` names the input (flag or annotation) and the offending value, so the CLI, the
agent's Event and the pod's status all say the same one line.
"""

from __future__ import annotations

MAX_SHOWN = 80


def show(value: object) -> str:
    """A value as it may appear in a one-line message: quoted, escaped, truncated."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_SHOWN:
        text = text[:MAX_SHOWN] + "..."
    # repr() escapes newlines and control characters, so the message stays one line.
    return repr(text)


class SpecError(ValueError):
    """An input that cannot become part of a redirect spec."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: invalid value {show(value)}: {reason}")


class OutOfScope(Exception):
    """A pod we do not program (host network, no mesh sidecar, ...); not an error."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
