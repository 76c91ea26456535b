"""Errors of the spec layer: raised where a value is parsed, reported once at the edge.

``SpecError`` names the input (flag or annotation) and the offending value, so the CLI, the
agent's Event and the pod's status all say the same one line. ``LimitError`` is the SpecError
for an input larger than a bound of ``spec.limits``: it says how large, and the bound, instead
of quoting the value.
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

    def within(self, where: str) -> SpecError:
        """The same error, its field prefixed with where the input came from."""
        return SpecError(f"{where}: {self.field}", self.value, self.reason)


class LimitError(SpecError):
    """An input over one of the bounds of ``spec.limits`` (``size`` counted in ``unit``)."""

    def __init__(self, field: str, size: int, unit: str, limit: int) -> None:
        self.size = size
        self.unit = unit
        self.limit = limit
        reason = f"{size} {unit}, more than the limit of {limit}"
        ValueError.__init__(self, f"{field}: {reason}")
        self.field = field
        self.value = ""
        self.reason = reason

    def within(self, where: str) -> LimitError:
        return LimitError(f"{where}: {self.field}", self.size, self.unit, self.limit)


def check_limit(field: str, size: int, unit: str, limit: int) -> None:
    """Raise LimitError when ``size`` is over ``limit``."""
    if size > limit:
        raise LimitError(field, size, unit, limit)


class OutOfScope(Exception):
    """A pod we do not program (host network, no mesh sidecar, ...); not an error."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TooManyRules(SpecError):
    """What a renderer raises once the rules it builds for one pod pass ``limit``."""

    def __init__(self, limit: int) -> None:
        self.field = "flags"
        self.value = ""
        self.reason = (
            f"they make more than {limit} rules for one pod, the limit "
            "(each -k interface adds a rule per -i CIDR)"
        )
        ValueError.__init__(self, f"{self.field}: {self.reason}")


def too_many_rules(limit: int) -> SpecError:
    return TooManyRules(limit)
