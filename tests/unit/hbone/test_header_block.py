"""Stateless HPACK blocks: what this side encodes every decoder reads and nothing enters a table;
what `decode` reads it reads as hpack does, and everything else it leaves to hpack."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hpack.table import HeaderTable
from hypothesis import given
from hypothesis import strategies as st

from agent.hbone.header_block import Header, decode, encode

KNOWN_NAMES = [b":method", b":authority", b":status", b"forwarded", b"content-length", b"x-" + b"a" * 150]
NAMES = st.one_of(
    st.sampled_from(KNOWN_NAMES),
    st.binary(min_size=1, max_size=40).map(lambda name: name.lower()),
)
HEADERS = st.lists(st.tuples(NAMES, st.binary(max_size=300)), max_size=8)

LIMIT = 65_536


@given(HEADERS, st.booleans())
def test_every_block_reads_back_as_sent_by_hpack_and_by_decode(headers: list[Header], first: bool) -> None:
    block = encode(headers, empty_table_first=first)
    decoder = Decoder()
    assert decoder.decode(block, raw=True) == headers
    assert not decoder.header_table.dynamic_entries
    if not first:
        assert decode(block, decoder.header_table, LIMIT) == headers


def test_the_first_block_empties_the_peers_table() -> None:
    decoder = Decoder()
    decoder.decode(encode([(b":status", b"200")], empty_table_first=True))
    assert decoder.header_table.maxsize == 0


def test_whole_static_fields_are_indexes_and_static_names_are_reused() -> None:
    assert encode([(b":status", b"200")]) == b"\x88"
    assert encode([(b":method", b"CONNECT")]) == b"\x02\x07CONNECT"  # :method is static entry 2
    assert encode([(b"forwarded", b"x")]) == b"\x00\x09forwarded\x01x"


def test_never_indexed_fields_stay_never_indexed() -> None:
    block = encode([NeverIndexedHeaderTuple(b"forwarded", b'for="10.0.0.1:1"')])
    assert block[0] == 0x10
    [field] = Decoder().decode(block, raw=True)
    assert isinstance(field, NeverIndexedHeaderTuple)


def test_long_lengths_and_indexes_take_continuation_bytes() -> None:
    value = b"v" * 1000
    block = encode([(b"www-authenticate", value)])  # static entry 61: beyond a 4-bit prefix
    assert block[:2] == bytes([0x0F, 61 - 15])
    assert decode(block, HeaderTable(), LIMIT) == [(b"www-authenticate", value)]


def test_indexed_fields_are_read_from_the_dynamic_table_without_changing_it() -> None:
    peer, decoder = Encoder(), Decoder()
    headers = [(b":authority", b"10.0.2.7:80"), (b"x-tenant", b"blue")]
    decoder.decode(peer.encode(headers, huffman=False), raw=True)  # hpack indexes both
    entries = list(decoder.header_table.dynamic_entries)
    again = peer.encode(headers, huffman=False)  # now two index bytes
    assert len(again) == 2
    assert decode(again, decoder.header_table, LIMIT) == headers
    assert list(decoder.header_table.dynamic_entries) == entries


@pytest.mark.parametrize(
    ("block", "why"),
    [
        (Encoder().encode([(b"x-tenant", b"blue")], huffman=False), "indexes the field"),
        (Encoder().encode([(b"x-tenant", b"blue")]), "indexes and Huffman-codes"),
        (b"\x20\x88", "a table size update"),
        (b"\x00\x81\x7f\x01y", "a Huffman-coded name"),
        (b"\x04\x81\x7f", "a Huffman-coded value"),
        (b"\x80", "index 0"),
        (b"\xff\x7f", "no such entry"),
        (b"\x00\x05ab", "a truncated name"),
        (b"\x0f", "a truncated integer"),
        (b"\x0f\xff\xff\xff\xff\x01", "an integer beyond any block"),
    ],
)
def test_blocks_hpack_must_read_are_left_to_it(block: bytes, why: str) -> None:
    assert decode(block, HeaderTable(), LIMIT) is None, why


def test_a_list_beyond_the_limit_is_left_to_hpack_which_refuses_it() -> None:
    block = encode([(b"x-big", b"v" * 100)])
    assert decode(block, HeaderTable(), 100 + 5 + 32) == [(b"x-big", b"v" * 100)]
    assert decode(block, HeaderTable(), 100 + 5 + 31) is None
