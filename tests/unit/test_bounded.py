"""JSON from pods and clients: bounded in size and nesting before it is decoded, one-line errors,
and nothing but BoundedJsonError ever escapes, whatever the text."""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from istio_pod_network_controller.bounded import (
    MAX_JSON_DEPTH,
    BoundedJsonError,
    JsonLimitError,
    json_depth,
    loads_bounded,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\,: ab\u263a\x00', max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=20,
)


def nesting(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((nesting(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((nesting(v) for v in value.values()), default=0)
    return 0


@given(json_values, st.booleans())
def test_depth_of_valid_json_is_its_nesting(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert json_depth(text) == nesting(value)
    assert json_depth(text.encode()) == nesting(value)


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('["[[[[", "\\"[[["]', 1),  # brackets inside strings, escaped quotes included
        ('"\\\\"', 0),  # an escaped backslash ends before the quote
        ("[[[]", 3),  # malformed: at least the depth the decoder reaches before it fails
        ("]][[", 0),  # the decoder fails at the first character
        ('["abc', 1),  # a string never closed hides the rest
    ],
)
def test_depth_examples(text: str, depth: int) -> None:
    assert json_depth(text) == depth


def test_a_document_at_the_limits_is_decoded() -> None:
    text = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert nesting(loads_bounded(text, max_bytes=len(text))) == MAX_JSON_DEPTH


def test_too_large_is_refused_before_anything_else() -> None:
    with pytest.raises(JsonLimitError) as info:
        loads_bounded('{"a": "' + "x" * 100 + '"}', max_bytes=50, what="the detail")
    assert str(info.value) == "the detail is 109 bytes, more than the limit of 50"
    assert (info.value.size, info.value.unit, info.value.limit) == (109, "bytes", 50)


def test_size_counts_utf8_bytes_of_text() -> None:
    with pytest.raises(JsonLimitError, match="is 8 bytes"):
        loads_bounded('"\u263a\u263a"', max_bytes=7)
    assert loads_bounded('"\u263a\u263a"', max_bytes=8) == "\u263a\u263a"


def test_ten_thousand_levels_are_refused_without_recursion() -> None:
    text = "[" * 10_000 + "]" * 10_000
    with pytest.raises(JsonLimitError) as info:
        loads_bounded(text, max_bytes=10**6, what="body")
    assert str(info.value) == f"body is nested 10000 levels deep, more than the limit of {MAX_JSON_DEPTH}"
    assert info.value.unit == "levels of nesting"


def test_deep_nesting_hidden_after_a_string_is_still_counted() -> None:
    text = '["a\\"]", ' + '{"k": ' * 100 + "1" + "}" * 100 + "]"
    with pytest.raises(JsonLimitError, match="nested 101 levels deep"):
        loads_bounded(text, max_bytes=10**6)


@pytest.mark.parametrize(
    "text",
    ["", "[", "[1,]", "{'a': 1}", "nan-ish", '"\\x"', "[1] [2]", "\ufeff[]", "1" * 5000],
    ids=[
        "empty",
        "unclosed",
        "trailing-comma",
        "single-quotes",
        "word",
        "bad-escape",
        "extra",
        "bom",
        "huge-int",
    ],
)
def test_malformed_text_is_one_bounded_json_error(text: str) -> None:
    with pytest.raises(BoundedJsonError, match=r"^value is not JSON") as info:
        loads_bounded(text, max_bytes=10**6)
    assert "\n" not in str(info.value)
    assert not isinstance(info.value, JsonLimitError)


def test_bytes_are_decoded_as_json_loads_decodes_them() -> None:
    assert loads_bounded(b'{"a": [1]}', max_bytes=100) == {"a": [1]}
    assert loads_bounded('["\u263a"]'.encode("utf-16"), max_bytes=100) == ["\u263a"]
    # U+225B encodes as the bytes '[' '"' in UTF-16-LE: a byte scan would lose track of strings.
    text = '["\u225b' + "\u225b" * 100 + '"]'
    assert loads_bounded(text.encode("utf-16-le"), max_bytes=10**4) == ["\u225b" * 101]
    with pytest.raises(BoundedJsonError, match="not JSON"):
        loads_bounded(b'["\xff"]', max_bytes=100)


def test_recursion_error_never_escapes_even_from_a_shallow_stack_limit() -> None:
    # The depth check makes this impossible at the interpreter's usual limit; with a limit only
    # 20 frames above the caller's, the decoder runs out of stack within the allowed 64 levels.
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(len(traceback.extract_stack()) + 20)
    try:
        with pytest.raises(BoundedJsonError, match="nested too deeply"):
            loads_bounded("[" * 60 + "]" * 60, max_bytes=1000)
    finally:
        sys.setrecursionlimit(old)


@settings(max_examples=500)
@given(st.text(alphabet='[]{}"\\,:1a \n', max_size=200) | st.binary(max_size=200))
def test_nothing_but_bounded_json_error_escapes(text: str | bytes) -> None:
    try:
        loads_bounded(text, max_bytes=150, max_depth=5)
    except BoundedJsonError as exc:
        assert "\n" not in str(exc)
