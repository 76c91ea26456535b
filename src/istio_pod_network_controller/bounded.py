"""Reading JSON that came from a pod or a client, at a bounded cost.

``json.loads`` on hostile text costs time linear in its size, but nesting is only bounded by
Python's recursion limit, which raises RecursionError (not ValueError) from deep inside the
decoder, and everything that walks the result later (``copy.deepcopy``, ``json.dumps``) recurses
again. So text is measured first: its size, then its nesting depth by one linear scan that skips
string contents, and only then decoded. Every failure is a ``BoundedJsonError`` with one line that
says which bound was crossed (a ``JsonLimitError``, with the numbers) or why it is not JSON.
"""

from __future__ import annotations

import json
import operator
import re
from itertools import accumulate, count
from typing import Any

# Nesting deeper than any document we read legitimately has (a Pod is about 10 levels deep; the
# agent's detail annotation 2), and far below the interpreter's recursion limit.
MAX_JSON_DEPTH = 64

# A JSON string, or the rest of the text after an opening quote that is never closed. Possessive
# repeats and the optional closing quote make every match succeed without backtracking, so the
# scan is linear even in text full of stray quotes and backslashes.
_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
# Each bracket as a step of 2 (opening) or 0 (closing): the depth after k brackets is the sum of
# the first k steps minus k, which C-level iterators compute without a Python loop per byte.
_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


class BoundedJsonError(ValueError):
    """The text is too large, too deeply nested, or not JSON; the message is one line."""


class JsonLimitError(BoundedJsonError):
    """The text is over a bound: ``size`` (in ``unit``) is more than ``limit``."""

    def __init__(self, message: str, *, size: int, unit: str, limit: int) -> None:
        self.size = size
        self.unit = unit
        self.limit = limit
        super().__init__(message)


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings (0 for a scalar). Linear, no recursion.

    For valid JSON this is its depth; for malformed text it is at least the depth the decoder
    can reach before it finds the fault, so checking it first keeps the decoder shallow."""
    decoded = _decode(text) if isinstance(text, bytes) else text
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", decoded))
    if not brackets:
        return 0
    steps = brackets.encode("ascii").translate(_STEPS)
    deepest: int = max(map(operator.sub, accumulate(steps), count(1)))
    return max(0, deepest)


def _decode(data: bytes) -> str:
    """Bytes as ``json.loads`` would decode them (UTF-8, or UTF-16/32 as it detects), so the
    depth scan and the decoder read the same text."""
    try:
        return data.decode(json.detect_encoding(data), "surrogatepass")
    except UnicodeDecodeError as exc:
        raise BoundedJsonError(f"not JSON (not {exc.encoding} text)") from None


def loads_bounded(
    text: str | bytes, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, what: str = "value"
) -> Any:
    """Decode ``text`` as JSON within the bounds; raises BoundedJsonError naming ``what``.

    ``max_bytes`` counts UTF-8 bytes for text, bytes as given for bytes. Linear in the size."""
    size = len(text) if isinstance(text, bytes) else utf8_size(text)
    if size > max_bytes:
        message = f"{what} is {size} bytes, more than the limit of {max_bytes}"
        raise JsonLimitError(message, size=size, unit="bytes", limit=max_bytes)
    try:
        decoded = _decode(text) if isinstance(text, bytes) else text
    except BoundedJsonError as exc:
        raise BoundedJsonError(f"{what} is {exc}") from None
    # Nesting needs as many openers: when there are no more than the limit, no scan is needed
    # (a flat list of strings is then decoded at the decoder's own speed).
    openers = decoded.count("[") + decoded.count("{")
    depth = json_depth(decoded) if openers > max_depth else 0
    if depth > max_depth:
        message = f"{what} is nested {depth} levels deep, more than the limit of {max_depth}"
        raise JsonLimitError(message, size=depth, unit="levels of nesting", limit=max_depth)
    try:
        return json.loads(decoded)
    except RecursionError:  # cannot happen below the depth limit; kept so nothing escapes
        raise BoundedJsonError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise BoundedJsonError(f"{what} is not JSON ({reason})") from None


def utf8_size(text: str) -> int:
    """Length in UTF-8 bytes, as the API server counts a value (lone surrogates as 3)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))
