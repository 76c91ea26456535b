"""The kubelet's downward API annotations file: Go string literals, parsed exactly, hostile input
rejected with the line that is wrong."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio_pod_network_controller.podinfo import (
    MAX_FILE_BYTES,
    GoQuoteError,
    PodinfoFormatError,
    format_annotations,
    go_quote,
    go_unquote,
    parse_annotations,
)

# -- Go's strconv.Unquote, escape by escape ---------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        (r'""', ""),
        (r'"plain text"', "plain text"),
        (r'"\a\b\f\n\r\t\v"', "\a\b\f\n\r\t\v"),
        (r'"a \"quoted\" word"', 'a "quoted" word'),
        (r'"back\\slash"', "back\\slash"),
        (r'"\x00\x1f\x7f\x41"', "\x00\x1f\x7fA"),
        (r'"\xE2\x98\xBA"', "\u263a"),  # bytes that together are UTF-8
        (r'"\101\060\000"', "A0\x00"),
        (r'"\u263a\u00e9"', "\u263a\u00e9"),
        (r'"\U0001F600"', "\U0001f600"),
        (r'"\U0010ffff"', "\U0010ffff"),
        ('"caf\u00e9 \u263a"', "caf\u00e9 \u263a"),  # printable runes are written as they are
        ('"tab\tinside"', "tab\tinside"),  # Go accepts raw control characters but newline
        ('"single \' quote"', "single ' quote"),
    ],
)
def test_go_unquote_decodes_every_escape(literal: str, expected: str) -> None:
    assert go_unquote(literal) == expected


def test_octal_escapes_make_bytes() -> None:
    assert go_unquote(r'"\101\060"') == "A0"
    assert go_unquote(r'"\303\251"') == "\u00e9"  # two octal bytes forming UTF-8


def test_escaped_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    assert go_unquote(r'"\xff"') == "\ufffd"
    assert go_unquote(r'"a\377b"') == "a\ufffdb"


def test_raw_bytes_that_are_not_utf8_become_one_replacement_character_each() -> None:
    # Go's utf8.DecodeRune consumes one byte per invalid sequence.
    assert go_unquote(b'"a\xe2\x82b"') == "a\ufffd\ufffdb"
    assert go_unquote(b'"\xed\xa0\x80"') == "\ufffd" * 3  # an encoded surrogate
    assert go_unquote(b'"\xc0\xaf"') == "\ufffd" * 2  # overlong
    assert go_unquote(b'"\xe2\x98\xba"') == "\u263a"


@pytest.mark.parametrize(
    ("literal", "complaint"),
    [
        ("", "starts and ends"),
        ("x", "starts and ends"),
        ('"', "starts and ends"),
        ("'single'", "starts and ends"),
        ("`raw`", "starts and ends"),
        ('"unterminated', "closing"),
        ('"two" "strings"', "after the closing"),
        ('"a"b"', "after the closing"),
        ('"ends with backslash\\"', "closing"),
        ('"\\', "end of the value"),
        ('"line\nbreak"', "raw newline"),
        (r'"\q"', "unknown escape"),
        (r'"\'"', "unknown escape"),
        (r'"\ "', "unknown escape"),
        (r'"\x4"', "hex digit"),
        (r'"\x', "2 hex digits"),
        (r'"\xzz"', "hex digit"),
        (r'"\u12"', "4 hex digits"),
        (r'"\u12g4"', "hex digit"),
        (r'"\U0001F60"', "hex digit"),
        (r'"\U0001F60', "8 hex digits"),
        (r'"\ud800"', "not a Unicode code point"),
        (r'"\udfff"', "not a Unicode code point"),
        (r'"\U00110000"', "not a Unicode code point"),
        (r'"\Uffffffff"', "not a Unicode code point"),
        (r'"\400"', "above"),
        (r'"\12"', "three digits"),
        (r'"\18a"', "three digits"),
        (r'"\8"', "unknown escape"),
    ],
)
def test_go_unquote_rejects_what_go_rejects(literal: str, complaint: str) -> None:
    with pytest.raises(GoQuoteError, match=complaint):
        go_unquote(literal)


# -- Go's strconv.Quote, so the node stand-in writes what the kubelet writes -------------------


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("", '""'),
        ("hello", '"hello"'),
        ('{"a":1}', r'"{\"a\":1}"'),
        ("a\\b", r'"a\\b"'),
        ("\a\b\f\n\r\t\v", r'"\a\b\f\n\r\t\v"'),
        ("\x00\x01\x1b\x7f", r'"\x00\x01\x1b\x7f"'),
        ("caf\u00e9 \u263a \U0001f600", '"caf\u00e9 \u263a \U0001f600"'),
        ("\u00a0", r'"\u00a0"'),  # a space other than ASCII space is not printable for Go
        ("\u200b", r'"\u200b"'),
        ("\u2028", r'"\u2028"'),
        ("\U000e0001", r'"\U000e0001"'),
        ("\ud800", r'"\ufffd"'),
    ],
)
def test_go_quote_matches_strconv_quote(text: str, quoted: str) -> None:
    assert go_quote(text) == quoted


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_quote_then_unquote_is_the_identity(text: str) -> None:
    assert go_unquote(go_quote(text)) == text


# -- the file ----------------------------------------------------------------------------------

KUBELET_FILE = (
    'istio-pod-network-controller/initialize="true"\n'
    'pod-network-controller.istio.io/detail="{\\"netnsInode\\":4026532281,\\"rulesetSha256\\":\\"ab\\"}"\n'
    'pod-network-controller.istio.io/status="initialized"\n'
    'proxy.istio.io/config="discoveryAddress: foo:123\\nconcurrency: 0"'
)


def test_parses_a_file_as_the_kubelet_writes_it() -> None:
    assert parse_annotations(KUBELET_FILE) == {
        "istio-pod-network-controller/initialize": "true",
        "pod-network-controller.istio.io/detail": '{"netnsInode":4026532281,"rulesetSha256":"ab"}',
        "pod-network-controller.istio.io/status": "initialized",
        "proxy.istio.io/config": "discoveryAddress: foo:123\nconcurrency: 0",
    }


def test_format_writes_sorted_lines_without_a_final_newline() -> None:
    text = format_annotations({"b": "2", "a": 'x"y', "c": "line\nbreak"})
    assert text == 'a="x\\"y"\nb="2"\nc="line\\nbreak"'


def test_empty_file_is_no_annotations_and_one_trailing_newline_is_tolerated() -> None:
    assert parse_annotations(b"") == {}
    assert parse_annotations('k="v"\n') == {"k": "v"}


def test_a_value_may_hold_equals_signs_and_the_key_ends_at_the_first_one() -> None:
    assert parse_annotations('a/b="x=y=z"') == {"a/b": "x=y=z"}


@pytest.mark.parametrize(
    ("text", "line", "complaint"),
    [
        ("\n", 1, "expected key"),
        ('a="1"\n\nb="2"', 2, "expected key"),
        ('a="1"\n\n', 2, "expected key"),
        ("novalue", 1, "expected key"),
        ('="v"', 1, "empty key"),
        ('a b="v"', 1, "invalid key"),
        ('a"b="v"', 1, "invalid key"),
        ("k=v", 1, "starts and ends"),
        ("k=", 1, "starts and ends"),
        ('k="v', 1, "closing"),
        ('k="v"\r', 1, "after the closing"),
        ('k="v" ', 1, "after the closing"),
        ('k="\\z"', 1, "unknown escape"),
        ('a="1"\na="2"', 2, "appears twice"),
        ('ok="1"\nbad="\\ud800"', 2, "not a Unicode code point"),
    ],
)
def test_hostile_or_broken_files_are_rejected_naming_the_line(text: str, line: int, complaint: str) -> None:
    with pytest.raises(PodinfoFormatError, match=complaint) as info:
        parse_annotations(text)
    assert info.value.line == line
    assert "\n" not in str(info.value)


def test_a_key_that_is_not_utf8_is_rejected() -> None:
    with pytest.raises(PodinfoFormatError, match="not UTF-8"):
        parse_annotations(b'\xff="v"')


def test_an_oversized_file_is_rejected_before_parsing() -> None:
    with pytest.raises(PodinfoFormatError, match="larger than"):
        parse_annotations(b'k="' + b"x" * MAX_FILE_BYTES + b'"')


def test_error_messages_stay_one_line_and_short_for_a_huge_hostile_key() -> None:
    with pytest.raises(PodinfoFormatError) as info:
        parse_annotations("k" * 10000 + ' x="v"')
    assert len(str(info.value)) < 200


_KEYS = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,20}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,30}", fullmatch=True)


@given(st.dictionaries(_KEYS, st.text(alphabet=st.characters(blacklist_categories=("Cs",)))))
def test_any_annotations_survive_the_kubelet_format(annotations: dict[str, str]) -> None:
    assert parse_annotations(format_annotations(annotations)) == annotations


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        parse_annotations(data)
    except PodinfoFormatError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        (b'"a\xe2\x98\xba\xc3\xa9b"', "a\u263a\u00e9b"),  # a valid run, copied whole
        (b'"a\xe2\x98\xba\xff\xc3\xa9b"', "a\u263a\ufffd\u00e9b"),  # one bad byte in a run
        (b'"\xe2\x98"', "\ufffd\ufffd"),  # a run cut short by the closing quote
        (b'"plain\\tthen \xc3\xa9 and \\x41"', "plain\tthen \u00e9 and A"),
    ],
)
def test_runs_of_plain_and_non_ascii_bytes_decode_as_go_does(literal: bytes, expected: str) -> None:
    assert go_unquote(literal) == expected
