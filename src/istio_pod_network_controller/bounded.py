"""Reading JSON that came from a pod or a client, at a bounded cost.

``json.loads`` on hostile text costs time linear in its size, but nesting is only bounded by
Python's recursion limit, which raises RecursionError (not ValueError) from deep inside the
decoder, and everything that walks the result later (``copy.deepcopy``, ``json.dumps``) recurses
again. So text is measured first: its size, then its nesting depth by one linear scan that skips
string contents, and only then decoded. Every failure is a ``BoundedJsonError`` with one line that
says which bound was crossed.
"""

from __future__ import annotations

import json
from typing import Any

# Nesting deeper than any document we read legitimately has (a Pod is about 10 levels deep; the
# agent's detail annotation 2), and far below the interpreter's recursion limit.
MAX_JSON_DEPTH = 64


class BoundedJsonError(ValueError):
    """The text is too large, too deeply nested, or not JSON; the message is one line."""


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings (0 for a scalar). Linear, no recursion;
    for malformed text the answer is only an upper-bound estimate, the decoder reports the rest."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def loads_bounded(
    text: str | bytes, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, what: str = "value"
) -> Any:
    """Decode ``text`` as JSON within the bounds; raises BoundedJsonError naming ``what``."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > max_bytes:
        raise BoundedJsonError(f"{what} is {size} bytes, more than the limit of {max_bytes}")
    depth = json_depth(text)
    if depth > max_depth:
        raise BoundedJsonError(f"{what} is nested {depth} levels deep, more than the limit of {max_depth}")
    try:
        return json.loads(text)
    except RecursionError:  # cannot happen below the depth limit; kept so nothing escapes
        raise BoundedJsonError(f"{what} is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise BoundedJsonError(f"{what} is not JSON ({reason})") from None
