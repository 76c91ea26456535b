"""The kubelet's downward API annotations file, read (and written) exactly as the kubelet does.

The waiter learns its pod's state only from this file, so a parser that is almost right would
make it wait forever, or pass on a value it misread. The kubelet writes the map with Go's
``fmt.Sprintf("%v=%q\\n", key, value)`` for each key in sorted order and trims the last newline:
values are Go double-quoted string literals (``strconv.Quote``). This module implements Go's
``strconv.Unquote`` for those literals (every escape: ``\\a \\b \\f \\n \\r \\t \\v \\\\ \\"``, ``\\xNN``,
octal ``\\NNN``, ``\\uNNNN``, ``\\UNNNNNNNN``), and ``strconv.Quote`` so that the node stand-in and
the tests write the file the way the kubelet does.

Go strings are bytes; ours are text. Bytes that are not UTF-8 (which the kubelet never writes:
annotations come from JSON) become U+FFFD, one per byte, as Go decodes them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MAX_FILE_BYTES = 1 << 20  # the API server caps all annotations of an object at 256 KiB
REPLACEMENT = "\ufffd"
_SIMPLE_ESCAPES = {
    ord("a"): 0x07,
    ord("b"): 0x08,
    ord("f"): 0x0C,
    ord("n"): 0x0A,
    ord("r"): 0x0D,
    ord("t"): 0x09,
    ord("v"): 0x0B,
    ord("\\"): 0x5C,
    ord('"'): 0x22,
}
# Runs of bytes copied as they are (not a quote, backslash, newline or non-ASCII byte), and runs
# of non-ASCII bytes: each run is handled at once, so the Python loop turns once per escape or
# run rather than once per byte (linear either way; this keeps the waiter's polls cheap).
_PLAIN_RUN = re.compile(rb'[^"\\\n\x80-\xff]+')
_HIGH_RUN = re.compile(rb"[\x80-\xff]+")
_HEX_DIGITS = {ord(c): int(c, 16) for c in "0123456789abcdefABCDEF"}
_QUOTE_ESCAPES = {0x07: "\\a", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x0B: "\\v"}


class PodinfoFormatError(ValueError):
    """The annotations file is not in the kubelet's format (names the line and what is wrong)."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"line {line}: {reason}" if line else reason)


class GoQuoteError(ValueError):
    """Not a valid Go double-quoted string literal."""


