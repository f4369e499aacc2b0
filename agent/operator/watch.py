"""The lean cluster-wide LIST + WATCH that feeds the routing index.

kopf keeps a task, a queue and a full body per object, which does not scale to a whole cluster
(FACTS.md: no 50,000-pod sync in 6 minutes). This watcher keeps only what a `trim` function extracts
from each object and reports changes to a sink. The wire decoding is pure (`WatchLineSplitter`,
`decode_watch_line`); `ListWatcher` is the thin aiohttp loop around it:

- the first LIST uses `resourceVersion=0`, served from the API server's watch cache, and is decoded
  item by item as it arrives (`ListDecoder`): a 50,000-pod LIST is 232 MB of JSON, and decoding it
  whole would hold ~1 GB of objects at once (and pin that memory for good: the trimmed objects kept
  would share its pages);
- WATCH continues from the LIST's resourceVersion with bookmarks, so a quiet collection still
  advances its resourceVersion and a reconnect does not need a relist;
- `410 Gone` (the resourceVersion fell out of the watch window) relists; any other failure relists
  after a jittered backoff, so a fleet of agents does not hammer a recovering API server in step.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, assert_never
from urllib.parse import urlencode

import aiohttp

from agent.operator.kubeapi import ApiAccess
from agent.retry import Backoff

log = logging.getLogger(__name__)

_LIST_CHUNK = 256 * 1024
"""Bytes read at a time from a LIST response (a few dozen pods)."""

JsonObject = dict[str, Any]
Trim = Callable[[JsonObject], JsonObject]


@dataclass(frozen=True)
class WatchedResource:
    """One collection to list and watch, and the fields kept of each object."""

    path: str
    """Collection path, e.g. `/api/v1/pods` or `/api/v1/namespaces/ns/services`."""

    trim: Trim
    """Keeps only the fields the consumer needs; runs once per received object."""

    field_selector: str = ""
    """Server-side field selector, e.g. `spec.nodeName=node-1`."""

    label_selector: str = ""
    """Server-side label selector."""

    def query(self, **extra: str) -> str:
        params = {"fieldSelector": self.field_selector, "labelSelector": self.label_selector, **extra}
        return urlencode({k: v for k, v in params.items() if v})


# Changes reported to the sink.


@dataclass(frozen=True)
class Listed:
    """A (re)list finished: the collection is exactly `keys`. Each listed object came as an
    `Upserted` while the list arrived, so the sink never holds the whole list at once; what it
    holds beyond `keys` was deleted meanwhile."""

    path: str
    keys: frozenset[str]


@dataclass(frozen=True)
class Upserted:
    """An object was added or modified."""

    path: str
    key: str
    obj: JsonObject


@dataclass(frozen=True)
class Deleted:
    """An object was deleted."""

    path: str
    key: str


WatchChange = Listed | Upserted | Deleted
Sink = Callable[[WatchChange], None]


# What one line of a watch stream means.


@dataclass(frozen=True)
class ObjectEvent:
    """ADDED, MODIFIED or DELETED with the full object."""

    kind: Literal["ADDED", "MODIFIED", "DELETED"]
    obj: JsonObject


@dataclass(frozen=True)
class Bookmark:
    """The collection reached `resource_version`; nothing changed for us."""

    resource_version: str


@dataclass(frozen=True)
class Expired:
    """The watch's resourceVersion is too old (HTTP 410 Gone): a relist is required."""

    message: str


@dataclass(frozen=True)
class StreamError:
    """The server sent an error other than 410, or the line was not a watch event."""

    message: str


WireEvent = ObjectEvent | Bookmark | Expired | StreamError


def decode_watch_line(line: bytes) -> WireEvent:
    """Decodes one newline-delimited JSON watch event."""
    try:
        event = json.loads(line)
    except ValueError as error:
        return StreamError(f"malformed watch line: {error}")
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        return StreamError("watch line is not an event object")
    kind, obj = event.get("type"), event["object"]
    if kind in ("ADDED", "MODIFIED", "DELETED"):
        return ObjectEvent(kind, obj)
    if kind == "BOOKMARK":
        return Bookmark(str(obj.get("metadata", {}).get("resourceVersion", "")))
    if kind == "ERROR":
        message = str(obj.get("message", obj))
        return Expired(message) if obj.get("code") == 410 else StreamError(message)
    return StreamError(f"unknown watch event type {kind!r}")


