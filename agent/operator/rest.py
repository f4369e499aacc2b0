"""JSON requests and single-object watches against the Kubernetes API server over one aiohttp session.

The CA and the node's CSR adapter need a handful of verbs on a few objects; HTTP statuses come back
as values (a 404 on a read or a 409 on a create is an answer, not an error), and only an unreachable
server raises, as `ApiUnreachable`. Watch lines are decoded by `agent.operator.watch`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp

from agent.operator.kubeapi import ApiAccess
from agent.operator.watch import WatchLineSplitter, WireEvent, decode_watch_line

JsonObject = dict[str, Any]


class ApiUnreachable(ConnectionError):
    """The API server did not answer (refused, reset, timed out, TLS failure)."""


@dataclass(frozen=True)
class ApiResponse:
    """One answer: the HTTP status and the decoded JSON body (empty when there is none)."""

    status: int
    """HTTP status code."""

    body: JsonObject
    """The decoded body; a `Status` object on errors."""

    @property
    def ok(self) -> bool:
        """2xx."""
        return 200 <= self.status < 300

    @property
    def message(self) -> str:
        """`HTTP <status>: <the API server's message>`, for logs and failure reasons."""
        return f"HTTP {self.status}: {self.body.get('message') or self.body.get('reason') or 'no message'}"


class ApiClient:
    """One session to the API server; use as `async with`."""

    def __init__(self, access: ApiAccess, *, request_timeout: float = 30.0) -> None:
        self._access = access
        self._request_timeout = request_timeout
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=access.ssl_context()),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the session."""
        await self._session.close()

    def _url(self, path: str, query: Mapping[str, str] | None) -> str:
        return f"{self._access.server}{path}" + (f"?{urlencode(query)}" if query else "")

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: JsonObject | None = None,
        content_type: str = "application/json",
    ) -> ApiResponse:
        """Sends one request; the status and JSON body, whatever the status."""
        headers = {"Accept": "application/json", **self._access.auth_headers()}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            async with self._session.request(
                method,
                self._url(path, query),
                data=None if body is None else json.dumps(body),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._request_timeout),
            ) as response:
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise ApiUnreachable(f"{method} {path}: {error!r}") from error
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            decoded = {"message": raw[:200].decode(errors="replace")}
        return ApiResponse(response.status, decoded if isinstance(decoded, dict) else {})

    async def watch(
        self, path: str, query: Mapping[str, str]
    ) -> AsyncGenerator[WireEvent | ApiResponse, None]:
        """Watches a collection (`watch=1` is added); yields decoded events until the server ends the
        stream, or one `ApiResponse` when the server refuses the watch."""
        url = self._url(path, {**query, "watch": "1"})
        splitter = WatchLineSplitter()
        try:
            async with self._session.get(
                url, headers={"Accept": "application/json", **self._access.auth_headers()}
            ) as response:
                if response.status != 200:
                    raw = await response.read()
                    try:
                        body = json.loads(raw) if raw else {}
                    except ValueError:
                        body = {}
                    yield ApiResponse(response.status, body if isinstance(body, dict) else {})
                    return
                async for chunk in response.content.iter_any():
                    for line in splitter.feed(chunk):
                        yield decode_watch_line(line)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise ApiUnreachable(f"watch {path}: {error!r}") from error
