"""A small asyncio Kubernetes API client (aiohttp + json) for the harness kubelet.

The kubelet needs only JSON in and out, a few verbs and a watch stream; the kubernetes package's
model objects would cost it time and memory for nothing. HTTP statuses come back as values:
404 on a delete or 409 on a create are normal outcomes, not errors.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

JsonObject = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"


class ApiUnavailable(ConnectionError):
    """The API server could not be reached (connection refused, reset, timeout)."""


@dataclass(frozen=True)
class Response:
    status: int
    body: JsonObject

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class KubeApi:
    """One HTTPS session to the API server with a client certificate."""

    def __init__(self, server: str, ca_cert: Path, client_cert: Path, client_key: Path) -> None:
        self._server = server.rstrip("/")
        context = ssl.create_default_context(cafile=str(ca_cert))
        context.load_cert_chain(str(client_cert), str(client_key))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=16),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: JsonObject | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Response:
        data = None if body is None else json.dumps(body)
        try:
            async with self._session.request(
                method,
                self._server + path,
                params=params,
                data=data,
                headers={"Content-Type": content_type, "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                raw = await response.read()
                return Response(response.status, json.loads(raw) if raw else {})
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ApiUnavailable(f"{method} {path}: {error!r}") from error

    async def watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[JsonObject]:
        """Watch events (`type`, `object`) of a collection until the server ends the stream."""
        query = {**params, "watch": "1"}
        try:
            async with self._session.get(self._server + path, params=query) as response:
                if response.status != 200:
                    yield {"type": "ERROR", "object": {"code": response.status}}
                    return
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield json.loads(line)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ApiUnavailable(f"watch {path}: {error!r}") from error