@dataclass
class WatchLineSplitter:
    """Splits a chunked byte stream into lines; no line-length limit (a pod can exceed 64 KiB)."""

    _partial: bytearray = field(default_factory=bytearray)

    def feed(self, chunk: bytes) -> list[bytes]:
        self._partial += chunk
        *lines, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest)
        return [bytes(line) for line in lines if line.strip()]


class ListDecodeError(ValueError):
    """A LIST response body that is not a JSON object with an `items` list."""


_WHITESPACE = json.decoder.WHITESPACE  # type: ignore[attr-defined]


@dataclass
class ListDecoder:
    """Decodes a LIST response body incrementally: `feed` returns the items completed so far, and
    `finish` the list's other top-level fields (its `metadata` holds the resourceVersion).

    Each item is decoded on its own once its bytes have arrived, so memory holds one chunk and the
    items not yet consumed, never the whole body.
    """

    _decoder: json.JSONDecoder = field(default_factory=json.JSONDecoder)
    _utf8: codecs.IncrementalDecoder = field(default_factory=codecs.getincrementaldecoder("utf-8"))
    _text: str = ""
    _state: str = "start"
    _fields: JsonObject = field(default_factory=dict)
    _key: str = ""

    def feed(self, chunk: bytes) -> list[JsonObject]:
        """The items that `chunk` completes."""
        self._text += self._utf8.decode(chunk)
        items: list[JsonObject] = []
        position = self._advance(0, items)
        self._text = self._text[position:]
        return items

    def finish(self) -> JsonObject:
        """The top-level fields other than `items`; raises `ListDecodeError` on a truncated body."""
        self._text += self._utf8.decode(b"", final=True)
        position = self._advance(0, [])
        if self._state != "done" or self._text[position:].strip():
            raise ListDecodeError(f"LIST body ended early or malformed (while reading {self._state})")
        return self._fields

    def _advance(self, position: int, items: list[JsonObject]) -> int:
        """Consumes complete tokens from `position`; returns where the unconsumed text starts."""
        text, decode = self._text, self._decoder.raw_decode
        while True:
            position = _WHITESPACE.match(text, position).end()
            if position >= len(text):
                return position
            char = text[position]
            try:
                match self._state:
                    case "start":
                        if char != "{":
                            raise ListDecodeError(f"LIST body is not a JSON object: {char!r}")
                        self._state, position = "key", position + 1
                    case "key":
                        if char == "}":
                            self._state, position = "done", position + 1
                            continue
                        key, end = decode(text, position)
                        colon = _WHITESPACE.match(text, end).end()
                        if colon >= len(text):
                            return position
                        if text[colon] != ":":
                            raise ListDecodeError(f"expected ':' after {key!r}")
                        self._key, position = key, colon + 1
                        self._state = "value"
                    case "value":
                        if self._key == "items" and char == "[":
                            self._state, position = "item", position + 1
                            continue
                        value, end = decode(text, position)
                        if isinstance(value, int | float) and end == len(text):
                            return position  # the number may go on in the next chunk
                        self._fields[self._key], position = value, end
                        self._state = "next"
                    case "item":
                        if char == "]":
                            self._state, position = "next", position + 1
                            continue
                        if char == ",":
                            position += 1
                            continue
                        item, position = decode(text, position)
                        items.append(item)
                    case "next":
                        if char not in ",}":
                            raise ListDecodeError(f"expected ',' or '}}' at top level, got {char!r}")
                        self._state = "key" if char == "," else "done"
                        position += 1
                    case _:
                        raise ListDecodeError(f"data after the end of the LIST body: {char!r}")
            except json.JSONDecodeError:
                # Not complete yet: wait for the next chunk (`finish` reports a body that never completes).
                return position


def object_key(obj: Mapping[str, Any]) -> str:
    """`namespace/name`, or `name` for cluster-scoped objects."""
    metadata = obj.get("metadata", {})
    namespace, name = metadata.get("namespace"), metadata.get("name", "")
    return f"{namespace}/{name}" if namespace else str(name)


class WatchFailed(RuntimeError):
    """The API server could not be listed or watched; the loop relists after a backoff."""