def _utf8_length(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte announces (0: not a lead byte)."""
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _decode_rune(data: bytes, i: int) -> tuple[str, int]:
    """One rune at ``data[i]`` (a byte >= 0x80) as Go's utf8.DecodeRune: U+FFFD and one byte on
    any invalid, truncated, overlong or surrogate sequence."""
    size = _utf8_length(data[i])
    if size:
        try:
            return data[i : i + size].decode("utf-8"), i + size
        except UnicodeDecodeError:
            pass
    return REPLACEMENT, i + 1


def _copy_high_run(data: bytes, i: int, out: bytearray) -> int:
    """Append the non-ASCII run at ``data[i]`` as Go decodes it, rune by rune, and return where
    it ends. A run that is valid UTF-8 as a whole is the same runes, so it is copied at once."""
    run = _HIGH_RUN.match(data, i)
    assert run is not None  # data[i] >= 0x80
    end = run.end()
    try:
        run.group().decode("utf-8")
    except UnicodeDecodeError:
        while i < end:
            rune, i = _decode_rune(data, i)
            out += rune.encode("utf-8")
        return i
    out += run.group()
    return end


def _hex_value(digits: bytes) -> int:
    value = 0
    for d in digits:
        if d not in _HEX_DIGITS:
            raise GoQuoteError(f"invalid hex digit {chr(d)!r} in escape")
        value = value << 4 | _HEX_DIGITS[d]
    return value


def go_unquote(literal: bytes | str) -> str:
    """Go's ``strconv.Unquote`` for a double-quoted literal (the whole input, quotes included).

    Raises GoQuoteError for anything Go rejects: missing quotes, a raw newline or unescaped
    quote inside, text after the closing quote, an unknown escape, a short or non-hex escape,
    an octal escape above \\377, a \\u or \\U escape that is a surrogate or above U+10FFFF.
    """
    data = literal.encode("utf-8", "surrogatepass") if isinstance(literal, str) else bytes(literal)
    if len(data) < 2 or data[0] != 0x22:
        raise GoQuoteError("a quoted value starts and ends with '\"'")
    out = bytearray()
    i, end = 1, len(data)
    while True:
        if i >= end:
            raise GoQuoteError("missing closing '\"'")
        c = data[i]
        if c == 0x22:
            i += 1
            break
        if c == 0x0A:
            raise GoQuoteError("raw newline inside a quoted value")
        if c >= 0x80:
            i = _copy_high_run(data, i, out)
            continue
        if c != 0x5C:
            run = _PLAIN_RUN.match(data, i)
            assert run is not None  # c itself is plain
            out += run.group()
            i = run.end()
            continue
        if i + 1 >= end:
            raise GoQuoteError("'\\' at the end of the value")
        e = data[i + 1]
        i += 2
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
        elif e in (ord("x"), ord("u"), ord("U")):
            n = {ord("x"): 2, ord("u"): 4, ord("U"): 8}[e]
            digits = data[i : i + n]
            if len(digits) < n:
                raise GoQuoteError(f"\\{chr(e)} needs {n} hex digits")
            value = _hex_value(digits)
            i += n
            if e == ord("x"):
                out.append(value)  # one byte, possibly not UTF-8 on its own
            elif value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                raise GoQuoteError(f"\\{chr(e)}{digits.decode()} is not a Unicode code point")
            else:
                out += chr(value).encode("utf-8")
        elif 0x30 <= e <= 0x37:
            digits = data[i : i + 2]
            if len(digits) < 2 or not all(0x30 <= d <= 0x37 for d in digits):
                raise GoQuoteError("an octal escape has three digits 0-7")
            value = (e - 0x30) << 6 | (digits[0] - 0x30) << 3 | (digits[1] - 0x30)
            if value > 0xFF:
                raise GoQuoteError(f"octal escape \\{chr(e)}{digits.decode()} is above \\377")
            out.append(value)
            i += 2
        else:
            shown = chr(e) if 0x20 < e < 0x7F else f"\\x{e:02x}"
            raise GoQuoteError(f"unknown escape '\\{shown}'")
    if i != end:
        raise GoQuoteError("text after the closing '\"'")
    return out.decode("utf-8", "replace")


def go_quote(text: str) -> str:
    """Go's ``strconv.Quote``: printable characters as they are, the rest escaped."""
    parts = ['"']
    for ch in text:
        code = ord(ch)
        if ch in ('"', "\\"):
            parts.append("\\" + ch)
        elif code in _QUOTE_ESCAPES:
            parts.append(_QUOTE_ESCAPES[code])
        elif code < 0x20 or code == 0x7F:
            parts.append(f"\\x{code:02x}")
        elif ch.isprintable():
            parts.append(ch)
        elif 0xD800 <= code <= 0xDFFF:
            parts.append("\\ufffd")  # not a valid rune: Go writes the replacement character
        elif code < 0x10000:
            parts.append(f"\\u{code:04x}")
        else:
            parts.append(f"\\U{code:08x}")
    parts.append('"')
    return "".join(parts)


def format_annotations(annotations: Mapping[str, str]) -> str:
    """The file the kubelet writes for ``metadata.annotations``."""
    return "\n".join(f"{key}={go_quote(annotations[key])}" for key in sorted(annotations))


def parse_annotations(data: bytes | str) -> dict[str, str]:
    """The kubelet's ``key="value"`` lines -> dict. Raises PodinfoFormatError naming the line.

    Accepted as the kubelet writes it: an empty file, and no newline after the last line (one
    trailing newline is tolerated). Rejected: empty or blank lines, a line without ``=``, an
    empty key, a key that is not UTF-8 or holds a quote or whitespace, a value that is not a
    complete Go string literal, a key given twice, a file over 1 MiB.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_FILE_BYTES:
        raise PodinfoFormatError(0, f"file is larger than {MAX_FILE_BYTES} bytes")
    if raw == b"":
        return {}
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    result: dict[str, str] = {}
    for number, line in enumerate(raw.split(b"\n"), start=1):
        key_bytes, eq, value_bytes = line.partition(b"=")
        if not eq:
            raise PodinfoFormatError(number, 'expected key="value"')
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise PodinfoFormatError(number, "key is not UTF-8") from None
        if not key:
            raise PodinfoFormatError(number, "empty key")
        if '"' in key or any(ch.isspace() for ch in key):
            raise PodinfoFormatError(number, f"invalid key {key[:80]!r}")
        try:
            value = go_unquote(value_bytes)
        except GoQuoteError as exc:
            raise PodinfoFormatError(number, f"value of {key[:80]!r}: {exc}") from None
        if key in result:
            raise PodinfoFormatError(number, f"key {key[:80]!r} appears twice")
        result[key] = value
    return result


def read_annotations(path: str) -> dict[str, str]:
    """Read and parse the file (at most MAX_FILE_BYTES + 1 bytes are read). OSError passes up."""
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    return parse_annotations(data)
