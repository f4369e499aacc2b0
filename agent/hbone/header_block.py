"""HPACK header blocks (RFC 7541) that never touch the dynamic table: encoding, and decoding the
blocks that leave it as it is.

An HBONE side sends a handful of header fields per tunnel (a CONNECT, a status), and each new
tunnel names a new client port. What this side sends is therefore stateless: a field is an index
into the static table when the whole field is there (`:status 200`), otherwise a literal with the
static table's name index where it has one, never added to the dynamic table, and never
Huffman-coded (hpack codes Huffman in Python, a bit at a time; every decoder reads both forms).
The first block of a connection starts by setting the peer decoder's dynamic table size to 0,
which no later SETTINGS change can require to shrink: the encoder has no state after that.

`decode` reads a block only if it leaves the decoder's dynamic table unchanged (indexed fields,
from either table, and literals without indexing or never indexed, not Huffman-coded) and returns
None for anything else, which the caller then hands to hpack's decoder: a block from a peer that
indexes or Huffman-codes, a size update, and everything malformed or too large.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hpack import NeverIndexedHeaderTuple
from hpack.exceptions import InvalidTableIndex
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]
"""One header field: name and value, as h2 carries them."""

_STATIC: Sequence[Header] = HeaderTable.STATIC_TABLE
_STATIC_FIELD_INDEX = {field: index for index, field in reversed(list(enumerate(_STATIC, 1)))}
"""Static-table index of each whole field (the first, where a field is there twice)."""
_STATIC_NAME_INDEX = {name: index for index, (name, _) in reversed(list(enumerate(_STATIC, 1)))}
"""Static-table index of the first entry with each name."""

_TABLE_SIZE_ZERO = b"\x20"
"""A dynamic table size update to 0 (RFC 7541 6.3)."""

_ENTRY_OVERHEAD = 32
"""What RFC 7541 4.1 adds to each field's name and value lengths when sizing a header list."""


def encode(headers: Iterable[Header], *, empty_table_first: bool = False) -> bytes:
    """The block for `headers`, leaving the decoder's dynamic table as it is; with
    `empty_table_first`, the block first sets the table's size to 0 (a connection's first block).
    A field that is a `NeverIndexedHeaderTuple` is sent as never indexed (RFC 7541 6.2.3)."""
    block = bytearray(_TABLE_SIZE_ZERO if empty_table_first else b"")
    for field in headers:
        name, value = field
        if (index := _STATIC_FIELD_INDEX.get((name, value))) is not None:
            block += _integer(index, 7, 0x80)
            continue
        first_byte = 0x10 if isinstance(field, NeverIndexedHeaderTuple) else 0x00
        if (name_index := _STATIC_NAME_INDEX.get(name)) is not None:
            block += _integer(name_index, 4, first_byte)
        else:
            block.append(first_byte)
            block += _string(name)
        block += _string(value)
    return bytes(block)


def decode(block: bytes | memoryview, table: HeaderTable, max_header_list_size: int) -> list[Header] | None:
    """The fields of `block` if reading it leaves `table` (the connection's decoder table)
    unchanged and it is well-formed and within `max_header_list_size`; None otherwise."""
    data = bytes(block)
    end = len(data)
    position = 0
    headers: list[Header] = []
    list_size = 0
    try:
        while position < end:
            first = data[position]
            if first & 0x80:  # indexed field
                index, position = _read_integer(data, position, 7)
                header = table.get_by_index(index)
            elif first & 0xE0:  # incremental indexing (01), or a table size update (001)
                return None
            else:  # literal without indexing (0000) or never indexed (0001)
                name_index, position = _read_integer(data, position, 4)
                if name_index:
                    name = table.get_by_index(name_index)[0]
                else:
                    name, position = _read_string(data, position)
                value, position = _read_string(data, position)
                header = (name, value)
            list_size += len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
            if list_size > max_header_list_size:
                return None
            headers.append(header)
    except (IndexError, InvalidTableIndex, _NotPlain):  # truncated, no such entry, Huffman-coded
        return None
    return headers


class _NotPlain(Exception):
    """A field this module does not read (hpack's decoder does)."""


def _integer(value: int, prefix_bits: int, first_byte: int) -> bytes:
    """RFC 7541 5.1: `value` with an N-bit prefix, the rest of the first byte being `first_byte`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first_byte | value,))
    out = bytearray((first_byte | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(value: bytes) -> bytes:
    """RFC 7541 5.2, not Huffman-coded."""
    return _integer(len(value), 7, 0x00) + value


_MAX_INTEGER_BYTES = 4
"""Continuation bytes read at most: 28 bits, far beyond any index or length a block can carry."""


def _read_integer(data: bytes, position: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[position] & limit
    position += 1
    if value < limit:
        return value, position
    shift = 0
    for _ in range(_MAX_INTEGER_BYTES):
        byte = data[position]
        position += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    raise _NotPlain


def _read_string(data: bytes, position: int) -> tuple[bytes, int]:
    if data[position] & 0x80:
        raise _NotPlain  # Huffman-coded
    length, position = _read_integer(data, position, 7)
    end = position + length
    if end > len(data):
        raise IndexError
    return data[position:end], end