class _RelistNeeded(Exception):
    """The watch expired (410 Gone); relist at once, no backoff."""


class ListWatcher:
    """Keeps a sink in step with one collection, forever, across errors and API server restarts."""

    def __init__(
        self,
        access: ApiAccess,
        resource: WatchedResource,
        sink: Sink,
        *,
        backoff: Backoff | None = None,
        watch_timeout_s: int = 300,
    ) -> None:
        self._access = access
        self._resource = resource
        self._sink = sink
        self._backoff = backoff or Backoff(base_s=0.5, cap_s=30.0)
        self._watch_timeout_s = watch_timeout_s
        self.synced = asyncio.Event()
        """Set after the first complete LIST has reached the sink."""

    @property
    def path(self) -> str:
        """The watched collection's path."""
        return self._resource.path

    async def run(self) -> None:
        """Lists, then watches; relists on expiry, and after a backoff on any failure."""
        failures = 0
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._access.ssl_context()),
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=None),
        ) as session:
            while True:
                try:
                    version = await self._list(session)
                    self.synced.set()
                    failures = 0
                    while True:
                        version = await self._watch(session, version)
                except _RelistNeeded:
                    log.info("watch of %s expired; relisting", self._resource.path)
                except (WatchFailed, aiohttp.ClientError, TimeoutError) as error:
                    delay = self._backoff.delay(failures)
                    failures += 1
                    log.warning(
                        "listing/watching %s failed (%s); retrying in %.1fs",
                        self._resource.path,
                        error,
                        delay,
                    )
                    await asyncio.sleep(delay)

    async def _list(self, session: aiohttp.ClientSession) -> str:
        url = f"{self._access.server}{self._resource.path}?{self._resource.query(resourceVersion='0')}"
        path, trim, decoder, keys = self._resource.path, self._resource.trim, ListDecoder(), set()
        async with session.get(url, headers=self._access.auth_headers()) as response:
            if response.status != 200:
                raise WatchFailed(f"LIST {path}: HTTP {response.status}")
            async for chunk in response.content.iter_chunked(_LIST_CHUNK):
                for item in decoder.feed(chunk):
                    key = object_key(item)
                    keys.add(key)
                    self._sink(Upserted(path, key, trim(item)))
        try:
            fields = decoder.finish()
        except ListDecodeError as error:
            raise WatchFailed(f"LIST {path}: {error}") from None
        self._sink(Listed(path, frozenset(keys)))
        return str(fields.get("metadata", {}).get("resourceVersion", ""))

    async def _watch(self, session: aiohttp.ClientSession, version: str) -> str:
        """Watches from `version` until the server ends the watch; returns the last version seen."""
        query = self._resource.query(
            watch="1",
            allowWatchBookmarks="true",
            resourceVersion=version,
            timeoutSeconds=str(self._watch_timeout_s),
        )
        url = f"{self._access.server}{self._resource.path}?{query}"
        splitter = WatchLineSplitter()
        async with session.get(url, headers=self._access.auth_headers()) as response:
            if response.status == 410:
                raise _RelistNeeded
            if response.status != 200:
                raise WatchFailed(f"WATCH {self._resource.path}: HTTP {response.status}")
            async for chunk in response.content.iter_any():
                for line in splitter.feed(chunk):
                    version = self._apply(decode_watch_line(line), version)
        return version

    def _apply(self, event: WireEvent, version: str) -> str:
        """Hands one wire event to the sink; returns the collection's resourceVersion after it."""
        path = self._resource.path
        match event:
            case ObjectEvent(kind="DELETED", obj=obj):
                self._sink(Deleted(path, object_key(obj)))
                return _resource_version(obj, version)
            case ObjectEvent(obj=obj):
                self._sink(Upserted(path, object_key(obj), self._resource.trim(obj)))
                return _resource_version(obj, version)
            case Bookmark(resource_version=bookmarked):
                return bookmarked or version
            case Expired():
                raise _RelistNeeded
            case StreamError(message=message):
                raise WatchFailed(f"WATCH {path}: {message}")
            case _:
                assert_never(event)


def _resource_version(obj: Mapping[str, Any], default: str) -> str:
    return str(obj.get("metadata", {}).get("resourceVersion", default))
