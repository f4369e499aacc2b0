"""The watch stream decodes into typed events; chunking never changes what is decoded."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.operator.watch import (
    Bookmark,
    Expired,
    ListDecodeError,
    ListDecoder,
    ObjectEvent,
    StreamError,
    WatchedResource,
    WatchLineSplitter,
    decode_watch_line,
    object_key,
)


def line(event: object) -> bytes:
    return json.dumps(event).encode()


POD = {"metadata": {"name": "a", "namespace": "ns", "resourceVersion": "7"}}


@pytest.mark.parametrize("kind", ["ADDED", "MODIFIED", "DELETED"])
def test_object_events_carry_the_object(kind: str) -> None:
    assert decode_watch_line(line({"type": kind, "object": POD})) == ObjectEvent(kind, POD)  # type: ignore[arg-type]


def test_bookmark_carries_the_resource_version() -> None:
    event = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "42"}}}
    assert decode_watch_line(line(event)) == Bookmark("42")


def test_410_means_expired_and_other_errors_are_failures() -> None:
    gone = {"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}
    other = {"type": "ERROR", "object": {"code": 500, "message": "internal"}}
    assert decode_watch_line(line(gone)) == Expired("too old resource version")
    assert decode_watch_line(line(other)) == StreamError("internal")


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1, 2]", line({"type": "ADDED"}), line({"type": "WEIRD", "object": {}})],
)
def test_malformed_lines_are_stream_errors(raw: bytes) -> None:
    assert isinstance(decode_watch_line(raw), StreamError)


def test_object_key_is_namespaced_or_bare() -> None:
    assert object_key(POD) == "ns/a"
    assert object_key({"metadata": {"name": "node-1"}}) == "node-1"


def test_query_omits_empty_selectors() -> None:
    resource = WatchedResource("/api/v1/pods", trim=dict, field_selector="spec.nodeName=n1")
    assert resource.query(watch="1") == "fieldSelector=spec.nodeName%3Dn1&watch=1"


def test_splitter_keeps_a_partial_line_until_its_newline() -> None:
    splitter = WatchLineSplitter()
    assert splitter.feed(b'{"a":') == []
    assert splitter.feed(b'1}\n{"b"') == [b'{"a":1}']
    assert splitter.feed(b":2}\n\n") == [b'{"b":2}']


def test_splitter_has_no_line_length_limit() -> None:
    big = b"x" * 300_000
    assert WatchLineSplitter().feed(big + b"\n") == [big]


@given(
    lines=st.lists(st.binary(min_size=1).filter(lambda b: b"\n" not in b and b.strip()), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
)
def test_any_chunking_yields_the_same_lines(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(item + b"\n" for item in lines)
    splitter = WatchLineSplitter()
    received: list[bytes] = []
    start = 0
    for cut in [*sorted({c for c in cuts if c < len(stream)}), len(stream)]:
        received += splitter.feed(stream[start:cut])
        start = cut
    assert received == lines


LIST_BODY = {
    "kind": "PodList",
    "apiVersion": "v1",
    "metadata": {"resourceVersion": "1234", "remainingItemCount": 0},
    "items": [{"metadata": {"name": f"p{i}", "namespace": "ns", "labels": {"é": "ü" * i}}} for i in range(5)],
    "count": 12345,
}


@given(st.lists(st.integers(min_value=1, max_value=200), max_size=30), st.sampled_from([0, 2]))
def test_list_decoder_yields_the_same_items_however_the_body_is_chunked(cuts: list[int], indent: int) -> None:
    raw = json.dumps(LIST_BODY, indent=indent or None, ensure_ascii=False).encode()
    decoder, items, offset = ListDecoder(), [], 0
    for size in cuts:
        items += decoder.feed(raw[offset : offset + size])
        offset += size
    items += decoder.feed(raw[offset:])
    assert items == LIST_BODY["items"]
    assert decoder.finish() == {key: value for key, value in LIST_BODY.items() if key != "items"}


@pytest.mark.parametrize("raw", [b'{"items": [{"a": 1}', b'[{"a": 1}]', b'{"items": [], "x": 1} extra', b""])
def test_list_decoder_rejects_truncated_or_malformed_bodies(raw: bytes) -> None:
    def decode_whole() -> object:
        decoder = ListDecoder()
        return decoder.feed(raw), decoder.finish()

    with pytest.raises(ListDecodeError):
        decode_whole()
